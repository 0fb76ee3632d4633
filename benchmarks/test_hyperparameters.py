"""Workload 4: hyperparameter learning through 20 unrolled Adam steps."""

import implementations
import pytest


@pytest.mark.parametrize("implementation", [i.key for i in implementations.IMPLEMENTATIONS])
def test_hyperparameters(run_case, implementation):
    run_case("4", implementation)
