"""Property-based parity: random hyperparameters and shapes, every rule equals torch.optim."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer_cases import CASE_IDS, CASES, OptimizerCase

unit = st.floats(0.0, 0.99)
positive = st.floats(1e-4, 0.5)

#: Random, valid values for each numeric or boolean option.
OPTION_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "lr": positive,
    "momentum": unit,
    "dampening": unit,
    "weight_decay": st.floats(0.0, 0.3),
    "betas": st.tuples(unit, unit),
    "eps": st.floats(1e-8, 1e-2),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
    "decoupled_weight_decay": st.booleans(),
    "lr_decay": st.floats(0.0, 0.1),
    "initial_accumulator_value": st.floats(0.0, 0.5),
    "rho": unit,
    "lambd": st.floats(0.0, 0.1),
    "alpha": st.floats(0.1, 0.99),
    "t0": st.floats(0.0, 5.0),
    "centered": st.booleans(),
    "etas": st.tuples(st.floats(0.1, 0.9), st.floats(1.1, 2.0)),
    "step_sizes": st.tuples(st.floats(1e-6, 1e-3), st.floats(0.01, 1.0)),
    "momentum_decay": st.floats(0.0, 0.02),
}


def options_for(case: OptimizerCase) -> st.SearchStrategy[dict[str, Any]]:
    accepted = inspect.signature(case.torch_class).parameters
    names = [n for n in case.factory().hyperparameters if n in OPTION_STRATEGIES and n in accepted]
    return st.fixed_dictionaries({n: OPTION_STRATEGIES[n] for n in names})


pytestmark = pytest.mark.usefixtures("float64_scalar_state")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_random_options_and_shapes_match_torch(case: OptimizerCase) -> None:
    @settings(max_examples=8, deadline=None)
    @given(
        options=options_for(case),
        shapes=st.lists(st.lists(st.integers(1, 3), max_size=3), min_size=1, max_size=3),
        seed=st.integers(0, 2**16),
    )
    def check(options: dict[str, Any], shapes: list[list[int]], seed: int) -> None:
        if options.get("nesterov") and not options.get("momentum"):
            return
        if case.name == "sgd" and options.get("dampening") and not options.get("momentum"):
            options = {**options, "dampening": 0.0}
        generator = torch.Generator().manual_seed(seed)
        params = {f"p{i}": torch.randn(s, generator=generator) for i, s in enumerate(shapes)}
        reference = [p.clone().requires_grad_() for p in params.values()]
        optimizer = case.torch_class(reference, **options)
        rule = case.factory(**options)
        state = rule.init(params)
        for _ in range(4):
            grads = {k: torch.randn(p.shape, generator=generator) for k, p in params.items()}
            for p, g in zip(reference, grads.values(), strict=True):
                p.grad = g
            optimizer.step()
            params, state = rule.step(params, grads, state)
        for ours, theirs in zip(params.values(), reference, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)

    check()
