"""The differentiable optimizers: equal to torch.optim, higher's interface, without its defects.

Float64 throughout; exact comparisons at 1e-10, finite differences (central, h = 1e-6) at 1e-7.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import higher_func as hf
from higher_func._rules._core import Rule
from higher_func._versions import ADAM_DECOUPLED_WEIGHT_DECAY

from optimizer_cases import OPTION_CASES, OPTION_IDS, OptimizerCase
from torch_versions import needs_torch

TOL = 1e-10
FD_TOL = 1e-7
STEPS = 10


class Net(nn.Module):
    """Two layers and a layer the forward never uses (its gradients are None)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


pytestmark = pytest.mark.usefixtures("float64_scalar_state")


def make_net(seed: int = 1) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def batches(count: int, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(5, 3, dtype=torch.float64, generator=generator),
            torch.randn(5, 2, dtype=torch.float64, generator=generator),
        )
        for _ in range(count)
    ]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def two_groups(net: Net, case: OptimizerCase, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Group 0: layer ``a`` and ``unused.weight``; group 1 (other lr): ``b`` and ``unused.bias``."""
    second = {**options, "lr": 0.5 * options.get("lr", case.factory().hyperparameters["lr"])}
    return [
        {"params": [*net.a.parameters(), net.unused.weight], **options},
        {"params": [*net.b.parameters(), net.unused.bias], **second},
    ]


def torch_steps(net: Net, opt: torch.optim.Optimizer, data: list) -> list[list[torch.Tensor]]:
    """Step ``opt`` over ``data``; the parameters after each step."""
    history = []
    for x, y in data:
        opt.zero_grad()
        mse(net(x), y).backward()
        opt.step()
        history.append([p.detach().clone() for p in net.parameters()])
    return history


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float = TOL):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach(), e, rtol=0, atol=tol)


def central_difference(f: Callable[[float], float], x: float, h: float = 1e-6) -> float:
    return (f(x + h) - f(x - h)) / (2 * h)


# --------------------------------------------------------------------------- parity with torch


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "first_order"])
def test_every_optimizer_equals_torch_over_ten_steps(case, options, track):
    data = batches(STEPS)
    reference = make_net()
    expected = torch_steps(reference, case.torch_class(two_groups(reference, case, options)), data)

    net = make_net()
    opt = case.torch_class(two_groups(net, case, options))
    with hf.innerloop_ctx(net, opt, track_higher_grads=track) as (fmodel, diffopt):
        for (x, y), after in zip(data, expected, strict=True):
            new = diffopt.step(mse(fmodel(x), y))
            assert_all_close(new, after)
            assert_all_close(fmodel.fast_params, after)


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
def test_state_of_a_torch_optimizer_that_already_stepped_is_imported(case, options):
    data = batches(8)
    reference = make_net()
    expected = torch_steps(reference, case.torch_class(two_groups(reference, case, options)), data)

    net = make_net()
    opt = case.torch_class(two_groups(net, case, options))
    torch_steps(net, opt, data[:3])
    state_before = {p: {k: copy.deepcopy(v) for k, v in s.items()} for p, s in opt.state.items()}
    with hf.innerloop_ctx(net, opt) as (fmodel, diffopt):
        for (x, y), after in zip(data[3:], expected[3:], strict=True):
            diffopt.step(mse(fmodel(x), y))
            assert_all_close(fmodel.fast_params, after)
    # Imported detached, nothing written back.
    for p, entry in opt.state.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state_before[p][key])
                assert value.grad_fn is None


def test_asgd_averaged_iterate_equals_torch():
    """Regression: higher averaged the parameter *before* its update."""
    data = batches(6)
    options = {"lr": 0.05, "t0": 2.0, "lambd": 0.01}
    reference = make_net()
    ref_opt = torch.optim.ASGD(reference.parameters(), **options)
    torch_steps(reference, ref_opt, data)
    net = make_net()
    with hf.innerloop_ctx(net, torch.optim.ASGD(net.parameters(), **options)) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
    used = [name for name, _ in net.named_parameters() if not name.startswith("unused")]
    positions = [i for i, (name, _) in enumerate(net.named_parameters()) if name in used]
    for position, p in zip(positions, [reference.get_parameter(n) for n in used], strict=True):
        torch.testing.assert_close(
            diffopt.state[0][position]["ax"], ref_opt.state[p]["ax"], rtol=0, atol=TOL
        )


@pytest.mark.parametrize(
    ("torch_class", "options"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "maximize": True}),
        (torch.optim.Adam, {"lr": 0.01, "maximize": True}),
        pytest.param(
            torch.optim.Adam,
            {"lr": 0.01, "weight_decay": 0.3, "decoupled_weight_decay": True},
            marks=needs_torch(ADAM_DECOUPLED_WEIGHT_DECAY, "Adam's decoupled_weight_decay"),
        ),
        (torch.optim.RMSprop, {"lr": 0.01, "maximize": True, "centered": True}),
    ],
    ids=["sgd-maximize", "adam-maximize", "adam-decoupled", "rmsprop-maximize"],
)
def test_options_higher_ignored_are_honoured(torch_class, options):
    """Regression: higher silently ignored ``maximize`` and ``decoupled_weight_decay``."""
    data = batches(4)
    reference = make_net()
    expected = torch_steps(reference, torch_class(reference.parameters(), **options), data)
    plain = {k: v for k, v in options.items() if k not in ("maximize", "decoupled_weight_decay")}
    ignored = torch_steps(make_net(), torch_class(make_net().parameters(), **plain), data)
    net = make_net()
    with hf.innerloop_ctx(net, torch_class(net.parameters(), **options)) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
    assert_all_close(fmodel.fast_params, expected[-1])
    assert not torch.allclose(expected[-1][0], ignored[-1][0])


def test_option_no_rule_implements_raises():
    class FancySGD(torch.optim.SGD):
        def __init__(self, params, lr=0.1, gradient_centralization=True):
            super().__init__(params, lr=lr)
            self.defaults["gradient_centralization"] = gradient_centralization
            for group in self.param_groups:
                group["gradient_centralization"] = gradient_centralization

    hf.register_optim(FancySGD, hf.optim.DifferentiableSGD)
    net = make_net()
    with pytest.raises(ValueError, match=r"\['gradient_centralization'\] have no differentiable"):
        hf.get_diff_optim(FancySGD(net.parameters()), net.parameters())


def test_metadata_keys_in_groups_are_ignored_like_torch():
    net = make_net()
    opt = torch.optim.SGD([{"params": net.parameters(), "name": "all"}], lr=0.1)
    diffopt = hf.get_diff_optim(opt, net.parameters())
    x, y = batches(1)[0]
    new = diffopt.step(mse(net(x), y), params=list(net.parameters()))
    opt.zero_grad()
    mse(net(x), y).backward()
    opt.step()
    assert_all_close(new, [p.detach() for p in net.parameters()])


# --------------------------------------------------------------------------- parameter groups


def test_parameters_in_no_group_are_returned_unchanged():
    net = make_net()
    opt = torch.optim.Adam([{"params": [net.a.weight]}, {"params": [net.b.bias], "lr": 0.5}])
    with hf.innerloop_ctx(net, opt) as (fmodel, diffopt):
        before = fmodel.fast_params
        x, y = batches(1)[0]
        after = diffopt.step(mse(fmodel(x), y))
    names = [name for name, _ in net.named_parameters()]
    for name, old, new in zip(names, before, after, strict=True):
        assert (new is old) == (name not in ("a.weight", "b.bias")), name


def test_step_calls_the_rule_once_per_group(monkeypatch):
    calls = []
    original = Rule._step_leaves  # what step and step_list (the drop-in's) both run

    def counting_step(self, leaves, *args, **kwargs):
        calls.append(len(leaves))
        return original(self, leaves, *args, **kwargs)

    monkeypatch.setattr(Rule, "_step_leaves", counting_step)
    net = make_net()
    opt = torch.optim.Adam(two_groups(net, OPTION_CASES[0][0], {}))
    with hf.innerloop_ctx(net, opt) as (fmodel, diffopt):
        x, y = batches(1)[0]
        diffopt.step(mse(fmodel(x), y))
    assert calls == [3, 3]


# --------------------------------------------------------------------------- override


def hyper_meta_loss(lrs: list[torch.Tensor | float], momentum: Any = 0.9) -> torch.Tensor:
    """Query loss after 3 SGD-momentum steps with per-group learning rates."""
    net = make_net()
    opt = torch.optim.SGD(
        [{"params": net.a.parameters()}, {"params": net.b.parameters()}], lr=0.1, momentum=0.9
    )
    data = batches(4)
    override = {"lr": lrs, "momentum": [momentum]}
    with hf.innerloop_ctx(net, opt, override=override) as (fmodel, diffopt):
        for x, y in data[:3]:
            diffopt.step(mse(fmodel(x), y))
        return mse(fmodel(data[3][0]), data[3][1])


def test_override_per_group_gives_hypergradients_equal_to_finite_differences():
    lr0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    lr1 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    momentum = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(hyper_meta_loss([lr0, lr1], momentum), [lr0, lr1, momentum])

    def f(which: int) -> Callable[[float], float]:
        def value(v: float) -> float:
            args = [0.3, 0.05, 0.7]
            args[which] = v
            return hyper_meta_loss(args[:2], args[2]).item()

        return value

    for which, (g, x) in enumerate(zip(grads, [0.3, 0.05, 0.7], strict=True)):
        assert abs(g.item() - central_difference(f(which), x)) < FD_TOL
    assert grads[0].item() != 0 and grads[1].item() != 0


def test_override_of_betas_as_a_tuple_of_tensors_gives_hypergradients():
    def meta_loss(beta1: Any, beta2: Any) -> torch.Tensor:
        net = make_net()
        data = batches(4)
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        with hf.innerloop_ctx(net, opt, override={"betas": [(beta1, beta2)]}) as (fm, diffopt):
            for x, y in data[:3]:
                diffopt.step(mse(fm(x), y))
            return mse(fm(data[3][0]), data[3][1])

    b1 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    g1, g2 = torch.autograd.grad(meta_loss(b1, b2), [b1, b2])
    assert abs(g1.item() - central_difference(lambda v: meta_loss(v, 0.9).item(), 0.8)) < FD_TOL
    assert abs(g2.item() - central_difference(lambda v: meta_loss(0.8, v).item(), 0.9)) < FD_TOL


@pytest.mark.parametrize(
    ("torch_class", "key", "value"),
    [(torch.optim.Adagrad, "initial_accumulator_value", 0.5), (torch.optim.Rprop, "lr", 0.05)],
)
def test_overriding_an_option_read_at_initialisation_gives_hypergradients(torch_class, key, value):
    """Adagrad builds its state eagerly; that state must not hide the override."""

    def meta_loss(v: Any) -> torch.Tensor:
        net = make_net()
        data = batches(4)
        with hf.innerloop_ctx(net, torch_class(net.parameters()), override={key: [v]}) as (
            fmodel,
            diffopt,
        ):
            for x, y in data[:3]:
                diffopt.step(mse(fmodel(x), y))
            return mse(fmodel(data[3][0]), data[3][1])

    v = torch.tensor(value, requires_grad=True)
    (g,) = torch.autograd.grad(meta_loss(v), [v])
    assert g != 0
    assert abs(g.item() - central_difference(lambda u: meta_loss(u).item(), value)) < FD_TOL


def test_override_persists_and_a_step_override_applies_from_that_step_on():
    data = batches(4)
    net = make_net()
    lrs = [0.1, 0.1, 0.02, 0.02]
    reference = make_net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for (x, y), lr in zip(data, lrs, strict=True):
        ref_opt.param_groups[0]["lr"] = lr
        torch_steps(reference, ref_opt, [(x, y)])
    opt = torch.optim.SGD(net.parameters(), lr=0.9)
    with hf.innerloop_ctx(net, opt, override={"lr": [0.1]}) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(data[0][0]), data[0][1]))
        diffopt.step(mse(fmodel(data[1][0]), data[1][1]))
        diffopt.step(mse(fmodel(data[2][0]), data[2][1]), override={"lr": [0.02]})
        diffopt.step(mse(fmodel(data[3][0]), data[3][1]))
    assert_all_close(fmodel.fast_params, [p.detach() for p in reference.parameters()])
    assert opt.param_groups[0]["lr"] == 0.9  # the torch optimizer is never modified


def test_changing_momentum_mid_loop_starts_a_buffer_like_torch():
    data = batches(4)
    reference = make_net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, dampening=0.3)
    torch_steps(reference, ref_opt, data[:2])
    ref_opt.param_groups[0]["momentum"] = 0.9
    torch_steps(reference, ref_opt, data[2:])
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, dampening=0.3)
    with hf.innerloop_ctx(net, opt) as (fmodel, diffopt):
        for i, (x, y) in enumerate(data):
            diffopt.step(mse(fmodel(x), y), override={"momentum": [0.9]} if i == 2 else None)
    assert_all_close(fmodel.fast_params, [p.detach() for p in reference.parameters()])


# --------------------------------------------------------------------------- grad_callback


def test_grad_callback_at_construction_and_per_step():
    data = batches(3)
    seen = []

    def halve(grads):
        return [None if g is None else 0.5 * g for g in grads]

    def spy(grads):
        seen.append(type(grads))
        return grads

    def zero(grads):
        return [None if g is None else 0 * g for g in grads]

    reference = make_net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)  # lr 0.1 on halved gradients
    torch_steps(reference, ref_opt, data[:1])
    ref_opt.param_groups[0]["lr"] = 0.1  # the per-step callback replaces halve
    torch_steps(reference, ref_opt, data[1:2])
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with hf.innerloop_ctx(net, opt, grad_callback=halve) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(data[0][0]), data[0][1]))
        diffopt.step(mse(fmodel(data[1][0]), data[1][1]), grad_callback=spy)
        assert_all_close(fmodel.fast_params, [p.detach() for p in reference.parameters()])
        assert seen == [tuple]  # a tuple in parameter order, None included, as in higher
        before = fmodel.fast_params
        diffopt.step(mse(fmodel(data[2][0]), data[2][1]), grad_callback=zero)
        assert_all_close(fmodel.fast_params, before)


def test_grad_callback_gradients_flow_through_it():
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def meta_loss(s: Any) -> torch.Tensor:
        net = make_net()
        data = batches(3)
        callback = lambda grads: [None if g is None else s * g for g in grads]  # noqa: E731
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.5)
        with hf.innerloop_ctx(net, opt, grad_callback=callback) as (fmodel, diffopt):
            for x, y in data[:2]:
                diffopt.step(mse(fmodel(x), y))
            return mse(fmodel(data[2][0]), data[2][1])

    (g,) = torch.autograd.grad(meta_loss(scale), [scale])
    assert abs(g.item() - central_difference(lambda v: meta_loss(v).item(), 0.5)) < FD_TOL


# --------------------------------------------------------------------------- frozen and first-order


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("copy_initial_weights", [True, False])
@pytest.mark.parametrize("torch_class", [torch.optim.SGD, torch.optim.Adam])
def test_frozen_parameters_stay_frozen_in_every_mode(track, copy_initial_weights, torch_class):
    """Regression: with track_higher_grads=False higher made frozen parameters trainable."""
    net = make_net()
    net.a.bias.requires_grad_(False)
    opt = torch_class(net.parameters(), lr=0.1)
    data = batches(3)
    with hf.innerloop_ctx(
        net, opt, copy_initial_weights=copy_initial_weights, track_higher_grads=track
    ) as (fmodel, diffopt):
        frozen = fmodel.fast_params[1]
        for x, y in data:
            params = diffopt.step(mse(fmodel(x), y))
            assert not params[1].requires_grad
            assert torch.equal(params[1], net.a.bias)
            assert params[0].requires_grad
    assert torch.equal(frozen, fmodel.fast_params[1])


def test_untracked_steps_keep_no_graph_in_params_or_state():
    """Regression: with track_higher_grads=False higher's optimizer state kept growing graphs."""
    net = make_net()
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)  # a graph source
    opt = torch.optim.Adam(net.parameters(), lr=0.01, amsgrad=True)
    with hf.innerloop_ctx(net, opt, override={"lr": [lr]}, track_higher_grads=False) as (
        fmodel,
        diffopt,
    ):
        for x, y in batches(5):
            params = diffopt.step(mse(fmodel(x), y))
            assert all(p.grad_fn is None and p.requires_grad for p in params)
            for group_state in diffopt.state:
                for entry in group_state.values():
                    assert all(not t.requires_grad for t in entry.values())
            assert all(p.grad_fn is None for p in diffopt.param_groups[0]["params"])


def test_tracked_steps_keep_the_graph_to_the_initial_weights():
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    data = batches(4)
    with hf.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in data[:3]:
            diffopt.step(mse(fmodel(x), y))
        mse(fmodel(data[3][0]), data[3][1]).backward()
    assert net.a.weight.grad is not None and net.a.weight.grad.abs().sum() > 0
    assert net.unused.weight.grad is None  # no loss uses it: never updated, no gradient


def test_setting_track_higher_grads_on_the_optimizer():
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    diffopt = hf.get_diff_optim(opt, net.parameters())
    assert diffopt.track_higher_grads is True
    diffopt.track_higher_grads = False
    x, y = batches(1)[0]
    params = diffopt.step(mse(net(x), y), params=list(net.parameters()))
    assert all(p.grad_fn is None for p in params)


# --------------------------------------------------------------------------- custom optimizers


class ScaledMomentum(torch.optim.Optimizer):
    """A torch optimizer that torch does not ship: ``b = mu b + g; p -= lr * scale * b``."""

    def __init__(self, params: Any, lr: float = 0.1, mu: float = 0.5, scale: float = 2.0):
        super().__init__(params, {"lr": lr, "mu": mu, "scale": scale})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buffer = state.get("buffer", torch.zeros_like(p))
                state["buffer"] = group["mu"] * buffer + p.grad
                p.sub_(group["lr"] * group["scale"] * state["buffer"])


class DifferentiableScaledMomentum(hf.optim.DifferentiableOptimizer):
    """Written for higher: reads ``self.state``, writes ``self.param_groups[i]['params'][j]``."""

    def _update(self, grouped_grads, **kwargs):
        assert self._fmodel is not None and isinstance(self._track_higher_grads, bool)
        assert len(self._group_to_param_list) == len(self.param_groups)
        zipped = zip(self.param_groups, grouped_grads, strict=True)
        for group_idx, (group, grads) in enumerate(zipped):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                buffer = state.get("buffer", torch.zeros_like(p))
                state["buffer"] = buffer = group["mu"] * buffer + g
                group["params"][p_idx] = p - group["lr"] * group["scale"] * buffer


def test_a_custom_optimizer_written_for_higher_keeps_working():
    hf.register_optim(ScaledMomentum, DifferentiableScaledMomentum)
    data = batches(6)
    reference = make_net()
    groups = lambda n: [{"params": n.a.parameters()}, {"params": n.b.parameters(), "lr": 0.05}]  # noqa: E731
    expected = torch_steps(reference, ScaledMomentum(groups(reference)), data)

    net = make_net()
    opt = ScaledMomentum(groups(net))
    torch_steps(net, opt, data[:2])  # its state is imported
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with hf.innerloop_ctx(net, opt, override={"lr": [lr, 0.05]}) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableScaledMomentum)
        for (x, y), after in zip(data[2:], expected[2:], strict=True):
            diffopt.step(mse(fmodel(x), y))
            assert_all_close(fmodel.fast_params, after)
        (g,) = torch.autograd.grad(mse(fmodel(data[0][0]), data[0][1]), [lr])
    assert g.abs() > 0
    # First-order: the custom state is detached too.
    with hf.innerloop_ctx(net, opt, override={"lr": [lr, 0.05]}, track_higher_grads=False) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(mse(fmodel(data[0][0]), data[0][1]))
        assert all(not e["buffer"].requires_grad for s in diffopt.state for e in s.values())


def test_registering_a_pure_rule_is_enough_for_the_drop_in():
    class MySGD(torch.optim.SGD):
        pass

    hf.optim.register_rule(MySGD, hf.optim.sgd)
    net = make_net()
    diffopt = hf.get_diff_optim(MySGD(net.parameters(), lr=0.1), net.parameters())
    assert type(diffopt) is hf.optim.DifferentiableRuleOptimizer


@pytest.fixture
def restored_registry():
    """The one registry as it was before the test (registrations are global)."""
    from higher_func._rules._registry import _REGISTRY

    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


class PlainDifferentiableSGD(hf.optim.DifferentiableOptimizer):
    def _update(self, grouped_grads, **kwargs):
        for group, grads in zip(self.param_groups, grouped_grads, strict=True):
            for j, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is not None:
                    group["params"][j] = p - group["lr"] * g


def test_one_registry_serves_register_optim_and_register_rule(restored_registry):
    class MySGD(torch.optim.SGD):
        pass

    class SubSGD(MySGD):
        pass

    net = make_net()
    drop_in = lambda cls: type(hf.get_diff_optim(cls(net.parameters(), lr=0.1), net.parameters()))  # noqa: E731
    hf.register_optim(MySGD, PlainDifferentiableSGD)
    assert drop_in(MySGD) is drop_in(SubSGD) is PlainDifferentiableSGD  # found through the MRO
    assert hf.optim.rule_factory(SubSGD) is hf.optim.sgd  # the nearest base with a rule
    assert MySGD not in hf.optim.supported_optimizers()  # a class, not a rule
    hf.optim.register_rule(MySGD, hf.optim.adam)
    assert hf.optim.rule_factory(SubSGD) is hf.optim.adam
    assert drop_in(SubSGD) is PlainDifferentiableSGD  # the rule does not replace the class
    assert MySGD in hf.optim.supported_optimizers()


def test_a_rule_for_a_subclass_takes_precedence_over_its_bases_class(restored_registry):
    class MyAdam(torch.optim.Adam):
        pass

    built = []

    def my_adam(**options):
        built.append(options)
        return hf.optim.adam(**options)

    net = make_net()
    hf.optim.register_rule(MyAdam, my_adam)
    del built[:]  # registering tried it once
    diffopt = hf.get_diff_optim(MyAdam(net.parameters(), lr=0.1), net.parameters())
    assert type(diffopt) is hf.optim.DifferentiableRuleOptimizer  # not DifferentiableAdam
    assert built and built[-1]["lr"] == 0.1


def test_opt_mapping_is_higher_s_dict_over_the_one_registry(restored_registry):
    class MySGD(torch.optim.SGD):
        pass

    mapping = hf.optim._opt_mapping
    assert mapping[torch.optim.SGD] is hf.optim.DifferentiableSGD
    assert torch.optim.RAdam in mapping and MySGD not in mapping
    mapping[MySGD] = PlainDifferentiableSGD  # what higher's register_optim did
    net = make_net()
    diffopt = hf.get_diff_optim(MySGD(net.parameters(), lr=0.1), net.parameters())
    assert type(diffopt) is PlainDifferentiableSGD and mapping[MySGD] is PlainDifferentiableSGD
    with pytest.raises(TypeError, match="diff_optim_type must be a subclass"):
        mapping[MySGD] = int
    with pytest.raises(TypeError, match="cannot be removed"):
        del mapping[MySGD]


def test_a_subclass_extending_a_built_in_update_keeps_higher_s_protocol():
    """A class written for higher that subclasses a built-in one and calls super()._update
    sees its override run, on param_groups[i]['params'], with the built-in numbers."""
    seen = []

    class LoggedSGD(hf.optim.DifferentiableSGD):
        def _update(self, grouped_grads, **kwargs):
            seen.append([len(group["params"]) for group in self.param_groups])
            super()._update(grouped_grads, **kwargs)

    data = batches(3)
    results = []
    for cls in (hf.optim.DifferentiableSGD, LoggedSGD):
        net = make_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        fmodel = hf.monkeypatch(net)
        diffopt = cls(opt, net.parameters(), fmodel=fmodel)
        for x, y in data:
            new = diffopt.step(mse(fmodel(x), y))
        assert all(p is q for p, q in zip(diffopt.param_groups[0]["params"], new, strict=True))
        results.append(new)
    assert seen == [[6]] * len(data)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["built-in", "written for higher"])
def test_detach_state_cuts_the_state_s_graph_and_keeps_its_values(kind, restored_registry):
    hf.register_optim(ScaledMomentum, DifferentiableScaledMomentum)
    net = make_net()
    opt = (
        torch.optim.Adam(net.parameters())
        if kind == "built-in"
        else ScaledMomentum(net.parameters())
    )
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)  # the state records it
    with hf.innerloop_ctx(net, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        for x, y in batches(2):
            diffopt.step(mse(fmodel(x), y))
        before = [dict(e) for s in diffopt.state for e in s.values()]
        assert any(t.grad_fn is not None for e in before for t in e.values())
        diffopt.detach_state()
        after = [e for s in diffopt.state for e in s.values()]
    assert all(t.grad_fn is None for e in after for t in e.values())
    for old, new in zip(before, after, strict=True):
        for key in old:
            torch.testing.assert_close(new[key], old[key].detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------- constructors


def test_create_diff_optim_accepts_parameter_group_dicts():
    """Regression: higher's create_diff_optim raised on a list of group dicts."""
    data = batches(4)
    reference = make_net()
    ref_groups = [
        {"params": reference.a.parameters(), "lr": 0.2},
        {"params": reference.b.parameters()},
    ]
    expected = torch_steps(reference, torch.optim.Adam(ref_groups, lr=0.01), data)

    net = make_net()
    fmodel = hf.patch.monkeypatch(net)
    fast = fmodel.fast_params
    diffopt = hf.create_diff_optim(
        torch.optim.Adam,
        {"lr": 0.01},
        params=[{"params": fast[0:2], "lr": 0.2}, {"params": fast[2:4]}],
        fmodel=fmodel,
    )
    assert len(diffopt.param_groups) == 2 and diffopt.param_groups[0]["lr"] == 0.2
    for (x, y), after in zip(data, expected, strict=True):
        diffopt.step(mse(fmodel(x), y))
        assert_all_close(fmodel.fast_params, after)


def test_create_diff_optim_from_a_flat_list_or_an_fmodel():
    data = batches(2)
    reference = make_net()
    expected = torch_steps(reference, torch.optim.SGD(reference.parameters(), lr=0.1), data)
    for how in ("fmodel", "list"):
        net = make_net()
        fmodel = hf.patch.monkeypatch(net)
        params = None if how == "fmodel" else list(net.parameters())  # stand-ins, in order
        diffopt = hf.create_diff_optim(torch.optim.SGD, {"lr": 0.1}, params=params, fmodel=fmodel)
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
        assert_all_close(fmodel.fast_params, expected[-1])


def test_set_up_copies_no_parameter(monkeypatch):
    """Regression: higher deep-copied every parameter through ``param_groups``."""
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(0.01))
    torch_steps(net, opt, batches(1))
    fmodel = hf.patch.monkeypatch(net)

    def refuse(*args: Any) -> None:
        raise AssertionError("a tensor was deep-copied")

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refuse)
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refuse)
    diffopt = hf.get_diff_optim(opt, net.parameters(), fmodel=fmodel)
    assert diffopt.param_groups[0]["params"] == [None] * 6
    # A tensor hyperparameter is snapshotted: a scheduler's in-place update cannot reach it.
    opt.param_groups[0]["lr"].fill_(0.5)
    assert diffopt.param_groups[0]["lr"].item() == pytest.approx(0.01)


# --------------------------------------------------------------------------- learnable options


def test_get_trainable_opt_params_leaves_boolean_options_out():
    """Regression: higher turned ``amsgrad``/``nesterov`` into trainable float tensors."""
    net = make_net()
    adam = torch.optim.Adam(net.parameters(), lr=0.01, amsgrad=True, maximize=False)
    sgd = torch.optim.SGD(
        [{"params": net.a.parameters()}, {"params": net.b.parameters(), "lr": 0.2}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    adam_override = hf.optim.get_trainable_opt_params(adam, dtype=torch.float64)
    assert sorted(adam_override) == ["betas", "eps", "lr", "weight_decay"]
    b1, b2 = adam_override["betas"][0]
    assert b1.requires_grad and b2.requires_grad and b1.item() == pytest.approx(0.9)
    sgd_override = hf.optim.get_trainable_opt_params(sgd, dtype=torch.float64)
    assert sorted(sgd_override) == ["dampening", "lr", "momentum", "weight_decay"]
    assert [t.item() for t in sgd_override["lr"]] == [0.1, 0.2]
    # Usable as an override: hypergradients reach every value.
    with hf.innerloop_ctx(net, sgd, override=sgd_override) as (fmodel, diffopt):
        for x, y in batches(2):
            diffopt.step(mse(fmodel(x), y))
        loss = mse(fmodel(batches(1, seed=5)[0][0]), batches(1, seed=5)[0][1])
        grads = torch.autograd.grad(loss, [*sgd_override["lr"], *sgd_override["momentum"]])
    assert all(torch.isfinite(g) and g != 0 for g in grads)


def test_apply_trainable_opt_params_writes_values_back():
    net = make_net()
    opt = torch.optim.Adam(
        [{"params": net.a.parameters()}, {"params": net.b.parameters(), "lr": 0.5}], lr=0.1
    )
    override = hf.optim.get_trainable_opt_params(opt, dtype=torch.float64)
    with torch.no_grad():
        override["lr"][1].mul_(2)
        override["betas"][0][0].fill_(0.5)
    hf.optim.apply_trainable_opt_params(opt, override)
    assert opt.param_groups[1]["lr"] == 1.0 and isinstance(opt.param_groups[1]["lr"], float)
    assert opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert opt.param_groups[0]["amsgrad"] is False
    with pytest.raises(TypeError, match="Boolean option"):
        hf.optim.apply_trainable_opt_params(opt, {"amsgrad": [torch.tensor(1.0)]})


# --------------------------------------------------------------------------- hooks, zero moments


@pytest.mark.parametrize(
    "torch_class", [torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad]
)
def test_zero_second_moments_give_exact_hypergradients_without_hooks(torch_class):
    """Regression: higher registered hooks zeroing gradients where a second moment is 0."""
    torch.manual_seed(3)
    model = nn.Linear(3, 1).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    x[:, 1] = 0  # the weight's middle column always gets an exactly zero gradient
    y = torch.randn(8, 1, dtype=torch.float64)

    def meta_loss(lr: Any) -> torch.Tensor:
        net = copy.deepcopy(model)
        opt = torch_class(net.parameters(), lr=0.1)
        with hf.innerloop_ctx(net, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(mse(fmodel(x), y))
            assert all(not p._backward_hooks for p in fmodel.fast_params if p.grad_fn)
            return mse(fmodel(x + 1), y)

    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(meta_loss(lr), [lr])
    assert torch.isfinite(g)
    assert abs(g.item() - central_difference(lambda v: meta_loss(v).item(), 0.1)) < FD_TOL


# --------------------------------------------------------------------------- schedules


def test_schedule_inside_the_loop_equals_changing_torch_lr_per_step():
    data = batches(5)
    schedule = lambda t: 0.2 * 0.5**t  # noqa: E731
    reference = make_net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1.0, momentum=0.9)
    for t, batch in enumerate(data):
        ref_opt.param_groups[0]["lr"] = schedule(t)
        torch_steps(reference, ref_opt, [batch])
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9)
    with hf.innerloop_ctx(net, opt, schedule={"lr": schedule}) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
        assert diffopt.step_count == 5
    assert_all_close(fmodel.fast_params, [p.detach() for p in reference.parameters()])


def test_a_schedule_of_tensors_gives_hypergradients():
    base = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def meta_loss(b: Any) -> torch.Tensor:
        net = make_net()
        data = batches(4)
        opt = torch.optim.SGD([{"params": net.a.parameters()}, {"params": net.b.parameters()}])
        schedule = {"lr": [lambda t: b * 0.5**t, lambda t: 0.1]}
        with hf.innerloop_ctx(net, opt, schedule=schedule) as (fmodel, diffopt):
            for x, y in data[:3]:
                diffopt.step(mse(fmodel(x), y))
            return mse(fmodel(data[3][0]), data[3][1])

    (g,) = torch.autograd.grad(meta_loss(base), [base])
    assert abs(g.item() - central_difference(lambda v: meta_loss(v).item(), 0.2)) < FD_TOL


# --------------------------------------------------------------------------- bad input


def test_unsupported_optimizer_is_a_clear_error():
    net = make_net()
    with pytest.raises(
        ValueError, match=r"LBFGS is not supported\. Supported: .*Adam.*register_optim"
    ):
        hf.get_diff_optim(torch.optim.LBFGS(net.parameters()), net.parameters())
    with pytest.raises(ValueError, match="LBFGS is not supported"):
        hf.create_diff_optim(torch.optim.LBFGS, params=list(net.parameters()))
    with pytest.raises(TypeError, match="opt must be a torch.optim.Optimizer instance"):
        hf.get_diff_optim(torch.optim.SGD, net.parameters())


def test_optimizer_over_another_models_parameters_is_a_clear_error():
    net, other = make_net(), make_net()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(4, 3\)\) is not among"
    ):
        hf.get_diff_optim(opt, net.parameters())
    with (
        pytest.raises(ValueError, match="is not among reference_params"),
        hf.innerloop_ctx(net, opt),
    ):
        pass


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        (
            {"lr": [0.1, 0.2, 0.3]},
            ValueError,
            r"override\['lr'\] has 3 values but the optimizer has 2",
        ),
        ({"lr": []}, ValueError, r"has 0 values"),
        ({"lr": 0.1}, TypeError, r"override\['lr'\] must be a list of values.*\{'lr': \[value\]\}"),
        ({"lr": torch.tensor(0.1)}, TypeError, r"must be a list of values, .* got Tensor"),
        (
            {"betas": [(0.9, 0.99)]},
            TypeError,
            r"DifferentiableSGD got an unknown hyperparameter override 'betas'",
        ),
        ([("lr", [0.1])], TypeError, r"override must be a dict"),
        ({"nesterov": [torch.tensor(1.0)]}, TypeError, r"nesterov must be a bool"),
    ],
)
def test_bad_overrides_are_clear_errors(override, error, message):
    net = make_net()
    opt = torch.optim.SGD([{"params": net.a.parameters()}, {"params": net.b.parameters()}], lr=0.1)
    with pytest.raises(error, match=message):
        hf.get_diff_optim(opt, net.parameters(), override=override)
    diffopt = hf.get_diff_optim(opt, net.parameters())
    x, y = batches(1)[0]
    with pytest.raises(error, match=message):
        diffopt.step(mse(net(x), y), params=list(net.parameters()), override=override)


def test_bad_step_arguments_are_clear_errors():
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    diffopt = hf.get_diff_optim(opt, net.parameters())
    x, y = batches(1)[0]
    params = list(net.parameters())
    with pytest.raises(ValueError, match="needs params= .* without an fmodel"):
        diffopt.step(mse(net(x), y))
    with pytest.raises(ValueError, match="params has 5 tensors but the optimizer was built over 6"):
        diffopt.step(mse(net(x), y), params=params[:5])
    with pytest.raises(TypeError, match=r"params\[2\] must be a torch.Tensor, got float"):
        diffopt.step(mse(net(x), y), params=[*params[:2], 1.0, *params[3:]])
    with pytest.raises(TypeError, match="loss must be a scalar torch.Tensor, got float"):
        diffopt.step(1.0, params=params)
    with pytest.raises(ValueError, match="loss does not require grad"):
        diffopt.step(mse(net(x), y).detach(), params=params)
    with pytest.raises(ValueError, match="grad_callback returned 1 gradients for 6 parameters"):
        diffopt.step(mse(net(x), y), params=params, grad_callback=lambda g: g[:1])
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        diffopt.step(mse(net(x), y), params=params, closure=None)


def test_bad_registrations_and_constructions_are_clear_errors():
    with pytest.raises(TypeError, match="torch optimizer class first"):
        hf.register_optim(hf.optim.DifferentiableSGD, torch.optim.SGD)
    with pytest.raises(TypeError, match="diff_optim_type must be a subclass"):
        hf.register_optim(torch.optim.SGD, object)
    net = make_net()
    with pytest.raises(TypeError, match="DifferentiableAdam mirrors a Adam, got a SGD"):
        hf.optim.DifferentiableAdam(torch.optim.SGD(net.parameters()), net.parameters())
    with pytest.raises(ValueError, match="needs params= .* or fmodel="):
        hf.create_diff_optim(torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(TypeError, match="opt_type must be a torch.optim.Optimizer subclass"):
        hf.create_diff_optim(torch.optim.SGD(net.parameters()), params=list(net.parameters()))
    fmodel = hf.patch.monkeypatch(net)
    with pytest.raises(ValueError, match="fmodel has 6 parameters but reference_params has 2"):
        hf.get_diff_optim(torch.optim.SGD(net.a.parameters()), net.a.parameters(), fmodel=fmodel)
    with pytest.raises(ValueError, match="not fmodel's fast weights and do not match"):
        hf.create_diff_optim(torch.optim.SGD, params=[torch.zeros(2)], fmodel=fmodel)
    with pytest.raises(TypeError, match=r"schedule\['lr'\] must be a callable"):
        hf.get_diff_optim(
            torch.optim.SGD(net.parameters()), net.parameters(), schedule={"lr": [0.1]}
        )
