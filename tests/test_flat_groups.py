"""Flat parameter groups: while autograd records the steps, a group of same-dtype dense
parameters with an elementwise, stateful rule is stepped as one flat tensor.

The flat path must be invisible: values equal to torch.optim, meta-gradients equal to the
per-parameter rule, and every transition (a missing gradient, a changed hyperparameter,
truncation, replaced fast weights, untracked steps) as if the group had never been flat.
Float64; exact checks at rtol 1e-12, finite differences (central, h = 1e-6) at 1e-7.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

import higher_func as hf
from higher_func._flat_groups import _FlatState

from optimizer_cases import CASES, OPTION_CASES, OPTION_IDS, OptimizerCase

RTOL, ATOL = 1e-12, 1e-14
FD_TOL = 1e-7
STEPS = 4

#: Two groups over the parameters out of ``model.parameters()`` order, shapes mixed.
GROUPS = (("b.weight", "a.weight", "scale"), ("a.bias", "empty", "b.bias"))

#: Plain SGD keeps no state: it never steps flat (tested apart).
FLAT_CASES = [
    (case, options)
    for case, options in OPTION_CASES
    if case.torch_class is not torch.optim.SGD or options.get("momentum", 0)
]
FLAT_IDS = [i for i, (c, o) in zip(OPTION_IDS, OPTION_CASES, strict=True) if (c, o) in FLAT_CASES]
#: One option set per optimizer (the last stateful one) for the transition tests.
ONE_PER_CLASS = {case.torch_class: (case, options) for case, options in FLAT_CASES}
TRANSITION_CASES = list(ONE_PER_CLASS.values())
TRANSITION_IDS = [case.name for case, _ in TRANSITION_CASES]
ADAM = next(case for case in CASES if case.torch_class is torch.optim.Adam)
SGD = next(case for case in CASES if case.torch_class is torch.optim.SGD)
RMSPROP = next(case for case in CASES if case.torch_class is torch.optim.RMSprop)


class Net(nn.Module):
    """Six parameters of five shapes, a 0-d and an empty one included; ``use_bias=False``
    leaves ``b.bias`` out of the loss (its gradient is then None)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.tensor(1.2))
        self.empty = nn.Parameter(torch.zeros(0, 3))

    def forward(self, x: torch.Tensor, use_bias: bool = True) -> torch.Tensor:
        hidden = torch.tanh(self.a(x)).to(self.b.weight.dtype)
        bias = self.b.bias if use_bias else None
        out = nn.functional.linear(hidden, self.b.weight, bias).to(x.dtype) * self.scale
        return out + self.empty.sum()


pytestmark = pytest.mark.usefixtures("float64_scalar_state")


def make_net(seed: int = 1) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def batches(count: int, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 3, generator=generator), torch.randn(5, 2, generator=generator))
        for _ in range(count)
    ]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def group_options(case: OptimizerCase, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Group 0 takes ``options``; group 1 the same at half the learning rate."""
    lr = options.get("lr", case.factory().hyperparameters["lr"])
    return [dict(options), {**options, "lr": 0.5 * lr}]


def make_opt(
    case: OptimizerCase,
    net: nn.Module,
    options: dict[str, Any],
    names: Sequence[Sequence[str]] = GROUPS,
) -> torch.optim.Optimizer:
    """``case``'s optimizer over ``names`` with ``options`` as its defaults (torch's Adagrad
    reads ``initial_accumulator_value`` from them only) and the groups of
    :func:`group_options`."""
    params = dict(net.named_parameters())
    per_group = group_options(case, options)
    groups = [{"params": [params[n] for n in names[0]]}]
    groups += [
        {"params": [params[n] for n in group], "lr": per_group[1]["lr"]} for group in names[1:]
    ]
    return case.torch_class(groups, **options)


def flat_override(case: OptimizerCase, options: dict[str, Any]) -> dict[str, Any] | None:
    """torch fills Adagrad's state when it is built, and imported state stays per parameter;
    overriding the option that state is made from (with the same value) discards it, so that
    Adagrad's rule is stepped flat too (see test_a_fresh_adagrad_steps_flat)."""
    if case.torch_class is not torch.optim.Adagrad:
        return None
    return {
        "initial_accumulator_value": [torch.tensor(options.get("initial_accumulator_value", 0.0))]
    }


def flat_groups(diffopt: Any) -> list[bool]:
    return [isinstance(state, _FlatState) for state in diffopt._states]


def assert_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=RTOL, atol=ATOL)


def torch_step(net: Net, opt: torch.optim.Optimizer, x, y, use_bias: bool = True) -> list:
    opt.zero_grad()
    mse(net(x, use_bias), y).backward()
    opt.step()
    return [p.detach().clone() for p in net.parameters()]


def central_difference(f: Callable[[float], float], x: float, h: float = 1e-6) -> float:
    return (f(x + h) - f(x - h)) / (2 * h)


class CountCat(TorchFunctionMode):
    """Counts ``torch.cat`` calls: a flat step concatenates its weights and gradients, unless
    the fmodel still holds the views of its last step: then it steps those flat weights, with
    the gradient autograd assembled for them (no ``cat``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.cat:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def rule_reference(
    theta: dict[str, torch.Tensor],
    case: OptimizerCase,
    options: dict[str, Any],
    data: list,
    *,
    lr: torch.Tensor | None = None,
    names: Sequence[Sequence[str]] = GROUPS,
    use_bias: Sequence[bool] | None = None,
    edit: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
    truncate_at: int | None = None,
) -> dict[str, torch.Tensor]:
    """The inner loop with the pure rules stepped per parameter (a dict keyed by name).

    ``lr`` replaces every group's learning rate; ``edit(t, name, p)`` replaces the weights
    before step ``t``; ``truncate_at`` detaches weights and state before that step.
    Returns the final weights (differentiable).
    """
    net = make_net()
    per_group = group_options(case, options)
    if lr is not None:
        per_group = [{**o, "lr": lr} for o in per_group]
    rules = [case.factory(**o, arithmetic="higher") for o in per_group]  # the drop-in's
    phi = dict(theta)
    states = [rule.init({n: phi[n] for n in g}) for rule, g in zip(rules, names, strict=True)]
    for t, (x, y) in enumerate(data):
        if edit is not None:
            phi = {n: edit(t, n, p) for n, p in phi.items()}
        if t == truncate_at:
            phi = {n: p.detach().requires_grad_(p.requires_grad) for n, p in phi.items()}
            states = [optree.tree_map(torch.Tensor.detach, s) for s in states]
        kwargs = {"use_bias": use_bias[t]} if use_bias is not None else {}
        loss = mse(functional_call(net, phi, (x,), kwargs), y)
        trainable = [n for n, p in phi.items() if p.requires_grad]
        found = torch.autograd.grad(
            loss, [phi[n] for n in trainable], create_graph=True, allow_unused=True
        )
        grads = dict.fromkeys(phi) | dict(zip(trainable, found, strict=True))
        for g, (rule, group) in enumerate(zip(rules, names, strict=True)):
            new, states[g] = rule.step(
                {n: phi[n] for n in group}, {n: grads[n] for n in group}, states[g]
            )
            phi.update(new)
    for state, group in zip(states, names, strict=True):  # the reference is per parameter
        columns = [getattr(state, f) for f in state._fields if getattr(state, f) is not None]
        assert columns and all(set(column) == set(group) for column in columns)
    return phi


def reference_meta_gradient(
    case: OptimizerCase,
    options: dict[str, Any],
    data: list,
    query: tuple[torch.Tensor, torch.Tensor],
    layout: Callable[[Net], Any] | None = None,
    **kwargs: Any,
) -> list[torch.Tensor]:
    """d query loss / d (initial trainable weights), through :func:`rule_reference`."""
    net = make_net()
    if layout is not None:
        layout(net)
    theta = {
        n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in net.named_parameters()
    }
    phi = rule_reference(theta, case, options, data, **kwargs)
    outer = mse(functional_call(net, phi, (query[0],)), query[1])
    return list(torch.autograd.grad(outer, [p for p in theta.values() if p.requires_grad]))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("case", "options"), FLAT_CASES, ids=FLAT_IDS)
def test_flat_groups_equal_torch_and_the_per_parameter_meta_gradient(case, options):
    data, (xq, yq) = batches(STEPS), batches(1, seed=3)[0]
    reference = make_net()
    ref_opt = make_opt(case, reference, options)

    net = make_net()
    opt = make_opt(case, net, options)
    override = flat_override(case, options)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False, override=override) as (
        fmodel,
        diffopt,
    ):
        for x, y in data:
            new = diffopt.step(mse(fmodel(x), y))
            assert flat_groups(diffopt) == [True, True]
            for state in diffopt._states:  # the new fast weights are views of the flat tensor
                assert all(v._base is state.params for v in state.views)
            assert_close(new, torch_step(reference, ref_opt, x, y))
        mse(fmodel(xq), yq).backward()

    expected = reference_meta_gradient(case, options, data, (xq, yq))
    assert_close([p.grad for p in net.parameters()], expected)
    assert all(bool(g.abs().sum() > 0) for g in expected if g.numel())


def test_a_fresh_adagrad_steps_flat():
    """torch.optim.Adagrad fills its state (step 0) when built: the imported state flattens."""
    net = make_net()
    with hf.innerloop_ctx(net, torch.optim.Adagrad(net.parameters(), lr=0.1)) as (fm, diffopt):
        x, y = batches(1)[0]
        diffopt.step(mse(fm(x), y))
        assert flat_groups(diffopt) == [True]


# --------------------------------------------------------------------------- transitions


@pytest.mark.parametrize(("case", "options"), TRANSITION_CASES, ids=TRANSITION_IDS)
def test_a_missing_gradient_after_flat_steps_continues_per_parameter_like_torch(case, options):
    use_bias = [True, True, False, True, True]
    data, (xq, yq) = batches(len(use_bias)), batches(1, seed=3)[0]
    reference = make_net()
    ref_opt = make_opt(case, reference, options)

    net = make_net()
    opt = make_opt(case, net, options)
    override = flat_override(case, options)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False, override=override) as (
        fmodel,
        diffopt,
    ):
        for t, ((x, y), bias) in enumerate(zip(data, use_bias, strict=True)):
            new = diffopt.step(mse(fmodel(x, bias), y))
            # b.bias (group 1) has no gradient at step 2: group 1 is per parameter from then on.
            assert flat_groups(diffopt) == [True, t < 2]
            assert_close(new, torch_step(reference, ref_opt, x, y, bias))
        assert_state_equals_torch(diffopt, ref_opt)
        mse(fmodel(xq), yq).backward()

    expected = reference_meta_gradient(case, options, data, (xq, yq), use_bias=use_bias)
    assert_close([p.grad for p in net.parameters()], expected)


def assert_state_equals_torch(diffopt: Any, opt: torch.optim.Optimizer) -> None:
    """``diffopt.state`` is torch's state, key for key (step counts included)."""
    assert len(diffopt.state) == len(opt.param_groups)
    for view, group in zip(diffopt.state, opt.param_groups, strict=True):
        assert sorted(view) == [j for j, p in enumerate(group["params"]) if p in opt.state]
        for j, p in enumerate(group["params"]):
            if p not in opt.state:
                continue
            assert set(view[j]) == set(opt.state[p])
            for key, value in opt.state[p].items():
                torch.testing.assert_close(
                    view[j][key].detach().to(value.dtype), value, rtol=RTOL, atol=ATOL
                )


@pytest.mark.parametrize(("case", "options"), FLAT_CASES, ids=FLAT_IDS)
def test_state_after_flat_steps_is_torchs_and_write_back_lets_torch_continue(case, options):
    data = batches(STEPS + 2)
    reference = make_net()
    ref_opt = make_opt(case, reference, options)
    expected = [torch_step(reference, ref_opt, x, y) for x, y in data]

    net = make_net()
    opt = make_opt(case, net, options)
    with hf.innerloop_ctx(net, opt, override=flat_override(case, options)) as (fmodel, diffopt):
        for x, y in data[:STEPS]:
            diffopt.step(mse(fmodel(x), y))
        assert flat_groups(diffopt) == [True, True]
        checkpoint = make_net()
        checkpoint_opt = make_opt(case, checkpoint, options)
        for x, y in data[:STEPS]:
            torch_step(checkpoint, checkpoint_opt, x, y)
        assert_state_equals_torch(diffopt, checkpoint_opt)
        hf.write_back_module(fmodel, net)
        hf.write_back_optimizer(diffopt, opt)
    for (x, y), after in zip(data[STEPS:], expected[STEPS:], strict=True):
        assert_close(torch_step(net, opt, x, y), after)


def test_a_learned_lr_given_after_flat_steps_keeps_the_groups_flat_and_its_hypergradient_exact():
    data, (xq, yq) = batches(STEPS), batches(1, seed=3)[0]
    options = {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}

    def meta_loss(lr: Any, record: list | None = None) -> torch.Tensor:
        net = make_net()
        opt = make_opt(ADAM, net, options)
        with hf.innerloop_ctx(net, opt) as (fmodel, diffopt):
            for t, (x, y) in enumerate(data):
                diffopt.step(mse(fmodel(x), y), override={"lr": [lr]} if t == 2 else None)
                if record is not None:
                    record.append(flat_groups(diffopt))
            return mse(fmodel(xq), yq), fmodel.fast_params

    lr = torch.tensor(0.03, requires_grad=True)
    record: list = []
    loss, fast = meta_loss(lr, record)
    assert record == [[True, True]] * STEPS
    (hypergradient,) = torch.autograd.grad(loss, [lr])
    assert hypergradient != 0
    expected = central_difference(lambda v: meta_loss(v)[0].item(), 0.03)
    assert abs(hypergradient.item() - expected) < FD_TOL

    reference = make_net()
    ref_opt = make_opt(ADAM, reference, options)
    for t, (x, y) in enumerate(data):
        if t == 2:
            for group in ref_opt.param_groups:
                group["lr"] = 0.03
        torch_step(reference, ref_opt, x, y)
    assert_close(fast, list(reference.parameters()))


SGD_MOMENTUM = {"lr": 0.1, "dampening": 0.3, "weight_decay": 0.05}


@pytest.mark.parametrize(
    ("case", "options", "momenta", "flat"),
    [
        pytest.param(SGD, SGD_MOMENTUM, (0.9, 0.9, 0.5, 0.5), (True,) * 4, id="sgd-changed"),
        pytest.param(
            SGD, SGD_MOMENTUM, (0.9, 0.9, 0.0, 0.0), (True, True, False, False), id="sgd-off"
        ),
        # The per-parameter state that momentum 0.9 refits with a buffer flattens.
        pytest.param(
            SGD, SGD_MOMENTUM, (0.0, 0.0, 0.9, 0.9), (False, False, True, True), id="sgd-on"
        ),
        # Like torch, the buffer is kept (not updated) while momentum is 0, then resumed.
        pytest.param(
            SGD,
            SGD_MOMENTUM,
            (0.9, 0.0, 0.9, 0.9),
            (True, False, True, True),
            id="sgd-off-and-on-again",
        ),
        # The refit keeps the averages and the (now unused) buffer, as torch does.
        pytest.param(
            RMSPROP,
            {"lr": 0.01, "centered": True},
            (0.5, 0.5, 0.0, 0.0),
            (True,) * 4,
            id="rmsprop-off",
        ),
        pytest.param(
            RMSPROP,
            {"lr": 0.01, "centered": True},
            (0.5, 0.0, 0.5, 0.5),
            (True,) * 4,
            id="rmsprop-off-and-on-again",
        ),
    ],
)
def test_momentum_changed_by_override_matches_torch(case, options, momenta, flat):
    data, (xq, yq) = batches(len(momenta)), batches(1, seed=3)[0]
    options = {**options, "momentum": momenta[0]}
    reference = make_net()
    ref_opt = make_opt(case, reference, options)
    net = make_net()
    opt = make_opt(case, net, options)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for (x, y), momentum, expected_flat in zip(data, momenta, flat, strict=True):
            for group in ref_opt.param_groups:
                group["momentum"] = momentum
            diffopt.step(mse(fmodel(x), y), override={"momentum": [momentum]})
            assert flat_groups(diffopt) == [expected_flat] * 2
            assert_close(fmodel.fast_params, torch_step(reference, ref_opt, x, y))
        mse(fmodel(xq), yq).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(bool(p.grad.abs().sum() > 0) for p in net.parameters() if p.numel())


@pytest.mark.parametrize(
    ("case", "options"),
    [(ADAM, {"lr": 0.01, "amsgrad": True}), (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True})],
    ids=["adam", "sgd-nesterov"],
)
def test_truncation_after_flat_steps_cuts_the_meta_gradient_there(case, options):
    data, (xq, yq) = batches(STEPS), batches(1, seed=3)[0]
    reference = make_net()
    ref_opt = make_opt(case, reference, options)
    for group in ref_opt.param_groups:  # the override below sets every group's lr
        group["lr"] = options["lr"]
    lr = torch.tensor(options["lr"], requires_grad=True)

    net = make_net()
    opt = make_opt(case, net, options)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False, override={"lr": [lr]}) as (
        fmodel,
        diffopt,
    ):
        for t, (x, y) in enumerate(data):
            if t == 2:
                hf.truncate(fmodel, diffopt)
                assert flat_groups(diffopt) == [True, True]
                assert all(p.grad_fn is None for p in fmodel.fast_params)
            with CountCat() as count:
                diffopt.step(mse(fmodel(x), y))
            # Truncated weights are new tensors: the step after truncation concatenates them.
            assert count.calls == (4 if t in (0, 2) else 0)
            assert flat_groups(diffopt) == [True, True]
            assert_close(fmodel.fast_params, torch_step(reference, ref_opt, x, y))
        loss = mse(fmodel(xq), yq)
    grads = torch.autograd.grad(loss, [lr, *net.parameters()], allow_unused=True)
    assert all(g is None for g in grads[1:])  # nothing reaches back past the truncation

    lr_ref = torch.tensor(options["lr"], requires_grad=True)
    theta = {n: p.detach().clone().requires_grad_() for n, p in make_net().named_parameters()}
    phi = rule_reference(theta, case, options, data, lr=lr_ref, truncate_at=2)
    (expected,) = torch.autograd.grad(mse(functional_call(make_net(), phi, (xq,)), yq), [lr_ref])
    assert expected != 0
    assert_close(grads[:1], [expected])


def perturb_one(t: int, name: str, p: torch.Tensor) -> torch.Tensor:
    return p + 0.01 if t == 2 and name == "b.weight" else p


def copy_all(t: int, name: str, p: torch.Tensor) -> torch.Tensor:
    return p * 1.0 if t == 2 else p


def perturb_all(t: int, name: str, p: torch.Tensor) -> torch.Tensor:
    return p - 0.02 if t == 2 else p


@pytest.mark.parametrize(
    ("edit", "cats"),
    [(copy_all, 4), (perturb_all, 4), (perturb_one, 2)],
    ids=["copies", "all-perturbed", "one-perturbed"],
)
@pytest.mark.parametrize(("case", "options"), TRANSITION_CASES[:2], ids=TRANSITION_IDS[:2])
def test_fast_weights_replaced_between_steps_are_concatenated_again(case, options, edit, cats):
    data, (xq, yq) = batches(STEPS), batches(1, seed=3)[0]
    reference = make_net()
    ref_opt = make_opt(case, reference, options)

    net = make_net()
    opt = make_opt(case, net, options)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for t, (x, y) in enumerate(data):
            fast = fmodel.fast_params
            fmodel.fast_params = [
                edit(t, n, p) for n, p in zip(fmodel.param_names, fast, strict=True)
            ]
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    p.copy_(edit(t, n, p))
            with CountCat() as count:
                diffopt.step(mse(fmodel(x), y))
            # Two cats per group (weights, gradients) at the first step and after the edit,
            # none while the fmodel still holds the views of the last step.
            assert count.calls == (4 if t == 0 else cats if t == 2 else 0)
            assert flat_groups(diffopt) == [True, True]
            assert_close(fmodel.fast_params, torch_step(reference, ref_opt, x, y))
        mse(fmodel(xq), yq).backward()

    expected = reference_meta_gradient(case, options, data, (xq, yq), edit=edit)
    assert_close([p.grad for p in net.parameters()], expected)


def test_without_an_fmodel_the_returned_views_are_stepped_again_without_a_copy():
    data, (xq, yq) = batches(STEPS), batches(1, seed=3)[0]
    options = {"lr": 0.01, "amsgrad": True}
    reference = make_net()
    ref_opt = make_opt(ADAM, reference, options)

    net = make_net()
    initial = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    order = [n for group in GROUPS for n in group]  # reference_params: the groups' order
    lrs = [g["lr"] for g in group_options(ADAM, options)]
    groups = [
        {"params": [initial[n] for n in group], "lr": lr}
        for group, lr in zip(GROUPS, lrs, strict=True)
    ]
    diffopt = hf.create_diff_optim(torch.optim.Adam, options, params=groups)
    current = [initial[n] for n in order]
    for t, (x, y) in enumerate(data):
        loss = mse(functional_call(net, dict(zip(order, current, strict=True)), (x,)), y)
        with CountCat() as count:
            current = diffopt.step(loss, params=current)
        assert count.calls == (4 if t == 0 else 0)
        assert flat_groups(diffopt) == [True, True]
        expected = dict(zip(initial, torch_step(reference, ref_opt, x, y), strict=True))
        assert_close(current, [expected[n] for n in order])

    outer = mse(functional_call(net, dict(zip(order, current, strict=True)), (xq,)), yq)
    grads = torch.autograd.grad(outer, list(initial.values()))
    assert_close(grads, reference_meta_gradient(ADAM, options, data, (xq, yq)))


def test_a_grad_callback_changes_the_gradients_of_flat_steps_too():
    """Reused flat weights come with a gradient autograd assembled; a callback that changes
    the gradients (clipping) must still be what the step sees."""
    data = batches(STEPS)
    options = {"lr": 0.01}
    reference = make_net()
    ref_opt = make_opt(ADAM, reference, options)
    net = make_net()
    opt = make_opt(ADAM, net, options)
    clip = hf.clip_grad_value(0.01)
    with hf.innerloop_ctx(net, opt, grad_callback=clip) as (fmodel, diffopt):
        for x, y in data:
            ref_opt.zero_grad()
            mse(reference(x), y).backward()
            assert max(p.grad.abs().max() for p in reference.parameters() if p.numel()) > 0.01
            torch.nn.utils.clip_grad_value_(reference.parameters(), 0.01)
            ref_opt.step()
            diffopt.step(mse(fmodel(x), y))
            assert flat_groups(diffopt) == [True, True]
            assert_close(fmodel.fast_params, list(reference.parameters()))


# --------------------------------------------------------------------------- per-parameter groups


def frozen_bias(net: Net) -> tuple[tuple[str, ...], ...]:
    net.a.bias.requires_grad_(False)
    return GROUPS


def single_parameter_group(net: Net) -> tuple[tuple[str, ...], ...]:
    return (("b.weight",), ("a.weight", "a.bias", "b.bias", "scale", "empty"))


def mixed_dtypes(net: Net) -> tuple[tuple[str, ...], ...]:
    net.b.float()
    return GROUPS


@pytest.mark.parametrize(
    ("layout", "flat"),
    [
        (frozen_bias, [True, False]),
        (single_parameter_group, [False, True]),
        (mixed_dtypes, [False, False]),
    ],
    ids=["frozen", "single-parameter", "mixed-dtypes"],
)
@pytest.mark.parametrize(("case", "options"), TRANSITION_CASES[:2], ids=TRANSITION_IDS[:2])
def test_groups_that_do_not_qualify_stay_per_parameter_and_match(case, options, layout, flat):
    data, (xq, yq) = batches(STEPS), batches(1, seed=3)[0]
    reference = make_net()
    names = layout(reference)
    ref_opt = make_opt(case, reference, options, names)

    net = make_net()
    layout(net)
    opt = make_opt(case, net, options, names)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in data:
            new = diffopt.step(mse(fmodel(x), y))
            assert flat_groups(diffopt) == flat
            expected = torch_step(reference, ref_opt, x, y)
            for a, e in zip(new, expected, strict=True):
                assert a.dtype == e.dtype
                # A float32 layer downstream turns last-bit differences of the float64
                # weights (the drop-in runs higher's two-op forms, torch.optim fused ops)
                # into float32-sized ones: only an all-float64 net compares at 1e-12.
                exact = e.dtype == torch.float64 and layout is not mixed_dtypes
                torch.testing.assert_close(
                    a.detach(), e, rtol=RTOL if exact else 1e-5, atol=ATOL if exact else 1e-6
                )
        mse(fmodel(xq), yq).backward()

    expected = reference_meta_gradient(case, options, data, (xq, yq), layout, names=names)
    assert_close([p.grad for p in net.parameters() if p.requires_grad], expected)


@pytest.mark.parametrize(
    "options", [{"lr": 0.1}, {"lr": 0.1, "weight_decay": 0.2, "maximize": True}]
)
def test_plain_sgd_stays_per_parameter_and_matches_torch(options):
    data = batches(STEPS)
    reference = make_net()
    ref_opt = make_opt(SGD, reference, options)
    net = make_net()
    opt = make_opt(SGD, net, options)
    with hf.innerloop_ctx(net, opt) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
            assert flat_groups(diffopt) == [False, False]
            assert_close(fmodel.fast_params, torch_step(reference, ref_opt, x, y))


def test_channels_last_weights_stay_per_parameter_and_keep_their_memory_format():
    def make() -> nn.Module:
        torch.manual_seed(4)
        conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 1)).double()
        return conv.to(memory_format=torch.channels_last)

    x = torch.randn(5, 2, 4, 4).to(memory_format=torch.channels_last)
    y = torch.randn(5, 1)
    reference = make()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    net = make()
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    with hf.innerloop_ctx(net, torch.optim.Adam(net.parameters(), lr=0.01)) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(x), y))
            assert flat_groups(diffopt) == [False]
            assert fmodel.fast_params[0].is_contiguous(memory_format=torch.channels_last)
            ref_opt.zero_grad()
            mse(reference(x), y).backward()
            ref_opt.step()
            assert_close(fmodel.fast_params, list(reference.parameters()))


# --------------------------------------------------------------------------- untracked steps


@pytest.mark.parametrize(
    ("mode", "flat"),
    [
        ("untracked", [False, False, False, False]),
        ("first_order", [False, False, False, False]),
        ("untracked_after_flat", [True, True, False, False]),
        ("tracked_again", [True, True, False, True]),
    ],
)
@pytest.mark.parametrize(("case", "options"), TRANSITION_CASES, ids=TRANSITION_IDS)
def test_untracked_steps_with_and_after_flat_steps_match_torch(case, options, mode, flat):
    data, (xq, yq) = batches(STEPS), batches(1, seed=3)[0]
    reference = make_net()
    ref_opt = make_opt(case, reference, options)

    net = make_net()
    opt = make_opt(case, net, options)
    context = hf.innerloop_ctx(
        net,
        opt,
        copy_initial_weights=False,
        override=flat_override(case, options),
        track_higher_grads=mode != "untracked",
        first_order=mode == "first_order",
    )
    with context as (fmodel, diffopt):
        for t, ((x, y), expected_flat) in enumerate(zip(data, flat, strict=True)):
            if mode in ("untracked_after_flat", "tracked_again") and t == 2:
                diffopt.track_higher_grads = False
            if mode == "tracked_again" and t == 3:
                diffopt.track_higher_grads = True
            diffopt.step(mse(fmodel(x), y))
            assert flat_groups(diffopt) == [expected_flat] * 2
            if not diffopt.track_higher_grads:
                leaves = optree.tree_leaves(diffopt._states)
                assert all(s.grad_fn is None for s in leaves if isinstance(s, torch.Tensor))
            assert_close(fmodel.fast_params, torch_step(reference, ref_opt, x, y))
        query = mse(fmodel(xq), yq)
        if mode == "first_order":
            # First-order MAML: the query-loss gradient at the adapted weights.
            expected = torch.autograd.grad(query, fmodel.fast_params, retain_graph=True)
            query.backward()
            assert_close([p.grad for p in net.parameters()], expected)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("case", [ADAM, SGD], ids=[ADAM.name, SGD.name])
def test_gradcheck_and_gradgradcheck_through_flat_steps(case):
    data, (xq, yq) = batches(2), batches(1, seed=3)[0]
    options = dict(case.tensor_hyperparameters)
    net = make_net()
    record: list = []

    def meta_loss(lr: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        opt = make_opt(case, net, options)
        with hf.innerloop_ctx(net, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            fmodel.fast_params = list(weights)
            for x, y in data:
                diffopt.step(mse(fmodel(x), y))
                record.append(flat_groups(diffopt))
            return mse(fmodel(xq), yq)

    inputs = (
        torch.tensor(options["lr"], requires_grad=True),
        *(p.detach().clone().requires_grad_() for p in net.parameters()),
    )
    assert torch.autograd.gradcheck(meta_loss, inputs)
    assert torch.autograd.gradgradcheck(meta_loss, inputs)
    assert record and all(r == [True, True] for r in record)


def test_gradients_are_checked_again_at_every_step_of_a_group_that_stepped_flat():
    """The planner trusts a flat group's weights and rule from its last flat step, never
    the gradients: a callback's float32 gradient after flat steps is refused as the
    per-parameter step refuses it, naming the parameter's place in its group (a flat step
    would have promoted it silently)."""
    data = batches(3)
    net = make_net()
    opt = make_opt(ADAM, net, {"lr": 0.01})
    scale = [name for name, _ in net.named_parameters()].index("scale")
    with hf.innerloop_ctx(net, opt) as (fmodel, diffopt):
        for x, y in data[:2]:
            diffopt.step(mse(fmodel(x), y))
        assert flat_groups(diffopt) == [True, True]
        x, y = data[2]

        def scale_in_float32(grads):
            return [g.float() if k == scale else g for k, g in enumerate(grads)]

        with pytest.raises(TypeError, match=r"grads\[2\] is torch.float32 but params\[2\]"):
            diffopt.step(mse(fmodel(x), y), grad_callback=scale_in_float32)
