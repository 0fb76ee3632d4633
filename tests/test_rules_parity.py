"""Every rule equals torch.optim: float64, 10+ steps, two groups, None gradients, imported state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import higher_func as hf

from optimizer_cases import (
    CASES,
    LOW_PRECISION_CASES,
    LOW_PRECISION_IDS,
    OPTION_CASES,
    OPTION_IDS,
    OptimizerCase,
)

STEPS = 12
TOLERANCE = 1e-10
SHAPES = {"w": (3, 4), "b": (4,), "v": (2, 2), "frozen": (3,)}


def make_params() -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, dtype=torch.float64) for name, shape in SHAPES.items()}


def make_grads(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor | None]:
    """Random gradients; ``frozen`` never gets one and ``v`` skips every third step."""
    grads: dict[str, torch.Tensor | None] = {
        name: torch.randn_like(p) for name, p in params.items() if name != "frozen"
    }
    grads["frozen"] = None
    if step % 3 == 2:
        grads["v"] = None
    if step == 4:  # an exactly zero gradient: second moments stay zero in places
        grads["b"] = torch.zeros_like(params["b"])
    return grads


def second_group(case: OptimizerCase, options: dict[str, Any]) -> dict[str, Any]:
    """Different hyperparameters for the second group: another lr (and weight decay)."""
    changed = {**options, "lr": 0.5 * options.get("lr", 1.0)}
    if "weight_decay" in case.factory().hyperparameters:
        changed["weight_decay"] = 0.05
    return changed


pytestmark = pytest.mark.usefixtures("float64_scalar_state")


GROUPS = (("w", "b"), ("v", "frozen"))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().clamp_min(1e-12)
    return ((ours - reference).abs().max() / scale).item()


def assert_matches_torch(
    torch_params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    groups: list[tuple[hf.optim.Rule, tuple[str, ...], Any]],
    params: dict[str, torch.Tensor],
) -> float:
    worst = 0.0
    for _rule, names, state in groups:
        for name in names:
            worst = max(worst, relative_error(params[name], torch_params[name].detach()))
            torch_state = optimizer.state.get(torch_params[name], {})
            for field in state._fields:
                tree = getattr(state, field)
                if tree is None or field not in torch_state:
                    continue
                theirs = torch.as_tensor(torch_state[field], dtype=torch.float64)
                worst = max(worst, relative_error(tree[name], theirs))
    assert worst <= TOLERANCE, f"relative error {worst:.3g} > {TOLERANCE}"
    return worst


def run_both(case: OptimizerCase, options: dict[str, Any], imported_after: int | None):
    """Step torch.optim and the rules side by side; optionally import torch's state midway."""
    params = make_params()
    torch_params = {n: p.clone().requires_grad_() for n, p in params.items()}
    group_options = (options, second_group(case, options))
    optimizer = case.torch_class(
        [
            {"params": [torch_params[n] for n in names], **opts}
            for names, opts in zip(GROUPS, group_options, strict=True)
        ],
        # Adagrad seeds its accumulators from the constructor's value, not the group's.
        **options,
    )
    groups = []
    for names, opts in zip(GROUPS, group_options, strict=True):
        rule = case.factory(**opts)
        groups.append((rule, names, rule.init({n: params[n] for n in names})))
    worst = 0.0
    for step in range(STEPS):
        grads = make_grads(params, step)
        for name, p in torch_params.items():
            p.grad = grads[name]
        optimizer.step()
        if imported_after is not None and step < imported_after:
            # Only torch steps; the rules import its state (and parameters) afterwards.
            params = {n: p.detach().clone() for n, p in torch_params.items()}
            if step == imported_after - 1:
                groups = [
                    (g.rule, g.names, g.state)
                    for g in hf.optim.from_torch_optimizer(optimizer, torch_params)
                ]
            continue
        new_groups = []
        for rule, names, state in groups:
            sub_params = {n: params[n] for n in names}
            sub_grads = {n: grads[n] for n in names}
            sub_params, state = rule.step(sub_params, sub_grads, state)
            params = {**params, **sub_params}
            new_groups.append((rule, names, state))
        groups = new_groups
        worst = max(worst, assert_matches_torch(torch_params, optimizer, groups, params))
    return worst


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
def test_equals_torch_optim(case: OptimizerCase, options: dict[str, Any]) -> None:
    run_both(case, options, imported_after=None)


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
def test_continues_from_a_stepped_torch_optimizer(
    case: OptimizerCase, options: dict[str, Any]
) -> None:
    run_both(case, options, imported_after=4)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_float32_stays_float32_and_close(case: OptimizerCase) -> None:
    torch.set_default_dtype(torch.float32)
    options = case.option_sets[0]
    p = torch.randn(5)
    reference = p.clone().requires_grad_()
    optimizer = case.torch_class([reference], **options)
    rule = case.factory(**options)
    params, state = {"p": p}, rule.init({"p": p})
    for _ in range(5):
        g = torch.randn(5)
        reference.grad = g
        optimizer.step()
        params, state = rule.step(params, {"p": g}, state)
    assert params["p"].dtype == torch.float32
    steps = state.step.values() if "step" in state._fields and state.step else []
    assert all(t.dtype == torch.float32 for t in steps)
    torch.testing.assert_close(params["p"], reference.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- low precision


def run_low_precision(
    case: OptimizerCase, options: dict[str, Any], dtype: torch.dtype, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` steps of torch.optim and of the rule in ``dtype`` (default dtype float32,
    so torch keeps its step counts in float32): the final parameters of both."""
    torch.set_default_dtype(torch.float32)
    p = torch.randn(16).to(dtype)
    grads = torch.randn(steps, 16).to(dtype)
    grads[3] = 0  # exactly zero moments in places
    reference = p.clone().requires_grad_()
    optimizer = case.torch_class([reference], **options)
    rule = case.factory(**options)
    params, state = {"p": p}, rule.init({"p": p})
    for g in grads:
        reference.grad = g
        optimizer.step()
        params, state = rule.step(params, {"p": g}, state)
    return params["p"], reference.detach()


def assert_low_precision_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Within one unit in the last place at the largest magnitude: what rounding may move.

    A step counter kept in bfloat16 stalls at 256 (Adam 10% off after 1,000 steps), a
    bias correction ``1 - beta2**t`` in bfloat16 rounds to 0 (NAdam, RAdam): far outside.
    """
    assert ours.dtype == theirs.dtype
    assert not ours.isnan().any()
    scale = theirs.float().abs().max().item()
    tolerance = torch.finfo(theirs.dtype).eps * scale
    error = (ours.float() - theirs.float()).abs().max().item()
    assert error <= tolerance, f"error {error:.3g} > {tolerance:.3g} (one ulp at {scale:.3g})"


FIRST_OPTIONS = [
    (case, options, dtype)
    for case, options, dtype in LOW_PRECISION_CASES
    if options is case.option_sets[0]
]
FIRST_IDS = [
    id_
    for (case, options, _), id_ in zip(LOW_PRECISION_CASES, LOW_PRECISION_IDS, strict=True)
    if options is case.option_sets[0]
]


@pytest.mark.parametrize(("case", "options", "dtype"), FIRST_OPTIONS, ids=FIRST_IDS)
def test_low_precision_equals_torch_optim_over_1000_steps(case, options, dtype) -> None:
    assert_low_precision_close(*run_low_precision(case, options, dtype, steps=1000))


@pytest.mark.slow
@pytest.mark.parametrize(("case", "options", "dtype"), LOW_PRECISION_CASES, ids=LOW_PRECISION_IDS)
def test_low_precision_equals_torch_optim_past_the_float16_counter_limit(
    case, options, dtype
) -> None:
    """2,100 steps: past 2,048, where a float16 step counter would stall."""
    assert_low_precision_close(*run_low_precision(case, options, dtype, steps=2100))
