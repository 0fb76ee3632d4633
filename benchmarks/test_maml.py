"""The MAML workloads (sinusoid, Omniglot and the real models) through every implementation."""

import implementations
import pytest
import workloads

IMPLEMENTATIONS = [impl.key for impl in implementations.IMPLEMENTATIONS]
MAML_WORKLOADS = [w.key for w in workloads.suite() if w.family == "maml"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("workload", MAML_WORKLOADS)
def test_maml(run_case, workload, implementation):
    run_case(workload, implementation)
