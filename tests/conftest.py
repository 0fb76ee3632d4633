"""Shared pytest configuration."""

import pytest
import torch

from higher_func._versions import COMPILED_INNER_LOOPS

from optimizer_cases import OptimizerCase
from torch_versions import skip_reason


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip, with the torch version needed, every optimizer case whose options the
    installed torch lacks (e.g. Adam's ``decoupled_weight_decay`` before torch 2.7), and
    the doctests of ``higher_func._compile`` where compiling inner loops is refused."""
    compile_skip = skip_reason(COMPILED_INNER_LOOPS, "compiling inner loops")
    for item in items:
        if compile_skip and item.name.startswith("higher_func._compile."):  # its doctests
            item.add_marker(pytest.mark.skip(reason=compile_skip))
        params = getattr(getattr(item, "callspec", None), "params", {})
        case, options = params.get("case"), params.get("options")
        if isinstance(case, OptimizerCase) and isinstance(options, dict):
            reason = case.unsupported(options)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


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
