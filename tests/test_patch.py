"""The stateless module (``higher_func.patch``): exactness, history, submodules, copies, errors.

References are independent of the code under test: the plain module (same weights) and
``torch.func.functional_call`` (other weights), in float64.
"""

from __future__ import annotations

import abc
import copy
import gc
import pickle
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import higher_func
from higher_func.patch import FunctionalModule, buffer_sync, make_functional, monkeypatch

TOL = {"rtol": 1e-10, "atol": 1e-12}


def assert_close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, **TOL)


def perturbed(fmodel: FunctionalModule, scale: float = 0.1) -> list[Tensor]:
    """New fast weights (requiring grad) that differ from the model's."""
    return [
        (p.detach() + scale * torch.randn_like(p)).requires_grad_(p.is_floating_point())
        for p in fmodel.parameters()
    ]


# ---------------------------------------------------------------------------------------------
# A table of modules: every generic exactness test runs over it.
# ---------------------------------------------------------------------------------------------


class Tied(nn.Module):
    """``head`` is used under two names; ``unused`` never enters forward."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.dec = nn.Linear(3, 4, bias=False)
        self.dec.weight = nn.Parameter(self.enc.weight.detach().t().contiguous())
        self.head = nn.Linear(4, 2, bias=False)
        self.head2 = self.head
        self.unused = nn.Parameter(torch.randn(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head2(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class SameWeight(nn.Module):
    """One Parameter registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.sin(self.a(x)))


class Abstract(nn.Module, abc.ABC):
    @abc.abstractmethod
    def features(self, x: Tensor) -> Tensor: ...

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).sum(-1)


class Concrete(Abstract):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def features(self, x: Tensor) -> Tensor:
        return self.lin(x)


class Symmetric(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).transpose(-1, -2)


def parametrized_linear() -> nn.Module:
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", Symmetric())
    return lin


def weight_normed() -> nn.Module:
    return torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class RNNHead(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(3, 4, num_layers=2, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(x)[0]
        return out.sum()


class Cells(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNNCell(3, 4)
        self.gru = nn.GRUCell(3, 4)
        self.lstm = nn.LSTMCell(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h, c = self.lstm(x)
        return self.rnn(x, self.gru(x)) + h + c


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        k = x[..., :3]
        v = torch.cat([x, x[..., :1]], -1)
        return self.mha(x, k, v)[0]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    train: bool = False


CASES = [
    Case("mlp", lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), (6, 4)),
    Case("no_bias", lambda: nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 1)), (6, 4)),
    Case("tied_and_unused", Tied, (6, 4)),
    Case("same_parameter_two_names", SameWeight, (6, 4)),
    Case("abc_module", Concrete, (6, 4)),
    Case("parametrize", parametrized_linear, (6, 4)),
    Case("parametrizations_weight_norm", weight_normed, (6, 4)),
    Case("conv_batchnorm_eval", ConvBN, (5, 2, 4, 4)),
    Case("conv_batchnorm_train", ConvBN, (5, 2, 4, 4), train=True),
    Case("rnn", lambda: RNNHead(nn.RNN), (2, 5, 3)),
    Case("gru", lambda: RNNHead(nn.GRU), (2, 5, 3)),
    Case("lstm", lambda: RNNHead(nn.LSTM), (2, 5, 3)),
    Case("rnn_cells", Cells, (6, 3)),
    Case("multihead_attention", Attention, (2, 5, 4)),
    Case(
        "transformer_layer",
        lambda: nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True),
        (2, 5, 4),
    ),
]


def make_case(case: Case) -> tuple[nn.Module, Tensor]:
    model = case.make().double().train(case.train)
    return model, torch.randn(case.shape, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_equals_module(case: Case) -> None:
    model, x = make_case(case)
    reference = copy.deepcopy(model)
    fmodel = monkeypatch(model)
    assert_close(fmodel(x), reference(x))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_params_and_gradients_equal_functional_call(case: Case) -> None:
    model, x = make_case(case)
    reference = copy.deepcopy(model)
    fmodel = monkeypatch(model)
    params = perturbed(fmodel)
    by_name = dict(zip(fmodel.param_names, params, strict=True))

    out = fmodel(x, params=params)
    expected = functional_call(reference, by_name, (x,), tie_weights=True)
    assert_close(out, expected)

    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        if ref_grad is None:
            assert grad is None
        else:
            assert_close(grad, ref_grad)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_recorded_weights_equal_functional_call(case: Case) -> None:
    model, x = make_case(case)
    reference = copy.deepcopy(model)
    fmodel = monkeypatch(model)
    params = perturbed(fmodel)
    fmodel.update_params(params)
    by_name = dict(zip(fmodel.param_names, params, strict=True))
    assert_close(fmodel(x), functional_call(reference, by_name, (x,), tie_weights=True))


def test_param_names_follow_model_parameters_with_tied_once() -> None:
    model = Tied()
    fmodel = monkeypatch(model)
    names = [name for name, _ in model.named_parameters()]
    assert fmodel.param_names == tuple(names)
    assert len(list(fmodel.parameters())) == len(list(model.parameters()))
    for fast, param in zip(fmodel.parameters(), model.parameters(), strict=True):
        assert torch.equal(fast, param)


def test_second_order_meta_gradient_equals_functional_reference() -> None:
    """One MAML step: d(query loss after an inner step)/d(initial weights), by hand."""
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    fmodel = monkeypatch(model, copy_initial_weights=False)
    inner = (fmodel(x) - y).square().mean()
    grads = torch.autograd.grad(inner, list(fmodel.parameters()), create_graph=True)
    fmodel.update_params([p - 0.3 * g for p, g in zip(fmodel.parameters(), grads, strict=True)])
    outer = (fmodel(2 * x) - y).square().mean()
    meta = torch.autograd.grad(outer, list(model.parameters()))

    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def loss(ps: list[Tensor], inputs: Tensor) -> Tensor:
        return (
            (functional_call(model, dict(zip(names, ps, strict=True)), (inputs,)) - y)
            .square()
            .mean()
        )

    g = torch.autograd.grad(loss(start, x), start, create_graph=True)
    adapted = [p - 0.3 * gi for p, gi in zip(start, g, strict=True)]
    expected = torch.autograd.grad(loss(adapted, 2 * x), start)
    for a, b in zip(meta, expected, strict=True):
        assert_close(a, b)


def test_vmap_over_params_matches_loop() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    fmodel = monkeypatch(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    stacked = [torch.stack([p.detach() + i for i in range(3)]) for p in fmodel.parameters()]
    batched = torch.func.vmap(lambda *ps: fmodel(x, params=list(ps)))(*stacked)
    for i in range(3):
        assert_close(batched[i], fmodel(x, params=[s[i] for s in stacked]))
    assert len(list(fmodel.parameters(time=-1))) == 4


def test_torch_func_grad_through_params_equals_autograd() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    fmodel = monkeypatch(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    params = dict(zip(fmodel.param_names, perturbed(fmodel), strict=True))
    grads = torch.func.grad(lambda p: fmodel(x, params=p).square().sum())(params)
    expected = torch.autograd.grad(fmodel(x, params=params).square().sum(), list(params.values()))
    for name, ref in zip(params, expected, strict=True):
        assert_close(grads[name], ref)


# ---------------------------------------------------------------------------------------------
# History semantics.
# ---------------------------------------------------------------------------------------------


def test_history_records_every_update_when_tracking() -> None:
    fmodel = monkeypatch(nn.Linear(2, 2).double())
    first, second = perturbed(fmodel), perturbed(fmodel)
    initial = fmodel.fast_params
    fmodel.update_params(first)
    fmodel.fast_params = second
    assert all(a is b for a, b in zip(fmodel.parameters(time=0), initial, strict=True))
    assert all(a is b for a, b in zip(fmodel.init_fast_params, initial, strict=True))
    assert all(a is b for a, b in zip(fmodel.parameters(time=1), first, strict=True))
    assert all(a is b for a, b in zip(fmodel.parameters(), second, strict=True))
    assert all(a is b for a, b in zip(fmodel.fast_params, second, strict=True))
    with pytest.raises(IndexError, match="time=3 is out of range"):
        list(fmodel.parameters(time=3))


def test_update_params_accepts_a_partial_dict() -> None:
    fmodel = monkeypatch(nn.Linear(2, 2).double())
    weight = torch.zeros(2, 2, dtype=torch.float64)
    fmodel.update_params({"weight": weight})
    assert fmodel.fast_params[0] is weight
    assert fmodel.fast_params[1] is fmodel.init_fast_params[1]


def test_regression_params_keyword_does_not_append_to_history() -> None:
    """higher appended the params passed to forward to the history (memory grew)."""
    fmodel = monkeypatch(nn.Linear(2, 2).double())
    x = torch.randn(3, 2, dtype=torch.float64)
    latest = fmodel.fast_params
    for _ in range(5):
        fmodel(x, params=perturbed(fmodel))
    assert len(list(fmodel.parameters(time=-1))) == 2
    with pytest.raises(IndexError):
        list(fmodel.parameters(time=1))
    assert all(a is b for a, b in zip(fmodel.fast_params, latest, strict=True))
    assert_close(fmodel(x), torch.nn.functional.linear(x, latest[0], latest[1]))


def test_not_tracking_keeps_only_the_latest_weights() -> None:
    fmodel = monkeypatch(nn.Linear(2, 2).double(), track_higher_grads=False)
    new = perturbed(fmodel)
    fmodel.update_params(new)
    assert all(a is b for a, b in zip(fmodel.fast_params, new, strict=True))
    for time in (0, -1, None):  # higher's one-element history: all three are the latest
        assert all(a is b for a, b in zip(fmodel.parameters(time=time), new, strict=True))
    with pytest.raises(ValueError, match="not tracking higher gradients"):
        list(fmodel.parameters(time=1))
    with pytest.raises(ValueError, match="init_fast_params is only kept when tracking"):
        _ = fmodel.init_fast_params


def test_regression_toggling_tracking_keeps_fast_params_current() -> None:
    """higher replaced entry 0 after tracking was turned off while reading entry -1."""
    fmodel = monkeypatch(nn.Linear(2, 2).double())
    x = torch.randn(3, 2, dtype=torch.float64)
    fmodel.update_params(perturbed(fmodel))
    fmodel.track_higher_grads = False
    newest = perturbed(fmodel)
    fmodel.update_params(newest)
    assert all(a is b for a, b in zip(fmodel.fast_params, newest, strict=True))
    assert_close(fmodel(x), torch.nn.functional.linear(x, newest[0], newest[1]))
    fmodel.track_higher_grads = True
    again = perturbed(fmodel)
    fmodel.update_params(again)
    assert all(a is b for a, b in zip(fmodel.init_fast_params, newest, strict=True))
    assert all(a is b for a, b in zip(fmodel.fast_params, again, strict=True))


def test_live_tensors_stay_flat_over_1000_untracked_updates() -> None:
    fmodel = monkeypatch(nn.Linear(3, 3), track_higher_grads=False)
    x = torch.randn(4, 3)

    def step() -> None:
        loss = fmodel(x).square().sum()
        grads = torch.autograd.grad(loss, list(fmodel.parameters()))
        fmodel.update_params(
            [
                (p - 0.01 * g).detach().requires_grad_()
                for p, g in zip(fmodel.parameters(), grads, strict=True)
            ]
        )

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if issubclass(type(obj), Tensor))

    for _ in range(10):
        step()
    before = live_tensors()
    for _ in range(1000):
        step()
    assert live_tensors() <= before  # no growth


# ---------------------------------------------------------------------------------------------
# Submodules, attributes, modes, buffers, hooks.
# ---------------------------------------------------------------------------------------------


def test_regression_direct_submodule_calls_on_sequential_root_use_latest_weights() -> None:
    """higher failed on Sequential roots and used stale weights after a direct call."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fmodel = monkeypatch(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(fmodel[0](x), model[0](x))
    new = perturbed(fmodel)
    fmodel.update_params(new)
    assert_close(fmodel[0](x), torch.nn.functional.linear(x, new[0], new[1]))
    assert_close(fmodel[-1](torch.tanh(fmodel[0](x))), fmodel(x))
    views = list(fmodel)
    assert len(views) == len(fmodel) == 3
    assert_close(views[2](views[1](views[0](x))), fmodel(x))


def test_direct_submodule_call_on_module_list_root_and_with_params() -> None:
    model = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 1)]).double()
    fmodel = monkeypatch(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_close(fmodel[1](x), model[1](x))
    local = [torch.randn_like(p) for p in model[1].parameters()]
    assert_close(fmodel[1](x, params=local), torch.nn.functional.linear(x, *local))
    whole = perturbed(fmodel)  # higher's convention: the whole fmodel's list
    assert_close(fmodel[1](x, params=whole), torch.nn.functional.linear(x, whole[2], whole[3]))


def test_nested_views_and_modules_see_the_latest_weights() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 1)).double()
    fmodel = monkeypatch(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    weight = torch.randn(3, 3, dtype=torch.float64)
    fmodel[0][0].weight = weight
    bias = fmodel.fast_params[1]
    assert_close(fmodel[0][0](x), torch.nn.functional.linear(x, weight, bias))
    assert_close(
        fmodel[0](x, params={"0.weight": 2 * weight}), torch.tanh(x @ (2 * weight).t() + bias)
    )
    assert fmodel[0][0].weight is weight
    inner = next(m for m in fmodel.modules() if isinstance(m, nn.Linear))
    assert type(inner) is nn.Linear and inner.weight is weight
    assert fmodel[0] is fmodel[0]


def test_regression_assigning_a_tensor_to_a_submodule_parameter_records_new_weights() -> None:
    """higher raised on ``fmodel.sub.weight = w``."""
    model = Tied().double()
    fmodel = monkeypatch(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, dtype=torch.float64)
    fmodel.enc.weight = weight
    assert len(list(fmodel.parameters(time=1))) == len(fmodel.param_names)
    assert fmodel.fast_params[fmodel.param_names.index("enc.weight")] is weight
    head = torch.randn(2, 4, dtype=torch.float64)
    fmodel.head2.weight = head  # a second name of a shared module: changes everywhere
    assert fmodel.head.weight is head
    params = dict(zip(fmodel.param_names, fmodel.fast_params, strict=True))
    assert_close(fmodel(x), functional_call(model, params, (x,)))


def test_assigning_to_a_root_parameter_and_tied_weights() -> None:
    model = SameWeight().double()
    fmodel = monkeypatch(model)
    weight = torch.randn(4, 4, dtype=torch.float64)
    fmodel.b.weight = weight
    assert fmodel.a.weight is weight and fmodel.b.weight is weight
    lin = monkeypatch(nn.Linear(2, 2))
    lin.bias = torch.zeros(2)
    assert torch.equal(lin.fast_params[1], torch.zeros(2))


def test_attributes_methods_and_named_parameters_reflect_latest_weights() -> None:
    model = Concrete().double()
    fmodel = monkeypatch(model)
    new = perturbed(fmodel)
    fmodel.update_params(new)
    x = torch.randn(2, 4, dtype=torch.float64)
    assert fmodel.lin.in_features == 4
    assert_close(fmodel.features(x), torch.nn.functional.linear(x, new[0], new[1]))
    assert [(n, t) for n, t in fmodel.named_parameters()] == [
        ("lin.weight", new[0]),
        ("lin.bias", new[1]),
    ]
    assert list(fmodel.lin.named_parameters()) == [("weight", new[0]), ("bias", new[1])]
    assert fmodel.lin.weight is new[0]


def test_state_dict_loads_into_a_fresh_model() -> None:
    model = ConvBN().double().train()
    fmodel = monkeypatch(model)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    fmodel.update_params(perturbed(fmodel))
    fmodel(x)
    fresh = ConvBN().double()
    fresh.load_state_dict(fmodel.state_dict())
    fresh.eval()
    fmodel.eval()
    assert_close(fresh(x), fmodel(x))
    assert all(not t.requires_grad for t in fmodel.state_dict().values())


def test_train_and_eval_reach_every_submodule() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).double()
    fmodel = monkeypatch(model)
    assert fmodel.eval() is fmodel
    assert not fmodel.training and not any(m.training for m in fmodel.modules())
    assert not fmodel[1].training
    x = torch.randn(50, 3, dtype=torch.float64)
    assert_close(fmodel(x), model[0](x))
    fmodel.train()
    assert fmodel.training and all(m.training for m in fmodel.modules())
    fmodel[1].eval()
    assert fmodel.training and not fmodel[1].training and not list(fmodel.modules())[2].training
    assert model.training  # the original keeps its own mode


def test_batchnorm_buffers_are_private_and_updated_in_train_mode() -> None:
    model = ConvBN().double().train()
    original = {n: b.clone() for n, b in model.named_buffers()}
    reference = copy.deepcopy(model)
    fmodel = monkeypatch(model)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    fmodel(x)
    fmodel(x, params=perturbed(fmodel))
    reference(x)
    reference(x)  # the conv weights differ on the second call, so only the first stats agree
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, original[name])
    private = dict(fmodel.named_buffers())
    assert set(private) == set(original)
    assert private["bn.num_batches_tracked"].item() == 2
    assert not torch.equal(private["bn.running_mean"], original["bn.running_mean"])
    fmodel.eval()
    frozen = private["bn.running_mean"].clone()
    fmodel(x)
    assert torch.equal(dict(fmodel.named_buffers())["bn.running_mean"], frozen)


def test_batchnorm_running_stats_equal_module_after_one_step() -> None:
    model = ConvBN().double().train()
    reference = copy.deepcopy(model)
    fmodel = monkeypatch(model)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    fmodel(x)
    reference(x)
    expected = dict(reference.named_buffers())
    private = dict(fmodel.named_buffers())
    assert private.keys() == expected.keys()
    for name, buffer in private.items():
        assert_close(buffer, expected[name])


def test_regression_forward_hooks_run() -> None:
    """higher dropped forward hooks silently."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).double()
    seen: list[Tensor] = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out))
    model[1].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    fmodel = monkeypatch(model)
    fmodel.register_forward_hook(lambda module, args, out: out + 1)
    x = torch.randn(2, 3, dtype=torch.float64)
    new = perturbed(fmodel)
    out = fmodel(x, params=new)
    hidden = torch.nn.functional.linear(x, new[0], new[1])
    assert len(seen) == 1
    assert_close(seen[0], hidden)
    assert_close(out, torch.nn.functional.linear(2 * hidden, new[2], new[3]) + 1)


def test_regression_hook_based_weight_norm_raises_with_fix() -> None:
    """higher gave silently wrong results with the hook-based weight_norm."""
    with pytest.warns(FutureWarning):
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 2)))
    with pytest.raises(TypeError, match=r"torch\.nn\.utils\.parametrizations\.weight_norm"):
        monkeypatch(model)
    spectral = torch.nn.utils.spectral_norm(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"parametrizations\.spectral_norm"):
        monkeypatch(spectral)


def test_regression_abc_module() -> None:
    """higher failed with an MRO error on ``class M(nn.Module, ABC)``."""
    model = Concrete().double()
    fmodel = monkeypatch(model)
    x = torch.randn(2, 4, dtype=torch.float64)
    assert_close(fmodel(x), model(x))
    assert not isinstance(fmodel, Concrete)
    assert isinstance(fmodel, nn.Module)
    assert any(isinstance(m, Concrete) for m in fmodel.modules())


class OwnDeepcopy(nn.Module):
    """A module whose ``__deepcopy__`` builds a fresh submodule, bypassing the memo."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def __deepcopy__(self, memo: dict[int, object]) -> OwnDeepcopy:
        new = OwnDeepcopy()
        for key, value in self.inner._parameters.items():
            new.inner._parameters[key] = memo.get(id(value), value)
        return new


def test_a_module_with_its_own_deepcopy_gets_a_layout_of_its_copy() -> None:
    """The layout is read off the original and mapped to the copy; a submodule the memo
    does not know (made by a custom ``__deepcopy__``) makes it walk the copy instead."""
    model = nn.Sequential(OwnDeepcopy(), nn.Tanh()).double()
    fmodel = monkeypatch(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert fmodel.param_names == ("0.inner.weight", "0.inner.bias")
    assert_close(fmodel(x), model(x))
    new = perturbed(fmodel)
    fmodel.update_params(new)
    expected = functional_call(model, dict(zip(fmodel.param_names, new, strict=True)), (x,))
    assert_close(fmodel(x), expected)
    assert_close(
        fmodel[0].inner(x),
        functional_call(model[0].inner, dict(zip(["weight", "bias"], new, strict=True)), (x,)),
    )


# ---------------------------------------------------------------------------------------------
# copy_initial_weights, device, lifetime, copies.
# ---------------------------------------------------------------------------------------------


def test_copy_initial_weights_true_gives_detached_leaf_copies() -> None:
    model = nn.Linear(3, 1).double()
    model.bias.requires_grad_(False)
    fmodel = monkeypatch(model)
    for fast, param in zip(fmodel.parameters(), model.parameters(), strict=True):
        assert fast.is_leaf and fast.requires_grad == param.requires_grad
        assert fast.data_ptr() != param.data_ptr()
    fmodel(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    assert model.weight.grad is None


def test_copy_initial_weights_false_sends_the_outer_gradient_to_the_model() -> None:
    model = nn.Linear(3, 1).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    fmodel = monkeypatch(model, copy_initial_weights=False)
    grads = torch.autograd.grad(
        fmodel(x).square().sum(), list(fmodel.parameters()), create_graph=True
    )
    fmodel.update_params([p - 0.1 * g for p, g in zip(fmodel.parameters(), grads, strict=True)])
    fmodel(x).square().sum().backward()

    w, b = model.weight.detach().requires_grad_(), model.bias.detach().requires_grad_()
    gw, gb = torch.autograd.grad((x @ w.t() + b).square().sum(), (w, b), create_graph=True)
    expected = torch.autograd.grad((x @ (w - 0.1 * gw).t() + (b - 0.1 * gb)).square().sum(), (w, b))
    assert_close(model.weight.grad, expected[0])
    assert_close(model.bias.grad, expected[1])


def test_device_moves_fast_weights_and_buffers() -> None:
    model = ConvBN()
    fmodel = monkeypatch(model, device="cpu")
    assert all(p.device == torch.device("cpu") for p in fmodel.parameters())
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(fmodel.parameters(), model.parameters(), strict=True)
    )
    meta = monkeypatch(model, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(b.device.type == "meta" for b in meta.buffers())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_regression_fmodel_does_not_keep_the_model_alive() -> None:
    """higher's fmodel held a generator over the model's parameters."""
    for copy_initial_weights in (True, False):
        model = Tied().double()
        x = torch.randn(2, 4, dtype=torch.float64)
        expected = model(x).detach()
        fmodel = monkeypatch(model, copy_initial_weights=copy_initial_weights)
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None
        assert_close(fmodel(x), expected)


def test_fmodel_is_freed_without_the_cycle_collector() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(2, 3)
    gc.collect()
    gc.disable()
    try:
        fmodel = monkeypatch(model, copy_initial_weights=False)
        grads = torch.autograd.grad(fmodel(x).sum(), list(fmodel.parameters()), create_graph=True)
        fmodel.update_params([p - g for p, g in zip(fmodel.parameters(), grads, strict=True)])
        fmodel[0](x)
        fmodel[2].bias = torch.zeros(1)
        fmodel(x, params=fmodel.fast_params)
        refs = [weakref.ref(t) for t in [*fmodel.fast_params, *fmodel.init_fast_params]]
        del fmodel, grads
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_regression_deepcopy_gives_an_independent_detached_snapshot() -> None:
    """higher's fmodel could be neither deep-copied nor pickled."""
    model = ConvBN().double().train()
    fmodel = monkeypatch(model, copy_initial_weights=False)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    fmodel.update_params([p * 1.5 for p in fmodel.parameters()])
    fmodel(x)
    clone = copy.deepcopy(fmodel)
    assert len(list(clone.parameters(time=1))) == len(fmodel.param_names)
    for a, b in zip(clone.parameters(), fmodel.parameters(), strict=True):
        assert torch.equal(a, b) and a.is_leaf and a.data_ptr() != b.data_ptr()
    clone.eval()
    fmodel.eval()
    assert_close(clone(x), fmodel(x))
    clone.fc.bias = torch.zeros(2, dtype=torch.float64)
    assert not torch.equal(fmodel.fc.bias, clone.fc.bias)
    assert len(list(fmodel.parameters(time=-1))) == len(fmodel.param_names)
    with pytest.raises(IndexError):
        list(fmodel.parameters(time=2))

    restored = pickle.loads(pickle.dumps(fmodel))
    assert_close(restored(x), fmodel(x))
    assert restored.fc(torch.ones(1, 48, dtype=torch.float64)).shape == (1, 2)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_submodule_views_are_kept_per_fmodel_and_rebuilt_in_copies(
    copier: Callable[[FunctionalModule], FunctionalModule],
) -> None:
    """Views are made on first access (and then reused); a copy gets views of its own."""
    fmodel = monkeypatch(ConvBN().double())
    view = fmodel.fc
    assert fmodel.fc is view
    clone = copier(fmodel)
    assert clone.fc is not view and clone.fc is clone.fc
    clone.fc.bias = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(clone.fast_params[-1], torch.zeros(2, dtype=torch.float64))
    assert not torch.equal(view.bias, clone.fc.bias)


def test_make_functional_buffer_sync_and_get_func_params_as_higher_users_call_them() -> None:
    model = ConvBN().double().train()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    model(x)  # the model's running stats move away from their initial values
    fmodel = make_functional(model)
    buffer_sync(model, fmodel)
    params = higher_func.utils.get_func_params(model)
    fmodel.eval()
    model.eval()
    assert_close(fmodel(x, params=params), model(x))
    assert_close(fmodel(x), model(x))
    assert len(list(fmodel.parameters(time=-1))) == len(params)


def test_make_functional_runs_the_encapsulator() -> None:
    model = nn.Linear(2, 1).double()
    weights = [torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]
    seen = []

    def encapsulator(fmodule: FunctionalModule, module: nn.Module) -> None:
        seen.append(module)
        fmodule.update_params(weights)

    fmodel = make_functional(model, encapsulator=encapsulator)
    assert seen == [model]
    assert_close(
        fmodel(torch.randn(3, 2, dtype=torch.float64)), torch.ones(3, 1, dtype=torch.float64)
    )


# ---------------------------------------------------------------------------------------------
# Bad input: each a clear error matched by its message.
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_problem_and_the_fix() -> None:
    fmodel = monkeypatch(Tied())
    x = torch.randn(2, 4)
    size = len(fmodel.param_names)
    with pytest.raises(
        ValueError, match=rf"params has 2 tensors but the module has {size} parameters"
    ):
        fmodel(x, params=fmodel.fast_params[:2])
    with pytest.raises(ValueError, match="tensors but the module has"):
        fmodel.update_params([*fmodel.fast_params, torch.zeros(1)])
    with pytest.raises(
        TypeError, match=r"fast weight for parameter 'enc.bias' must be a torch.Tensor, got float"
    ):
        bad = fmodel.fast_params
        bad[fmodel.param_names.index("enc.bias")] = 0.5
        fmodel.update_params(bad)
    with pytest.raises(
        TypeError, match="fast weight for parameter 'enc.weight' must be a torch.Tensor"
    ):
        fmodel.enc.weight = [[1.0]]
    with pytest.raises(KeyError, match=r"unknown parameter name\(s\) \['nope'\]"):
        fmodel(x, params={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="two different tensors for the tied parameter"):
        fmodel(x, params={"head.weight": torch.zeros(2, 4), "head2.weight": torch.ones(2, 4)})
    with pytest.raises(TypeError, match="must be a list of tensors"):
        fmodel(x, params=torch.zeros(3))
    with pytest.raises(ValueError, match=r"is on meta but the fmodel's weights are on cpu"):
        fmodel.update_params([p.to("meta") for p in fmodel.fast_params])
    with pytest.raises(TypeError, match="track_higher_grads must be a bool"):
        fmodel.track_higher_grads = 1
    with pytest.raises(TypeError, match="cannot assign a module 'extra'"):
        fmodel.extra = nn.Linear(1, 1)
    with pytest.raises(TypeError, match="already a functional module"):
        monkeypatch(fmodel)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got list"):
        monkeypatch([nn.Linear(1, 1)])
    with pytest.raises(ValueError, match="device must be a torch.device"):
        monkeypatch(nn.Linear(1, 1), device="not-a-device")
    with pytest.raises(TypeError, match="cannot be moved or cast in place"):
        fmodel.double()
    with pytest.raises(KeyError, match="has no counterpart in fmodule"):
        buffer_sync(nn.BatchNorm1d(3), fmodel)


def test_model_on_the_meta_device_needs_device_or_materialization() -> None:
    model = nn.Linear(2, 2, device="meta")
    with pytest.raises(
        ValueError, match="on the meta device.*device=None keeps the model's device"
    ):
        monkeypatch(model)
    with pytest.raises(ValueError, match="on the meta device.*device=cpu"):
        monkeypatch(model, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_cuda_device_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        monkeypatch(nn.Linear(1, 1), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_moves_fast_weights_and_mismatch_is_an_error() -> None:
    model = ConvBN()
    fmodel = monkeypatch(model, device="cuda")
    assert all(p.is_cuda for p in fmodel.parameters()) and all(b.is_cuda for b in fmodel.buffers())
    x = torch.randn(5, 2, 4, 4, device="cuda")
    torch.testing.assert_close(fmodel(x).cpu(), model(x.cpu()))
    with pytest.raises(ValueError, match="is on cpu but the fmodel's weights are on cuda"):
        fmodel.update_params(list(model.parameters()))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    fmodel = monkeypatch(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    params = perturbed(fmodel)
    with_params = torch.compile(lambda x, ps: fmodel(x, params=ps), fullgraph=True)
    latest = torch.compile(lambda x: fmodel(x), fullgraph=True)
    out = with_params(x, params)
    assert_close(out, fmodel(x, params=params))
    grads = torch.autograd.grad(out.sum(), params)
    expected = torch.autograd.grad(fmodel(x, params=params).sum(), params)
    for grad, ref in zip(grads, expected, strict=True):
        assert_close(grad, ref)
    assert_close(latest(x), model(x))
    fmodel.update_params(params)
    assert_close(latest(x), fmodel(x, params=params))
