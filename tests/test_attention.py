"""Second-order inner loops through scaled-dot-product attention (issue 12, part 1).

torch's fused attention kernels (flash on CPU; flash, memory-efficient, cuDNN on CUDA) have
no double backward.  Every path that needs second-order gradients must run attention on
the math backend, and give the meta-gradient of a hand-written reference run on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import higher_func as hf
from higher_func.func import FunctionalModel, MetaObjective, meta_loss

DTYPE = torch.float64
LR = 0.1
TOL = {"rtol": 1e-10, "atol": 1e-12}


class SelfAttention(nn.Module):
    """A hand-made attention block calling F.scaled_dot_product_attention directly."""

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim).mean(1))


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), Pool())


class Pool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)[:, :3]


MODELS: dict[str, Callable[[], nn.Module]] = {
    "sdpa-module": SelfAttention,
    "nn.TransformerEncoder": transformer_encoder,
}


def batch(tasks: int | None = None) -> tuple[Tensor, Tensor]:
    lead = () if tasks is None else (tasks,)
    return torch.randn(*lead, 4, 5, 8, dtype=DTYPE), torch.randint(0, 3, (*lead, 4))


def reference_meta_gradient(model: nn.Module, support: Any, query: Any, steps: int) -> list[Tensor]:
    """MAML by hand: functional_call + autograd.grad(create_graph=True), on math attention."""
    params = dict(model.named_parameters())
    fast = params
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, support[0]), support[1])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - LR * g for (name, p), g in zip(fast.items(), grads, strict=True)}
        query_loss = F.cross_entropy(functional_call(model, fast, query[0]), query[1])
        return list(torch.autograd.grad(query_loss, list(params.values())))


def drop_in_meta_gradient(model: nn.Module, support: Any, query: Any, steps: int) -> list[Tensor]:
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(support[0]), support[1]))
        F.cross_entropy(fmodel(query[0]), query[1]).backward()
    return [p.grad for p in model.parameters()]


def assert_close_lists(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_drop_in_second_order_equals_math_reference(name: str) -> None:
    model = MODELS[name]().to(DTYPE)
    support, query = batch(), batch()
    expected = reference_meta_gradient(model, support, query, steps=2)
    assert_close_lists(drop_in_meta_gradient(model, support, query, steps=2), expected)


def test_without_rerouting_the_fused_kernel_has_no_double_backward() -> None:
    """The failure the rerouting exists for (so the tests above test something)."""
    model = SelfAttention().to(DTYPE)
    with (
        hf.set_double_backward_attention(False),
        pytest.raises(RuntimeError, match="derivative for .*attention.* is not implemented"),
    ):
        drop_in_meta_gradient(model, batch(), batch(), steps=1)
    assert hf.is_double_backward_attention_enabled()


@pytest.mark.parametrize("name", MODELS)
def test_functional_second_order_equals_math_reference(name: str) -> None:
    model = MODELS[name]().to(DTYPE)
    f = FunctionalModel(model)
    support, query = batch(), batch()

    def loss(p: Any, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(f(p, None, x), y)

    value = meta_loss(loss, hf.optim.sgd(lr=LR), f.params, support, query, steps=2)
    actual = torch.autograd.grad(value, list(f.params.values()))
    assert_close_lists(list(actual), reference_meta_gradient(model, support, query, steps=2))


@pytest.mark.parametrize("name", MODELS)
def test_batched_second_order_equals_math_reference(name: str) -> None:
    model = MODELS[name]().to(DTYPE)
    support, query = batch(tasks=3), batch(tasks=3)
    objective = MetaObjective(model, torch.optim.SGD(model.parameters(), lr=LR), F.cross_entropy)
    _, grads = objective.value_and_grad(support, query, reduction="sum")
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for task in range(3):
        task_support = (support[0][task], support[1][task])
        task_query = (query[0][task], query[1][task])
        for total, g in zip(
            expected, reference_meta_gradient(model, task_support, task_query, 1), strict=True
        ):
            total += g
    assert_close_lists(list(grads.values()), expected)


SEEN: list[bool] = []


class FlagRecorder(nn.Module):
    """Records in SEEN whether torch's fused flash backend is allowed at each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        SEEN.clear()

    def forward(self, x: Tensor) -> Tensor:
        SEEN.append(torch.backends.cuda.flash_sdp_enabled())
        return self.linear(x)


@pytest.mark.parametrize(
    ("options", "fused_allowed"),
    [
        ({"copy_initial_weights": False}, False),
        ({"copy_initial_weights": False, "first_order": True}, True),
        ({"track_higher_grads": False}, True),
    ],
)
def test_only_second_order_drop_in_loops_leave_the_fused_kernels(
    options: dict[str, Any], fused_allowed: bool
) -> None:
    model = FlagRecorder().to(DTYPE)
    x = torch.randn(3, 2, dtype=DTYPE)
    with hf.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=LR), **options) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(fmodel(x).sum())
        fmodel(x)
    assert [fused_allowed, fused_allowed] == SEEN
    assert torch.backends.cuda.flash_sdp_enabled()  # restored


@pytest.mark.parametrize(("first_order", "fused_allowed"), [(False, False), (True, True)])
def test_functional_support_forwards_leave_the_fused_kernels_only_when_needed(
    first_order: bool, fused_allowed: bool
) -> None:
    model = FlagRecorder().to(DTYPE)
    f = FunctionalModel(model)
    x = torch.randn(3, 2, dtype=DTYPE)

    def loss(p: Any, x: Tensor) -> Tensor:
        return f(p, None, x).sum()

    meta_loss(loss, hf.optim.sgd(lr=LR), f.params, x, x, steps=2, first_order=first_order)
    # two support forwards, then the query forward (first order only: fused kernels allowed)
    assert [fused_allowed, fused_allowed, True] == SEEN
    with torch.no_grad():
        SEEN.clear()
        f(f.params, None, x)
    assert SEEN == [True]


def test_the_switch_restores_the_flags_after_an_error() -> None:
    model = SelfAttention().to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with (
        hf.innerloop_ctx(model, opt) as (fmodel, _),
        pytest.raises(RuntimeError, match="shape"),
    ):
        fmodel(torch.randn(2, 5, 7, dtype=DTYPE))
    assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()


def test_the_switch_checks_its_argument() -> None:
    with pytest.raises(TypeError, match=r"expected a bool, got str.*Pass True"):
        hf.set_double_backward_attention("math")  # type: ignore[arg-type]
    hf.set_double_backward_attention(False)
    try:
        assert not hf.is_double_backward_attention_enabled()
    finally:
        hf.set_double_backward_attention(True)
    assert hf.is_double_backward_attention_enabled()


@pytest.mark.slow
def test_compiled_batched_second_order_through_attention_equals_eager() -> None:
    model = SelfAttention().to(DTYPE)
    support, query = batch(tasks=3), batch(tasks=3)
    objective = MetaObjective(model, torch.optim.SGD(model.parameters(), lr=LR), F.cross_entropy)
    value, grads = objective.value_and_grad(support, query)
    fast = hf.func.compiled(objective.value_and_grad, backend="aot_eager")
    compiled_value, compiled_grads = fast(support, query)
    torch.testing.assert_close(compiled_value, value, **TOL)
    assert_close_lists(list(compiled_grads.values()), list(grads.values()))


@pytest.mark.slow
def test_compiled_innerloop_second_order_through_attention_equals_the_reference() -> None:
    model = SelfAttention().to(DTYPE)
    support, query = batch(), batch()
    expected = reference_meta_gradient(model, support, query, steps=1)

    def adapt(fmodel: Any, diffopt: Any, support: Any, query: Any) -> Tensor:
        diffopt.step(F.cross_entropy(fmodel(support[0]), support[1]))
        return F.cross_entropy(fmodel(query[0]), query[1])

    fast = hf.func.compiled_innerloop(adapt, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        fast(fmodel, diffopt, support, query).backward()
    assert_close_lists([p.grad for p in model.parameters()], expected)
