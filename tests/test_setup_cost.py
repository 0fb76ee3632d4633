"""What entering ``innerloop_ctx`` reuses between tasks, and that nothing reused goes stale:
the walk's parameter list (for ``model.parameters()``), the rules built from the same
immutable options, the skipped state import of a torch optimizer without state, and the
plain-container check that names parameters only when it finds a container."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import higher_func as hf
from higher_func._patch import _monkeypatched
from higher_func._rules._registry import recent_rule, rule_factory


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))


class Shared(nn.Module):
    """A submodule reached under two names, a tied weight and a parameterless child."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.again = self.first
        self.act = nn.Tanh()
        self.last = nn.Linear(3, 3)
        self.last.weight = self.first.weight
        self.scale = nn.Parameter(torch.ones(()))


class CountingParameters(nn.Module):
    """A model with its own ``parameters()``, which higher's ``innerloop_ctx`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.calls = 0

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        self.calls += 1
        return super().parameters(recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def enter(model: nn.Module, opt: torch.optim.Optimizer, **kwargs):
    context = hf.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs)
    return context.__enter__()


# ------------------------------------------------------------------ the parameter list


@pytest.mark.parametrize("make", [mlp, Shared], ids=["mlp", "shared-and-tied"])
def test_the_walk_lists_the_models_parameters_as_model_parameters_does(make) -> None:
    model = make()
    fmodel, parameters = _monkeypatched(model, None, False, True)
    expected = list(model.parameters())
    assert len(parameters) == len(expected) == len(fmodel.fast_params)
    assert all(p is q for p, q in zip(parameters, expected, strict=True))


def test_a_model_with_its_own_parameters_method_is_asked_for_them() -> None:
    model = CountingParameters()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.calls = 0
    fmodel, diffopt = enter(model, opt)
    assert model.calls == 1
    new = diffopt.step(fmodel(torch.ones(1, 2)).sum())
    assert [p.shape for p in new] == [p.shape for p in model.parameters()]


def test_the_meta_gradient_reaches_the_model_through_the_walks_parameter_list() -> None:
    model, x = mlp().double(), torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fmodel, diffopt = enter(model, opt)
    for _ in range(2):
        diffopt.step(fmodel(x).pow(2).mean())
    fmodel(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------ reused rules


def test_a_rule_is_reused_for_the_same_option_objects_and_rebuilt_when_one_changes() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _, first = enter(model, opt)
    _, second = enter(model, opt)
    assert second._rules[0] is first._rules[0]
    opt.param_groups[0]["lr"] = 0.5  # a program changing a value between tasks
    _, third = enter(model, opt)
    assert third._rules[0] is not first._rules[0]
    assert third._rules[0].hyperparameters["lr"] == 0.5
    assert first._rules[0].hyperparameters["lr"] == 0.01


def test_a_tensor_option_is_never_reused() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    _, first = enter(model, opt)
    with torch.no_grad():
        opt.param_groups[0]["lr"].fill_(0.2)  # changed in place: the same object
    _, second = enter(model, opt)
    assert second._rules[0] is not first._rules[0]
    assert float(second._rules[0].hyperparameters["lr"]) == pytest.approx(0.2)


def test_a_bad_value_set_between_tasks_still_fails_at_the_step() -> None:
    model, x = mlp(), torch.ones(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    enter(model, opt)
    opt.param_groups[0]["lr"] = -1.0
    for _ in range(2):  # a failed build is not remembered
        fmodel, diffopt = enter(model, opt)
        with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
            diffopt.step(fmodel(x).sum())


def test_only_pure_factories_and_immutable_values_are_reused() -> None:
    calls = []

    def own_factory(**options):
        calls.append(options)
        return hf.optim.sgd(**options)

    options = {"lr": 0.1, "momentum": 0.9}
    recent_rule(own_factory, options)
    recent_rule(own_factory, options)
    assert len(calls) == 2  # a factory of one's own may not be pure: called every time
    pure = rule_factory(torch.optim.SGD, arithmetic="higher")
    assert recent_rule(pure, options) is recent_rule(pure, dict(options))
    lr = torch.tensor(0.1)
    assert recent_rule(pure, {"lr": lr}) is not recent_rule(pure, {"lr": lr})


def test_a_stepped_torch_optimizers_state_is_still_imported() -> None:
    model, x = mlp().double(), torch.ones(3, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, fresh = enter(model, opt)
    assert fresh.state == [{}]
    model(x).sum().backward()
    opt.step()
    _, imported = enter(model, opt)
    buffers = imported.state[0]
    assert sorted(buffers) == list(range(6))
    for k, p in enumerate(model.parameters()):
        torch.testing.assert_close(buffers[k]["momentum_buffer"], opt.state[p]["momentum_buffer"])


# ------------------------------------------------------------------ the container check


class TwoContainers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.by_name = {"w": self.b.weight}
        self.pair = (self.a.weight, self.b.weight)
        self.sizes = [2, 2]  # a list without parameters: no warning


def test_every_container_holding_a_parameter_warns_in_attribute_order() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.monkeypatch(TwoContainers())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith("model.by_name holds the parameter 'b.weight' in a plain")
    assert messages[1].startswith("model.pair holds the parameter 'a.weight' in a plain")


def test_a_model_without_containers_warns_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.monkeypatch(nn.LSTM(2, 3))  # torch keeps its private _flat_weights in sync
        hf.monkeypatch(mlp())
