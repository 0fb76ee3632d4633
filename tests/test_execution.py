"""The execution planner (``higher_func._execution``): its decisions, and that every plan
computes the same values (float64, bit for bit between flat and per-tensor steps)."""

from __future__ import annotations

import dataclasses
from typing import Any

import optree
import pytest
import torch
from torch import nn

import higher_func as hf
from higher_func import _execution
from higher_func._execution import Plan, plan
from higher_func._flat_groups import _FlatState
from higher_func._versions import COMPILED_INNER_LOOPS

from torch_versions import needs_torch

FLOAT32 = 4


def recorded(*sizes: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(n, dtype=dtype, requires_grad=True) for n in sizes]


def grads_for(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.ones_like(t).detach() for t in tensors]


def not_elementwise(rule: Any) -> Any:
    """``rule`` declared as mixing elements across a tensor (as a norm-based rule would)."""
    return hf.optim.make_rule(
        dataclasses.replace(rule.spec, elementwise=False), rule.hyperparameters
    )


def group_plan(tensors: list[torch.Tensor], rule: Any = None) -> Plan:
    return plan(tensors, grads_for(tensors), rule=rule or hf.optim.adam())


# --------------------------------------------------------------------------- decisions


def test_a_recorded_group_of_small_tensors_is_stepped_flat() -> None:
    assert group_plan(recorded(40, 40, 1600, 1)) is Plan.FLAT
    momentum = hf.optim.sgd(lr=0.1, momentum=0.9)
    assert group_plan(recorded(*[64] * 100), momentum) is Plan.FLAT


def test_a_group_of_large_tensors_is_stepped_per_tensor_on_the_cpu() -> None:
    elements = _execution.FLAT_MAX_MEAN_BYTES // FLOAT32
    assert group_plan(recorded(elements, elements)) is Plan.FLAT
    assert group_plan(recorded(elements, elements + 2)) is Plan.PER_TENSOR
    # The mean counts, not the largest: many small tensors pay for one large one ...
    assert group_plan(recorded(elements + 100, *[1] * 100)) is Plan.FLAT
    # ... up to the total size, above which memory traffic dominates at any mean size.
    many = _execution.FLAT_MAX_BYTES // _execution.FLAT_MAX_MEAN_BYTES
    assert group_plan(recorded(*[elements] * many)) is Plan.FLAT
    assert group_plan(recorded(*[elements] * (many + 1))) is Plan.PER_TENSOR


def test_the_size_limits_count_bytes_so_float64_groups_split_sooner() -> None:
    elements = _execution.FLAT_MAX_MEAN_BYTES // FLOAT32
    assert group_plan(recorded(elements, elements)) is Plan.FLAT
    assert group_plan(recorded(elements, elements, dtype=torch.float64)) is Plan.PER_TENSOR


@pytest.mark.parametrize(
    ("why", "tensors", "rule"),
    [
        ("one tensor", recorded(4), hf.optim.adam()),
        ("stateless SGD: one op per tensor anyway", recorded(4, 4), hf.optim.sgd(lr=0.1)),
        ("mixed dtypes", [*recorded(4), *recorded(4, dtype=torch.float64)], hf.optim.adam()),
        ("integer tensors", [torch.zeros(2, dtype=torch.long)] * 2, hf.optim.adam()),
        ("per-parameter lr", recorded(4, 4), hf.optim.adam(lr={"a": 0.1})),
        ("a rule that is not elementwise", recorded(4, 4), not_elementwise(hf.optim.adam())),
    ],
)
def test_groups_that_cannot_or_should_not_be_flat_are_per_tensor(
    why: str, tensors: list[torch.Tensor], rule: Any
) -> None:
    assert plan(tensors, grads_for(tensors), rule=rule) is Plan.PER_TENSOR, why


def test_a_group_with_a_missing_gradient_is_per_tensor() -> None:
    tensors = recorded(4, 4)
    assert plan(tensors, [torch.ones(4), None], rule=hf.optim.adam()) is Plan.PER_TENSOR


def test_a_non_contiguous_group_is_per_tensor() -> None:
    weight = torch.zeros(4, 3, requires_grad=True)
    tensors = [weight.t(), *recorded(4)]
    assert plan(tensors, grads_for(tensors), rule=hf.optim.adam()) is Plan.PER_TENSOR


def test_pure_rule_steps_take_foreach_only_where_nothing_is_recorded() -> None:
    plain = [torch.ones(2), torch.ones(3)]
    assert plan(plain) is Plan.FOREACH
    assert plan(plain[:1]) is Plan.PER_TENSOR
    leaf = torch.ones(2, requires_grad=True)
    assert plan([leaf, *plain]) is Plan.PER_TENSOR  # a recorded foreach op costs memory
    assert plan(plain, others=[leaf]) is Plan.PER_TENSOR  # e.g. a learned learning rate
    assert plan(plain, [leaf.detach(), leaf]) is Plan.PER_TENSOR  # a recorded gradient
    with torch.no_grad():
        assert plan([leaf, *plain], others=[leaf]) is Plan.FOREACH
    sparse = [torch.ones(2).to_sparse(), torch.ones(3).to_sparse()]
    assert plan(sparse) is Plan.PER_TENSOR


def test_others_are_read_only_when_the_plan_depends_on_them() -> None:
    read = []

    def others():
        read.append(True)
        yield torch.ones(1)

    plan(recorded(2, 2), others=others())
    assert read == []
    plan([torch.ones(2), torch.ones(2)], others=others())
    assert read == [True]


def test_a_group_without_recording_is_left_to_the_rules_own_plan() -> None:
    tensors = [torch.ones(2), torch.ones(3)]
    assert plan(tensors, grads_for(tensors), rule=hf.optim.adam()) is Plan.PER_TENSOR
    assert plan(tensors) is Plan.FOREACH  # what Rule.step then decides


def test_under_vmap_and_grad_every_step_is_per_tensor() -> None:
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        pair = [x, x * 2]
        seen.append((plan(pair), plan(pair, [x, x], rule=hf.optim.adam())))
        return x.sum()

    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.grad(probe)(torch.ones(2))
    assert seen == [(Plan.PER_TENSOR, Plan.PER_TENSOR)] * 2
    assert not _execution.under_transform()


@needs_torch(COMPILED_INNER_LOOPS, "torch.compile of higher_func's steps")
def test_under_torch_compile_every_step_is_per_tensor() -> None:
    def probe(x: torch.Tensor) -> torch.Tensor:
        pair = [x, x * 2]
        flat = plan(pair, [x, x], rule=hf.optim.adam()) is Plan.FLAT
        batched = plan([x.detach(), x.detach()]) is Plan.FOREACH
        return x + (2.0 if flat or batched else 1.0)

    x = torch.ones(2, requires_grad=True)
    assert probe(x).tolist() == [3.0, 3.0]  # eager: flat
    compiled = torch.compile(probe, backend="eager", fullgraph=True)
    assert compiled(x).tolist() == [2.0, 2.0]


# --------------------------------------------------------------------------- same values


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def meta_gradient(
    optimizer: Any, limit: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list, list, list]:
    """Fast weights, state and meta-gradient of 4 tracked steps, float64, with groups up
    to ``limit`` bytes stepped flat."""
    monkeypatch.setattr(_execution, "FLAT_MAX_BYTES", limit)
    torch.manual_seed(0)
    net = Net().double()
    opt = optimizer(net.parameters())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        flat = [isinstance(s, _FlatState) for s in diffopt._states]
        ((fmodel(x) - y) ** 2).mean().backward()
        weights = [p.detach() for p in fmodel.parameters()]
        state = [
            v.detach()
            for group in diffopt.state
            for entry in group.values()
            for v in entry.values()
        ]
    assert flat == [limit > 0]
    return weights, state, [p.grad for p in net.parameters()]


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.5),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flat_and_per_tensor_steps_give_identical_results(
    name: str, monkeypatch: pytest.MonkeyPatch, float64_scalar_state: None
) -> None:
    flat = meta_gradient(OPTIMIZERS[name], 2**30, monkeypatch)
    per_tensor = meta_gradient(OPTIMIZERS[name], -1, monkeypatch)
    for a, b in zip(flat, per_tensor, strict=True):
        assert len(a) == len(b) > 0
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("recording", [True, False], ids=["recorded", "not-recorded"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_step_list_with_the_group_plan_gives_step_s_values(name, recording):
    """The drop-in path (``group_plan`` made once, passed to ``Rule.step_list``) computes
    what ``Rule.step`` planning for itself computes, bit for bit, a missing gradient
    included; without recording the group plan leaves the choice (foreach) to the rule."""
    rule = hf.optim.sgd(lr=0.1, momentum=0.9) if name == "sgd" else hf.optim.adam()
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=recording) for s in ((3, 2), (4,), (5,))]
    grads = [torch.randn(3, 2), None, torch.randn(5)]
    state = rule.init(params)
    how = _execution.group_plan(params, grads, rule, flat=False)
    assert how is (Plan.PER_TENSOR if recording else None)
    for _ in range(2):
        expected = rule.step(params, grads, state)
        got = rule.step_list(params, grads, state, how)
        got_leaves, expected_leaves = optree.tree_leaves(got), optree.tree_leaves(expected)
        assert len(got_leaves) == len(expected_leaves) > 3
        assert all(map(torch.equal, got_leaves, expected_leaves))
        assert got[0][1] is params[1]  # no gradient: unchanged
        params, state = got
    with pytest.raises(ValueError, match="same structure as params"):
        rule.step_list(params, grads[:2], state, how)
