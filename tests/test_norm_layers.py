"""Exact meta-gradients through batch, layer and group norms under vmap.

torch's fused norm kernels give wrong second-order gradients under vmap
(pytorch/functorch#534); higher_func runs these layers as decomposed tensor math.  Each
case is checked against a per-task loop on the native modules (no vmap) and against
central finite differences of the batched meta-loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_vmap import per_task_meta_loss
from torch import nn

import higher_func as hf
from higher_func._norm import batch_norm, exact_norms, group_norm, layer_norm
from higher_func.func import FunctionalModel, batched_meta_loss

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}

NORM_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "batchnorm1d": (
        lambda: nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)),
        (3,),
    ),
    "batchnorm1d_sequence": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2)
        ),
        (2, 5),
    ),
    "batchnorm2d": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)
        ),
        (1, 5, 5),
    ),
    "layernorm": (
        lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2)),
        (3,),
    ),
    "groupnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)
        ),
        (1, 5, 5),
    ),
}


def tasks(count: int, shots: int, input_shape: tuple[int, ...]) -> tuple[Any, Any]:
    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randn(count, shots, *input_shape, dtype=DTYPE),
            torch.randn(count, shots, 2, dtype=DTYPE),
        )

    return batch(), batch()


def batched(model: nn.Module, rule: Any, params: Any, support: Any, query: Any) -> torch.Tensor:
    f = FunctionalModel(model)

    def loss(p: Any, buffers: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        out, buffers = f.with_buffers(p, buffers, x)
        return F.mse_loss(out, y), buffers

    return batched_meta_loss(loss, rule, params, support, query, steps=2, buffers=f.buffers)


def with_scaled_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so eval mode differs from batch statistics."""
    for name, buffer in model.named_buffers():
        if "running" in name:
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(NORM_MODELS))
def test_batched_meta_gradient_equals_per_task_loop(name: str, training: bool) -> None:
    build, input_shape = NORM_MODELS[name]
    model = with_scaled_stats(build().to(DTYPE)).train(training)
    params = dict(model.named_parameters())
    support, query = tasks(3, 4, input_shape)
    rule = hf.optim.sgd(lr=0.3, momentum=0.9)
    value = batched(model, rule, params, support, query)
    reference = per_task_meta_loss(model, rule, params, support, query, steps=2)
    torch.testing.assert_close(value, reference, **TOL)
    for a, e in zip(
        torch.autograd.grad(value, list(params.values())),
        torch.autograd.grad(reference, list(params.values())),
        strict=True,
    ):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("name", sorted(NORM_MODELS))
def test_batched_meta_gradient_matches_central_differences(name: str) -> None:
    build, input_shape = NORM_MODELS[name]
    model = build().to(DTYPE)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    support, query = tasks(3, 4, input_shape)
    rule = hf.optim.sgd(lr=0.3, momentum=0.5)  # smooth in params: finite differences converge
    direction = {n: torch.randn_like(p) for n, p in params.items()}

    def along(eps: float) -> float:
        moved = {n: p.detach() + eps * direction[n] for n, p in params.items()}
        return float(batched(model, rule, moved, support, query))

    grads = torch.autograd.grad(batched(model, rule, params, support, query), list(params.values()))
    analytic = sum(float((g * direction[n]).sum()) for g, n in zip(grads, params, strict=True))

    def central(h: float) -> float:
        return (along(h) - along(-h)) / (2 * h)

    h = 1e-4
    numeric = (4 * central(h / 2) - central(h)) / 3  # Richardson: error O(h**4)
    assert analytic == pytest.approx(numeric, rel=1e-8, abs=1e-10)


def test_running_statistics_follow_the_native_module() -> None:
    """Buffers returned by with_buffers equal a native module's in-place updates."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3)).to(DTYPE)
    native = copy.deepcopy(model)
    f = FunctionalModel(model)
    untouched = {n: b.clone() for n, b in model.named_buffers()}
    buffers = f.buffers
    for _ in range(3):
        x = torch.randn(4, 1, 5, 5, dtype=DTYPE)
        out, buffers = f.with_buffers(f.params, buffers, x)
        torch.testing.assert_close(out, native(x), **TOL)
    for name, expected in native.named_buffers():
        torch.testing.assert_close(buffers[name], expected, **TOL)
        torch.testing.assert_close(
            dict(model.named_buffers())[name], untouched[name], rtol=0, atol=0
        )
    assert int(buffers["1.num_batches_tracked"]) == 3


def test_running_statistics_are_threaded_through_the_batched_inner_loop() -> None:
    """Per-task running stats after K steps equal the per-task native module's."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DTYPE)
    f = FunctionalModel(model)
    (xs, ys), _ = tasks(2, 5, (3,))

    def loss(p: Any, buffers: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        out, buffers = f.with_buffers(p, buffers, x)
        return F.mse_loss(out, y), buffers

    def adapt(x: torch.Tensor, y: torch.Tensor) -> Any:
        rule = hf.optim.sgd(lr=0.1)
        return hf.func.inner_loop(loss, rule, f.params, x, y, steps=3, buffers=f.buffers).buffers

    buffers = torch.func.vmap(adapt)(xs, ys)
    for task in range(2):
        native = copy.deepcopy(model)
        fast = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
        for _ in range(3):
            out = torch.func.functional_call(native, fast, (xs[task],))
            grads = torch.autograd.grad(F.mse_loss(out, ys[task]), list(fast.values()))
            fast = {n: p - 0.1 * g for (n, p), g in zip(fast.items(), grads, strict=True)}
        for name, expected in native.named_buffers():
            torch.testing.assert_close(buffers[name][task], expected, **TOL)


def test_cumulative_moving_average_momentum_none() -> None:
    model = nn.BatchNorm1d(3, momentum=None).to(DTYPE)
    native = copy.deepcopy(model)
    f = FunctionalModel(model)
    buffers = f.buffers
    for _ in range(3):
        x = torch.randn(4, 3, dtype=DTYPE)
        _, buffers = f.with_buffers(f.params, buffers, x)
        native(x)
    torch.testing.assert_close(buffers["running_var"], native.running_var, **TOL)


DECOMPOSED = [
    (
        "batch_norm_train",
        lambda x, w, b: batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
        (4, 3, 2),
        3,
    ),
    (
        "batch_norm_eval",
        lambda x, w, b: batch_norm(
            x, torch.full((3,), 0.2, dtype=DTYPE), torch.full((3,), 1.5, dtype=DTYPE), w, b, False
        ),
        lambda x, w, b: F.batch_norm(
            x, torch.full((3,), 0.2, dtype=DTYPE), torch.full((3,), 1.5, dtype=DTYPE), w, b, False
        ),
        (4, 3),
        3,
    ),
    (
        "layer_norm",
        lambda x, w, b: layer_norm(x, [2, 3], w, b),
        lambda x, w, b: F.layer_norm(x, [2, 3], w, b),
        (4, 2, 3),
        (2, 3),
    ),
    (
        "group_norm",
        lambda x, w, b: group_norm(x, 2, w, b),
        lambda x, w, b: F.group_norm(x, 2, w, b),
        (3, 4, 2),
        4,
    ),
]


@pytest.mark.parametrize(
    ("name", "decomposed", "native", "shape", "affine"), DECOMPOSED, ids=[d[0] for d in DECOMPOSED]
)
def test_decomposed_norms_equal_torch_to_second_order(
    name: str, decomposed: Callable[..., Any], native: Callable[..., Any], shape: Any, affine: Any
) -> None:
    x = torch.randn(*shape, dtype=DTYPE, requires_grad=True)
    w = torch.randn(affine, dtype=DTYPE, requires_grad=True)
    b = torch.randn(affine, dtype=DTYPE, requires_grad=True)
    torch.testing.assert_close(decomposed(x, w, b), native(x, w, b), **TOL)
    assert torch.autograd.gradgradcheck(decomposed, (x, w, b))
    v = torch.randn(*shape, dtype=DTYPE)

    def hessian_vector(fn: Callable[..., Any]) -> tuple[torch.Tensor, ...]:
        (gx,) = torch.autograd.grad((fn(x, w, b) ** 3 * v).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.sum(), (x, w, b))

    for a, e in zip(hessian_vector(decomposed), hessian_vector(native), strict=True):
        torch.testing.assert_close(a, e, **TOL)


def test_exact_norms_reroutes_modules_and_leaves_buffers() -> None:
    bn = nn.BatchNorm1d(3).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    with exact_norms() as updates:
        out = bn(x)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True), **TOL)
    assert bool((bn.running_mean == 0).all())
    torch.testing.assert_close(updates.pairs[0][1], 0.1 * x.mean(0), **TOL)


def test_one_example_per_channel_in_training_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match=r"num_channels \(3\) must be divisible"):
        group_norm(torch.randn(2, 3), 2)


class CustomNorm(nn.Module):
    """A user-defined layer calling F.layer_norm directly (no nn.LayerNorm inside)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3, width)
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.layer_norm(self.linear(x), [self.gain.shape[0]], self.gain))


def test_user_defined_layers_calling_norm_functions_are_rerouted() -> None:
    model = nn.Sequential(CustomNorm(5), nn.Linear(5, 2)).to(DTYPE)
    assert FunctionalModel(model).reroute_norms
    assert not FunctionalModel(nn.Sequential(nn.Linear(3, 2), nn.ReLU())).reroute_norms
    params = dict(model.named_parameters())
    support, query = tasks(3, 4, (3,))
    rule = hf.optim.sgd(lr=0.3)
    value = batched(model, rule, params, support, query)
    reference = per_task_meta_loss(model, rule, params, support, query, steps=2)
    for a, e in zip(
        torch.autograd.grad(value, list(params.values())),
        torch.autograd.grad(reference, list(params.values())),
        strict=True,
    ):
        torch.testing.assert_close(a, e, **TOL)
