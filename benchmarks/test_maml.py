"""Workloads 1, 2, 2b and 3 (MAML) through every implementation."""

import implementations
import pytest

IMPLEMENTATIONS = [impl.key for impl in implementations.IMPLEMENTATIONS]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("workload", ["1", "2", "2b", "3"])
def test_maml(run_case, workload, implementation):
    run_case(workload, implementation)
