"""Forward-mode hypergradients: exact, with live memory that stays flat in the inner steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import higher_func as hf
from higher_func.func import FunctionalModel, hypergradient_forward, meta_loss

from live_memory import LiveTensorBytes
from optimizer_cases import CASE_IDS, CASES, OptimizerCase

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def problem(width: int = 6, n: int = 8) -> tuple[Any, Any, Any, Any]:
    model = FunctionalModel(
        nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1)).to(DTYPE)
    )
    x = torch.randn(2, n, 3, dtype=DTYPE)
    y = torch.sin(x.sum(-1, keepdim=True))

    def loss(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((model(params, None, x) - y) ** 2).mean()

    params = {name: p.detach() for name, p in model.params.items()}
    return loss, params, (x[0], y[0]), (x[1], y[1])


def learnable(case: OptimizerCase) -> str:
    """A hyperparameter every step reads (Rprop reads its learning rate in init only)."""
    return "lr" if "lr" not in case.factory().spec.init_only else "etas"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jvp_of_the_meta_loss_equals_reverse_mode(case: OptimizerCase) -> None:
    loss, params, support, query = problem()
    rule = case.factory(**case.option_sets[-1])
    name = learnable(case)
    start = rule.hyperparameters[name]
    hyper = torch.tensor(start, dtype=DTYPE)

    def of(h: torch.Tensor) -> torch.Tensor:
        value = tuple(h) if isinstance(start, tuple) else h
        return meta_loss(
            loss, rule, params, support, query, steps=max(3, case.gradcheck_steps),
            hyperparameters={name: value},
        )  # fmt: skip

    reverse = torch.func.grad(of)(hyper)
    forward = torch.func.jacfwd(of)(hyper)
    torch.testing.assert_close(forward, reverse, **TOL)
    assert reverse.abs().sum() > 0


def test_hypergradient_forward_equals_reverse_for_a_schedule_and_several_hyperparameters() -> None:
    loss, params, support, query = problem()
    lrs = torch.linspace(0.01, 0.03, 5, dtype=DTYPE)
    decay = torch.tensor(0.1, dtype=DTYPE)

    def validation(h: dict[str, torch.Tensor]) -> torch.Tensor:
        return meta_loss(
            loss, hf.optim.adamw(lr=0.01), params, support, query, steps=5,
            hyperparameters=lambda k: {"lr": h["lrs"][k], "weight_decay": h["decay"]},
        )  # fmt: skip

    hyper = {"lrs": lrs, "decay": decay}
    reverse = torch.func.grad(validation)(hyper)
    for chunk_size in (1, 2, None):
        value, forward = hypergradient_forward(validation, hyper, chunk_size=chunk_size)
        torch.testing.assert_close(value, validation(hyper), **TOL)
        for key in hyper:
            assert forward[key].shape == hyper[key].shape
            torch.testing.assert_close(forward[key], reverse[key], **TOL)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: hypergradient_forward(lambda h: h, [1.0]), TypeError, "floating-point tensor"),
        (lambda: hypergradient_forward(lambda h: h, {}), TypeError, "got no tensors"),
        (lambda: hypergradient_forward(len, torch.ones(2)), TypeError, "scalar tensor"),
        (lambda: hypergradient_forward(None, torch.ones(2)), TypeError, "must be callable"),
        (
            lambda: hypergradient_forward(lambda h: h.sum(), torch.ones(2), chunk_size=0),
            ValueError,
            "chunk_size",
        ),
    ],
)
def test_hypergradient_forward_rejects_bad_arguments(call: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def peak_live_bytes(run: Any) -> int:
    with LiveTensorBytes() as meter:
        run()
    return meter.peak


@pytest.mark.slow
def test_forward_mode_live_memory_is_flat_in_the_number_of_steps() -> None:
    loss, params, support, query = problem(width=16, n=32)

    def forward(steps: int) -> None:
        def of_lr(lr: torch.Tensor) -> torch.Tensor:
            return meta_loss(
                loss, hf.optim.adam(lr=0.01), params, support, query, steps=steps,
                hyperparameters={"lr": lr},
            )  # fmt: skip

        lr, one = torch.tensor(0.01, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
        torch.func.jvp(of_lr, (lr,), (one,))

    def reverse(steps: int) -> None:
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        meta_loss(loss, hf.optim.adam(lr=0.01), theta, support, query, steps=steps).backward()

    short, long = peak_live_bytes(lambda: forward(3)), peak_live_bytes(lambda: forward(24))
    # The inner losses (8 bytes a step) are all that accumulate.
    assert long <= short + 8 * 24 + 1024, (short, long)
    # The check can fail: reverse mode keeps a graph per step.
    assert peak_live_bytes(lambda: reverse(24)) > 3 * peak_live_bytes(lambda: reverse(3))


@pytest.mark.slow
def test_recompute_live_memory_grows_by_the_iterates_only() -> None:
    loss, params, support, query = problem(width=16, n=64)
    per_iterate = 3 * sum(p.numel() * p.element_size() for p in params.values())  # w, m, v

    def recomputed(steps: int) -> None:
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        rule = hf.optim.adam(lr=0.01)
        meta_loss(loss, rule, theta, support, query, steps=steps, recompute=True).backward()

    short, long = peak_live_bytes(lambda: recomputed(3)), peak_live_bytes(lambda: recomputed(24))
    # 21 more stored iterates (each with its 0-d step counters), nothing else.
    assert long - short <= 21 * per_iterate * 1.15, (short, long, per_iterate)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_ad_dual_tensors_stay_finite_at_a_zero_second_moment(case: OptimizerCase) -> None:
    mask = torch.tensor([0.0, 1.0], dtype=DTYPE)  # the first coordinate's gradient is 0

    def loss(params: Any, target: torch.Tensor) -> torch.Tensor:
        return (((params["w"] - target) * mask) ** 2).sum()

    params, target = {"w": torch.tensor([0.5, -0.3], dtype=DTYPE)}, torch.tensor([1.0, 2.0])
    rule = case.factory(**case.option_sets[0])
    name = learnable(case)
    start = rule.hyperparameters[name]

    def of(h: torch.Tensor) -> torch.Tensor:
        value = tuple(h) if isinstance(start, tuple) else h
        steps = max(3, case.gradcheck_steps)
        hyper = {name: value}
        return meta_loss(loss, rule, params, target, target, steps=steps, hyperparameters=hyper)

    hyper = torch.tensor(start, dtype=DTYPE)
    with fwAD.dual_level():
        dual = fwAD.make_dual(hyper, torch.ones_like(hyper))
        tangent = fwAD.unpack_dual(of(dual)).tangent
    expected = torch.func.grad(of)(hyper).sum()
    assert torch.isfinite(tangent)
    torch.testing.assert_close(tangent, expected, **TOL)
