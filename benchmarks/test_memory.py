"""Workload 6: peak memory (in ``extra_info["peak_bytes"]``) for 5, 20 and 50 inner steps."""

import implementations
import pytest
import workloads

KEYS = [w.key for w in workloads.suite() if w.family == "memory"]


@pytest.mark.parametrize("implementation", [i.key for i in implementations.IMPLEMENTATIONS])
@pytest.mark.parametrize("workload", KEYS)
def test_memory(run_case, workload, implementation):
    run_case(workload, implementation)
