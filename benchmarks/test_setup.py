"""Workload 5: the cost of entering innerloop_ctx for a 10M-parameter model."""

import implementations
import pytest


@pytest.mark.parametrize("implementation", [i.key for i in implementations.IMPLEMENTATIONS])
def test_setup(run_case, implementation):
    run_case("5", implementation)
