"""The drop-in API runs higher's programs unchanged and gives their numbers, and each classic
misuse gets a clear error (issue 10, drop-in half).

Where ``higher`` itself is installed (the ``bench`` extra), some tests also run it side by
side; the others check against references written here with higher's arithmetic.
"""

from __future__ import annotations

import copy
import types
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher_func as hf
from higher_func import optim as hf_optim
from higher_func import patch as hf_patch
from higher_func import utils as hf_utils

TOL = 1e-10

pytestmark = pytest.mark.usefixtures("float64_scalar_state")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def data(seed: int = 1, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def shifted(fmodel: Any, by: float) -> list[torch.Tensor]:
    return [p + by for p in fmodel.fast_params]


# --------------------------------------------------------------------------- parameters(time=)


def time_answers(fmodel: Any, times: list[Any]) -> list[Any]:
    """For each time, the weights ``parameters(time=)`` gives, or the error type it raises."""
    answers = []
    for time in times:
        try:
            answers.append([p.detach().clone() for p in fmodel.parameters(time=time)])
        except (ValueError, IndexError) as error:
            answers.append(type(error))
    return answers


def same_answers(ours: list[Any], expected: list[Any]) -> bool:
    if len(ours) != len(expected):
        return False
    for a, b in zip(ours, expected, strict=True):
        if isinstance(a, type) or isinstance(b, type):
            if a is not b:
                return False
        elif not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
            return False
    return True


TIMES = [None, -1, 0, 1, 2, -2, -3, 3]


@pytest.mark.parametrize("track", [False, True], ids=["untracked", "tracked"])
def test_parameters_time_follows_highers_history(track):
    fmodel = hf.monkeypatch(mlp(), track_higher_grads=track)
    initial = [p.detach().clone() for p in fmodel.fast_params]
    first = shifted(fmodel, 1.0)
    fmodel.update_params(first)
    second = shifted(fmodel, 1.0)
    fmodel.update_params(second)
    latest = [p.detach() for p in second]
    if track:  # the full history, indexed like a list
        expected = [latest, latest, initial, first, latest, first, initial, IndexError]
    else:  # higher's one-element history: times 0, -1 and None are the latest weights
        expected = [latest, latest, latest] + [ValueError] * 5
    expected = [e if isinstance(e, type) else [t.detach() for t in e] for e in expected]
    assert same_answers(time_answers(fmodel, TIMES), expected)


def test_untracked_time_zero_serves_a_test_time_gradient():
    """What programs do at test time: grad of a loss w.r.t. fmodel.parameters(time=0)."""
    model, (x, y) = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hf.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(x), y))
        loss = mse(fmodel(x), y)
        grads = torch.autograd.grad(loss, list(fmodel.parameters(time=0)), retain_graph=True)
    expected = torch.autograd.grad(loss, fmodel.fast_params)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))


@pytest.mark.parametrize("track", [False, True], ids=["untracked", "tracked"])
def test_parameters_time_equals_higher(track):
    higher = pytest.importorskip("higher")
    fmodels = [
        higher.monkeypatch(mlp(), track_higher_grads=track),
        hf.monkeypatch(mlp(), track_higher_grads=track),
    ]
    for fmodel in fmodels:
        for by in (1.0, 2.0):
            fmodel.update_params([p + by for p in fmodel.parameters()])
    theirs, ours = (time_answers(f, TIMES) for f in fmodels)
    assert same_answers(ours, theirs)


# --------------------------------------------------------------------------- validation at step


def test_values_overwritten_before_stepping_are_not_validated():
    """A log-scale weight decay kept in param_groups, written as the real value before each
    step: torch.optim accepts it (it validates constructor arguments only), so must we."""
    model, (x, y) = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.0)
    opt.param_groups[0]["weight_decay"] = -16.0  # log10 of the real value
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"^Invalid weight_decay value: -16\.0$"):
            diffopt.step(mse(fmodel(x), y))  # the step uses it: torch's wording, now
        diffopt.param_groups[0]["weight_decay"] = 10.0 ** diffopt.param_groups[0]["weight_decay"]
        new = diffopt.step(mse(fmodel(x), y))
    reference = mlp()
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, weight_decay=1e-16)
    mse(reference(x), y).backward()
    torch_opt.step()
    for a, b in zip(new, reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=0)


def test_deferred_validation_still_imports_torch_state():
    model, (x, y) = mlp(), data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mse(model(x), y).backward()
    opt.step()  # the state to import: moments and a step count of 1
    reference = copy.deepcopy((model, opt))
    opt.param_groups[0]["eps"] = -8.0  # replaced by 1e-8 before the step
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert diffopt.state == [{}]  # nothing is imported while the rule cannot be built
        diffopt.param_groups[0]["eps"] = 1e-8
        new = diffopt.step(mse(fmodel(x), y))
        assert float(diffopt.state[0][0]["step"]) == 2
    ref_model, ref_opt = reference
    ref_opt.zero_grad()
    mse(ref_model(x), y).backward()
    ref_opt.step()
    for a, b in zip(new, ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=0)


def test_a_bad_override_still_fails_at_construction():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        hf.get_diff_optim(opt, model.parameters(), override={"lr": [-1.0]})


# --------------------------------------------------------------------------- higher's helpers


# A custom optimizer written the way public code copies higher's DifferentiableSGD.
class CopiedSGD(torch.optim.SGD):
    pass


class DifferentiableCopiedSGD(hf_optim.DifferentiableOptimizer):
    def _update(self, grouped_grads: hf_optim._GroupedGradsType, **kwargs: Any) -> None:
        zipped = zip(self.param_groups, grouped_grads, strict=True)
        for group_idx, (group, grads) in enumerate(zipped):
            weight_decay, momentum = group["weight_decay"], group["momentum"]
            dampening, nesterov = group["dampening"], group["nesterov"]
            for p_idx, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:
                    continue
                if weight_decay != 0:
                    g = hf_optim._add(g, weight_decay, p)
                if momentum != 0:
                    param_state = self.state[group_idx][p_idx]
                    if "momentum_buffer" not in param_state:
                        buf = param_state["momentum_buffer"] = g
                    else:
                        buf = param_state["momentum_buffer"]
                        buf = hf_optim._add(buf.mul(momentum), 1 - dampening, g)
                        param_state["momentum_buffer"] = buf
                    g = hf_optim._add(g, momentum, buf) if nesterov else buf
                group["params"][p_idx] = hf_optim._add(p, -group["lr"], g)


def copied_sgd_unroll(steps: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Fast weights after ``steps`` and the meta-gradient of the initial weights."""
    model, (x, y) = mlp().to(dtype), data()
    x, y = x.to(dtype), y.to(dtype)
    opt = CopiedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(mse(fmodel(x), y))
        mse(fmodel(x), y).backward()
    return [p.detach() for p in fmodel.fast_params], model[0].weight.grad


def higher_sgd_reference(steps: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], Any]:
    """The same unroll written out with higher's SGD arithmetic (``p + (-lr * g)``, ...)."""
    model, (x, y) = mlp().to(dtype), data()
    x, y = x.to(dtype), y.to(dtype)
    names = [name for name, _ in model.named_parameters()]
    params = [p.clone() for p in model.parameters()]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    for _ in range(steps):
        loss = mse(functional_call(model, dict(zip(names, params, strict=True)), x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        new = []
        for k, (p, g) in enumerate(zip(params, grads, strict=True)):
            g = g + (0.01 * p)
            buf = g if buffers[k] is None else buffers[k].mul(0.9) + ((1 - 0.0) * g)
            buffers[k] = buf
            new.append(p + (-0.1 * buf))
        params = new
    mse(functional_call(model, dict(zip(names, params, strict=True)), x), y).backward()
    return [p.detach() for p in params], model[0].weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_custom_optimizer_copied_from_highers_sgd_gives_highers_numbers(dtype):
    hf.register_optim(CopiedSGD, DifferentiableCopiedSGD)
    weights, meta_grad = copied_sgd_unroll(4, dtype)
    expected_weights, expected_meta_grad = higher_sgd_reference(4, dtype)
    for a, b in zip(weights, expected_weights, strict=True):
        assert torch.equal(a, b)  # the same operations in the same order: bit for bit
    torch.testing.assert_close(
        meta_grad, expected_meta_grad, rtol=1e-6 if dtype == torch.float32 else TOL, atol=0
    )


def test_a_custom_optimizer_copied_from_highers_sgd_equals_higher_itself():
    higher = pytest.importorskip("higher")
    hf.register_optim(CopiedSGD, DifferentiableCopiedSGD)
    weights, meta_grad = copied_sgd_unroll(4, torch.float32)
    model, (x, y) = mlp().float(), data()
    x, y = x.float(), y.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(mse(fmodel(x), y))
        mse(fmodel(x), y).backward()
    for a, b in zip(weights, fmodel.fast_params, strict=True):
        assert torch.equal(a, b.detach())
    torch.testing.assert_close(meta_grad, model[0].weight.grad, rtol=1e-6, atol=0)


def test_highers_module_level_names_exist_with_highers_behaviour():
    from higher_func.optim import (  # noqa: F401  (the imports public code writes)
        DifferentiableOptimizer,
        _add,
        _addcdiv,
        _addcmul,
        _GradCallbackType,
        _GroupedGradsType,
        _maybe_mask,
        _OverrideType,
        _StateType,
    )
    from higher_func.patch import _BufferType, _EncapsulatorType, _MonkeyPatchBase  # noqa: F401
    from higher_func.utils import _T, _U, _copy_tensor, _get_param_mapping  # noqa: F401

    t, a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0]), torch.tensor([2.0, 4.0])
    assert torch.equal(_add(t, 0.5, a), t + 0.5 * a) and torch.equal(_add(t, a), t + a)
    assert torch.equal(_addcdiv(t, -0.5, a, b), t + -0.5 * (a / b))
    assert torch.equal(_addcmul(t, 2.0, a, b), t + 2.0 * a * b)
    assert isinstance(hf.monkeypatch(nn.Linear(1, 1)), _MonkeyPatchBase)
    assert hf_optim._opt_mapping[torch.optim.Adam] is hf_optim.DifferentiableAdam
    # _maybe_mask zeroes the gradient through sqrt at 0, at every order (higher's trick).
    v = torch.tensor([0.0, 4.0], requires_grad=True)
    s = v * 1.0
    _maybe_mask(s, s == 0)
    (g,) = torch.autograd.grad(s.sqrt().sum(), v)
    assert torch.equal(g, torch.tensor([0.0, 0.25]))


def test_every_module_level_name_of_higher_that_programs_import_exists():
    higher = pytest.importorskip("higher")
    machinery = {  # higher.patch's run-time subclassing, replaced here (see _compat)
        "_internal_attrs",
        "_modify_internally",
        "_patched_parameters",
        "_ParameterPlaceholder",
        "_make_functional",
        "_update_patched_params",
    }
    pairs = [(higher.optim, hf_optim), (higher.patch, hf_patch), (higher.utils, hf_utils)]
    for theirs, ours in pairs:
        names = {
            name
            for name, value in vars(theirs).items()
            if not name.startswith("__")
            and not isinstance(value, types.ModuleType)
            and getattr(value, "__module__", theirs.__name__) in (theirs.__name__, "typing")
        }
        missing = sorted(names - machinery - set(dir(ours)))
        assert not missing, f"{theirs.__name__}: {missing}"


# --------------------------------------------------------------------------- one answer


class MyAdam(torch.optim.Adam):
    pass


def test_a_subclass_of_a_torch_optimizer_works_through_every_entry_point():
    model, (x, y) = mlp(), data()
    opt = MyAdam(model.parameters(), lr=0.01)
    assert hf_optim.rule_factory(MyAdam) is hf_optim.adam
    [group] = hf_optim.from_torch_optimizer(opt, model)
    assert group.rule.name == "adam"
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert isinstance(diffopt, hf_optim.DifferentiableAdam)
        new = diffopt.step(mse(fmodel(x), y))
    expected = hf.create_diff_optim(MyAdam, {"lr": 0.01}, params=list(model.parameters()))
    ref = expected.step(mse(model(x), y), params=list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(new, ref, strict=True))


def test_an_unsupported_optimizer_is_the_same_error_everywhere():
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters())
    message = r"^Optimizer type LBFGS is not supported\. Supported: .*Adam.*register_rule"
    for attempt in (
        lambda: hf_optim.rule_factory(torch.optim.LBFGS),
        lambda: hf_optim.from_torch_optimizer(opt, model),
        lambda: hf.get_diff_optim(opt, model.parameters()),
        lambda: hf.create_diff_optim(torch.optim.LBFGS, params=list(model.parameters())),
        lambda: hf_optim.DifferentiableRuleOptimizer(opt, model.parameters()),
    ):
        with pytest.raises(ValueError, match=message):
            attempt()


def test_an_unknown_override_is_the_same_error_everywhere():
    model, (x, y) = mlp(), data()
    params = dict(model.named_parameters())
    rule = hf_optim.sgd(lr=0.1)
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    message = r"got an unknown hyperparameter override 'lrr'; valid names are \[.*'lr'"
    with pytest.raises(TypeError, match=r"^sgd\.step\(\) " + message):
        rule.step(params, grads, rule.init(params), lrr=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"^DifferentiableSGD " + message):
        hf.get_diff_optim(opt, model.parameters(), override={"lrr": [0.2]})
    diffopt = hf.get_diff_optim(opt, model.parameters())
    with pytest.raises(TypeError, match=r"^DifferentiableSGD " + message):
        diffopt.step(mse(model(x), y), params=list(model.parameters()), override={"lrr": [0.2]})


# --------------------------------------------------------------------------- misuse


def test_grad_callback_returning_wrong_shapes_is_a_clear_error():
    model, (x, y) = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(
            ValueError,
            match=r"grad_callback's result\[0\] has shape \(\) but params\[0\] has shape "
            r"\(4, 3\); a gradient is never broadcast",
        ):
            diffopt.step(mse(fmodel(x), y), grad_callback=lambda gs: [g.sum() for g in gs])
        with pytest.raises(TypeError, match=r"grad_callback's result\[1\] must be a torch.Tensor"):
            diffopt.step(mse(fmodel(x), y), grad_callback=lambda gs: [gs[0], 1.0, *gs[2:]])


@pytest.mark.parametrize("how", ["update_params", "fast_params", "forward"])
def test_fast_weights_of_the_wrong_shape_are_a_clear_error(how):
    fmodel, (x, _) = hf.monkeypatch(mlp()), data()
    wrong = [p.reshape(-1) for p in fmodel.fast_params]  # same numbers, flattened
    message = r"fast weight for parameter '0.weight' has shape \(12,\) but the parameter has "
    with pytest.raises(ValueError, match=message + r"shape \(4, 3\)"):
        if how == "update_params":
            fmodel.update_params(wrong)
        elif how == "fast_params":
            fmodel.fast_params = wrong
        else:
            fmodel(x, params=wrong)


@pytest.mark.parametrize("copy_initial_weights", [True, False])
def test_a_loss_from_the_original_model_is_a_clear_error(copy_initial_weights):
    """The classic: ``model(x)`` instead of ``fmodel(x)`` made the step a silent no-op."""
    model, (x, y) = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    context = hf.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights)
    message = r"instead of the functional one \(fmodel\(x\)\)"
    with context as (_, diffopt), pytest.raises(ValueError, match=message):
        diffopt.step(mse(model(x), y))


def test_a_non_scalar_loss_is_a_clear_error():
    model, (x, y) = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    message = r"loss must be a scalar.*shape \(6, 1\).*\.mean\(\)"
    with (
        hf.innerloop_ctx(model, opt) as (fmodel, diffopt),
        pytest.raises(ValueError, match=message),
    ):
        diffopt.step((fmodel(x) - y) ** 2)


def test_copy_initial_weights_puts_the_meta_gradient_on_the_initial_fast_weights():
    """higher's default: the model's .grad stays empty; the documented check
    (docs/migrating-from-higher.md) finds the meta-gradient on init_fast_params."""
    grads = {}
    for copy_initial_weights in (True, False):
        model, (x, y) = mlp(), data()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with hf.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights) as (
            fmodel,
            diffopt,
        ):
            for _ in range(2):
                diffopt.step(mse(fmodel(x), y))
            mse(fmodel(x), y).backward()
            initial = fmodel.init_fast_params[0]
            grads[copy_initial_weights] = (
                model[0].weight.grad,
                initial.grad if initial.is_leaf else None,
            )
    assert grads[True][0] is None  # higher's semantics, kept
    assert grads[False][0] is not None
    torch.testing.assert_close(grads[True][1], grads[False][0], rtol=TOL, atol=0)


def test_a_deep_copy_of_a_stepped_diffopt_continues_like_the_original():
    model, (x, y) = mlp(), data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(mse(fmodel(x), y))
        fmodel_copy, diffopt_copy = copy.deepcopy((fmodel, diffopt))
        lone_copy = copy.deepcopy(diffopt)
        assert diffopt_copy._fmodel is fmodel_copy  # copied together, still linked
        assert lone_copy._fmodel is not fmodel
        expected = diffopt.step(mse(fmodel(x), y))
        continued = diffopt_copy.step(mse(fmodel_copy(x), y))
    assert all(torch.equal(a, b) for a, b in zip(continued, expected, strict=True))
    # A detached snapshot: the copy's steps do not reach the original's initial weights.
    initial = fmodel.init_fast_params
    reached = torch.autograd.grad(continued[0].sum(), initial, allow_unused=True)
    assert all(g is None for g in reached)
    assert torch.autograd.grad(expected[0].sum(), initial[0]) is not None


def test_the_same_parameter_in_two_groups_is_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    opt.param_groups[1]["params"].append(model[0].weight)  # torch would step it twice
    with pytest.raises(
        ValueError,
        match=r"param_groups\[1\]\['params'\]\[2\] is the same tensor as "
        r"param_groups\[0\]\['params'\]\[0\].*torch.optim would update it twice",
    ):
        hf.get_diff_optim(opt, model.parameters())


class PlainListNet(nn.Module):
    def __init__(self, registered: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
        layers = [self.first, self.second]
        self.weights = nn.ParameterList([m.weight for m in layers]) if registered else None
        if not registered:
            self.weights = [m.weight for m in layers]  # a plain list: goes stale in an fmodel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(nn.functional.linear(x, self.weights[0], self.first.bias))
        return nn.functional.linear(hidden, self.weights[1], self.second.bias)


def test_a_parameter_held_in_a_plain_list_is_detected_at_set_up():
    with pytest.warns(
        UserWarning,
        match=r"model\.weights holds the parameter 'first\.weight' in a plain Python list.*"
        r"nn\.ParameterList",
    ):
        hf.monkeypatch(PlainListNet(registered=False))


def test_the_documented_fix_for_a_plain_list_gives_torchs_numbers():
    model, (x, y) = PlainListNet(registered=True), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fix: no warning
        context = hf.innerloop_ctx(model, opt)
        fmodel, diffopt = context.__enter__()
    for _ in range(3):
        diffopt.step(mse(fmodel(x), y))
    latest = fmodel(x)
    for _ in range(3):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    torch.testing.assert_close(latest, model(x), rtol=TOL, atol=0)


def test_adagrad_group_added_later_is_seeded_like_torch():
    """torch seeds every accumulator from the constructor's initial_accumulator_value, also
    in a group added with its own (which torch ignores)."""

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        opt = torch.optim.Adagrad(model[0].parameters(), lr=0.1, initial_accumulator_value=0.1)
        opt.add_param_group({"params": model[2].parameters(), "initial_accumulator_value": 0.5})
        return model, opt

    (x, y), (model, opt) = data(), build()
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(x), y))
    model, opt = build()
    for _ in range(3):
        opt.zero_grad()
        mse(model(x), y).backward()
        try:
            opt.step()
        except KeyError as error:  # an older torch seeds accumulators in __init__ only
            pytest.skip(
                f"torch {torch.__version__}'s Adagrad cannot step a group added by "
                f"add_param_group (KeyError {error}): no reference to compare with"
            )
    for a, b in zip(fmodel.fast_params, model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=0)


# --------------------------------------------------------------------------- mixed precision


class AutocastNet(nn.Module):
    """float32 weights, the forward under bfloat16 autocast (CPU)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.body(x)
        return out.float()


def test_bf16_autocast_in_the_model_gives_the_functional_reference_meta_gradient():
    model, (x, y) = AutocastNet(), data()
    x, y = x.float(), y.float()
    lr, steps = 0.1, 3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(mse(fmodel(x), y))
        assert fmodel(x).dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in fmodel.fast_params)
        (meta_grad,) = torch.autograd.grad(mse(fmodel(x), y), [model.body[0].weight])

    # The reference: the same unroll by hand with functional_call, under the same autocast;
    # the update is the pure rule (whose float32 arithmetic the rule tests pin).
    names = [name for name, _ in model.named_parameters()]
    rule = hf.optim.sgd(lr=lr)
    params = dict(model.named_parameters())
    state = rule.init(params)
    for _ in range(steps):
        loss = mse(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params, state = rule.step(params, dict(zip(names, grads, strict=True)), state)
    query = mse(functional_call(model, params, (x,)), y)
    (expected,) = torch.autograd.grad(query, [model.body[0].weight])
    assert meta_grad.dtype == torch.float32 and meta_grad.abs().sum() > 0
    torch.testing.assert_close(meta_grad, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- error inputs

#: (torch class, option, invalid value): rows run through torch.optim's constructor, the
#: pure rule's factory and the drop-in step (the value written into param_groups first).
ERROR_INPUTS = [
    (torch.optim.SGD, "lr", -0.1),
    (torch.optim.SGD, "momentum", -0.5),
    (torch.optim.SGD, "weight_decay", -16.0),
    (torch.optim.Adam, "lr", -1.0),
    (torch.optim.Adam, "eps", -1e-8),
    (torch.optim.Adam, "betas", (1.0, 0.999)),
    (torch.optim.Adam, "betas", (0.9, -0.1)),
    (torch.optim.Adam, "weight_decay", -0.1),
    (torch.optim.AdamW, "weight_decay", -0.1),
    (torch.optim.Adagrad, "lr_decay", -0.1),
    (torch.optim.Adagrad, "eps", -1.0),
    (torch.optim.Adadelta, "rho", 1.5),
    (torch.optim.Adamax, "betas", (0.9, 1.0)),
    (torch.optim.RMSprop, "alpha", -0.99),
    (torch.optim.RMSprop, "momentum", -0.1),
    (torch.optim.Rprop, "etas", (1.5, 2.0)),
    (torch.optim.NAdam, "momentum_decay", -0.1),
    (torch.optim.RAdam, "eps", -1.0),
    (torch.optim.ASGD, "weight_decay", -1.0),
]


def raised(attempt: Any) -> tuple[type, str]:
    try:
        attempt()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    raise AssertionError("no error was raised")


@pytest.mark.parametrize(
    ("torch_class", "key", "value"),
    ERROR_INPUTS,
    ids=[f"{c.__name__}-{k}-{v}" for c, k, v in ERROR_INPUTS],
)
def test_an_invalid_hyperparameter_is_torchs_error_through_every_entry_point(
    torch_class, key, value
):
    model, (x, y) = mlp(), data()
    expected = raised(lambda: torch_class(model.parameters(), **{key: value}))
    factory = hf_optim.rule_factory(torch_class)
    assert raised(lambda: factory(**{key: value})) == expected
    opt = torch_class(model.parameters())
    opt.param_groups[0][key] = value  # torch.optim itself accepts this until it steps
    with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert raised(lambda: diffopt.step(mse(fmodel(x), y))) == expected
