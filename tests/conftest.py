"""Shared pytest configuration."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def float64_scalar_state():
    """torch.optim keeps scalar state (``step``, NAdam's ``mu_product``, ASGD's ``eta`` and
    ``mu``) in the default dtype: float64 makes torch's own reference exact enough to compare
    at float64 tolerances. Test files that compare with torch.optim use it for every test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
