"""The rule interface: purity, structure, per-parameter values, overrides, vmap, compile, errors."""

from __future__ import annotations

import inspect
import re
from typing import Any

import optree
import pytest
import torch

import higher_func as hf
from higher_func._versions import COMPILED_INNER_LOOPS

from optimizer_cases import CASE_IDS, CASES, OPTION_CASES, OPTION_IDS, OptimizerCase
from torch_versions import needs_torch


def params_and_grads(dtype=torch.float64):
    params = {"w": torch.randn(3, 2, dtype=dtype), "b": torch.randn(2, dtype=dtype)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    return params, grads


def step_n(rule, params, grads, n=3, **overrides):
    state = rule.init(params)
    for _ in range(n):
        params, state = rule.step(params, grads, state, **overrides)
    return params, state


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
def test_step_is_pure(case: OptimizerCase, options: dict[str, Any]) -> None:
    params, grads = params_and_grads()
    rule = case.factory(**options)
    state = rule.init(params)
    state = rule.step(params, grads, state)[1]
    inputs = [*params.values(), *grads.values(), *optree.tree_leaves(state)]
    versions = [t._version for t in inputs]
    copies = [t.clone() for t in inputs]
    rule.step(params, grads, state)
    assert [t._version for t in inputs] == versions
    assert all(torch.equal(a, b) for a, b in zip(inputs, copies, strict=True))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_empty_params(case: OptimizerCase) -> None:
    rule = case.factory()
    state = rule.init({})
    params, new_state = rule.step({}, {}, state)
    assert params == {}
    assert type(new_state) is type(state)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_is_preserved(case: OptimizerCase, dtype: torch.dtype) -> None:
    """Parameters and per-element state keep the parameter's dtype; scalar state (step
    counts, NAdam's mu_product, ASGD's eta and mu) is float32 under the default float32
    dtype, as torch.optim keeps it (a bfloat16 step counter would stall at 256), and float64
    for float64 parameters."""
    params, grads = params_and_grads(torch.float32)
    params = {k: p.to(dtype) for k, p in params.items()}
    grads = {k: g.to(dtype) for k, g in grads.items()}
    new_params, state = step_n(case.factory(**case.option_sets[-1]), params, grads)
    assert all(p.dtype == dtype for p in new_params.values())
    for leaf in optree.tree_leaves(state):
        scalar = torch.float64 if dtype == torch.float64 else torch.float32
        assert leaf.dtype == (dtype if leaf.dim() else scalar)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_per_parameter_lr_equals_separate_rules(case: OptimizerCase) -> None:
    params, grads = params_and_grads()
    options = dict(case.option_sets[0])
    lrs = {"w": 0.03, "b": torch.tensor(0.07, dtype=torch.float64)}
    together, _ = step_n(case.factory(**{**options, "lr": lrs}), params, grads)
    for name in params:
        alone, _ = step_n(
            case.factory(**{**options, "lr": lrs[name]}), {name: params[name]}, {name: grads[name]}
        )
        torch.testing.assert_close(together[name], alone[name], rtol=1e-14, atol=0)


def test_per_element_lr_broadcasts_and_learns() -> None:
    """Meta-SGD: one learned learning rate per element of each parameter."""
    params, grads = params_and_grads()
    lrs = {k: torch.full_like(v, 0.1, requires_grad=True) for k, v in params.items()}
    rule = hf.optim.sgd(lr=lrs)
    new_params, _ = rule.step(params, grads, rule.init(params))
    for name in params:
        torch.testing.assert_close(new_params[name], params[name] - 0.1 * grads[name])
    sum(p.sum() for p in new_params.values()).backward()
    torch.testing.assert_close(lrs["w"].grad, -grads["w"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_override_equals_rule_built_with_it(case: OptimizerCase) -> None:
    params, grads = params_and_grads()
    options = dict(case.option_sets[0])
    lr = 0.5 * options.get("lr", 1.0)
    built = case.factory(**{**options, "lr": lr})
    if "lr" in built.spec.init_only:  # e.g. Rprop: lr is only the initial step size
        with pytest.raises(TypeError, match="only init"):
            case.factory(**options).step(params, grads, built.init(params), lr=lr)
        return
    state = built.init(params)  # ASGD seeds eta from lr at init, like torch
    overridden = case.factory(**options).step(params, grads, state, lr=lr)
    torch.testing.assert_close(overridden, built.step(params, grads, state), rtol=0, atol=0)


def test_none_gradient_leaves_param_and_state_untouched() -> None:
    params, grads = params_and_grads()
    rule = hf.optim.adam(lr=0.1)
    state = rule.init(params)
    new_params, new_state = rule.step(params, {**grads, "b": None}, state)
    assert new_params["b"] is params["b"]
    assert new_state.exp_avg["b"] is state.exp_avg["b"]
    assert new_state.step["b"] == 0 and new_state.step["w"] == 1


def test_nested_and_list_pytrees() -> None:
    rule = hf.optim.adam(lr=0.1)
    nested = {"enc": {"w": torch.ones(2)}, "dec": [torch.ones(3), torch.ones(1)]}
    grads = {"enc": {"w": torch.ones(2)}, "dec": [None, torch.ones(1)]}
    new, state = rule.step(nested, grads, rule.init(nested))
    assert new["dec"][0] is nested["dec"][0]
    torch.testing.assert_close(new["enc"]["w"], torch.full((2,), 0.9))
    assert state.exp_avg["dec"][1].shape == (1,)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vmap_over_tasks_equals_per_task_loop(case: OptimizerCase) -> None:
    """Shared parameters (in_dims=None), batched gradients: three tasks, three steps."""
    rule = case.factory(**case.option_sets[-1])
    params, _ = params_and_grads()
    task_grads = {k: torch.randn(3, *v.shape, dtype=v.dtype) for k, v in params.items()}

    def adapt(grads):
        return step_n(rule, params, grads)[0]

    batched = torch.func.vmap(adapt)(task_grads)
    for task in range(3):
        alone = adapt({k: v[task] for k, v in task_grads.items()})
        for name in params:
            torch.testing.assert_close(batched[name][task], alone[name], rtol=1e-12, atol=1e-14)


def test_vmap_with_per_task_learning_rates() -> None:
    params, grads = params_and_grads()
    lrs = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)

    def adapt(lr):
        return step_n(hf.optim.adam(lr=lr), params, grads)[0]

    batched = torch.func.vmap(adapt)(lrs)
    for task, lr in enumerate(lrs):
        torch.testing.assert_close(batched["w"][task], adapt(lr)["w"], rtol=1e-12, atol=1e-14)


@needs_torch(COMPILED_INNER_LOOPS, "torch.compile of a rule step")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_step_equals_eager(case: OptimizerCase) -> None:
    torch._dynamo.reset()
    rule = case.factory(**case.option_sets[-1])
    params, grads = params_and_grads()
    state = rule.step(params, grads, rule.init(params))[1]
    compiled = torch.compile(rule.step, fullgraph=True, backend="aot_eager")
    got = compiled(params, grads, state)
    expected = rule.step(params, grads, state)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    if "lr" not in rule.spec.init_only:  # a tensor override traces too (no recompiles)
        lr = torch.tensor(0.003, dtype=torch.float64)
        got = compiled(params, grads, state, lr=lr)
        torch.testing.assert_close(
            got, rule.step(params, grads, state, lr=lr), rtol=1e-12, atol=1e-14
        )


@pytest.mark.slow
@needs_torch(COMPILED_INNER_LOOPS, "torch.compile of a rule step")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_inductor_compiled_step_equals_eager(case: OptimizerCase) -> None:
    torch._dynamo.reset()
    rule = case.factory(**case.option_sets[-1])
    params, grads = params_and_grads()
    state = rule.step(params, grads, rule.init(params))[1]
    got = torch.compile(rule.step, fullgraph=True)(params, grads, state)
    torch.testing.assert_close(got, rule.step(params, grads, state), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- bad input

BAD_INPUT = [
    (lambda: hf.optim.sgd(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (lambda: hf.optim.sgd(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    (lambda: hf.optim.sgd(nesterov=True), ValueError, "Nesterov momentum requires a momentum"),
    (lambda: hf.optim.adam(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0"),
    (lambda: hf.optim.adam(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
    (lambda: hf.optim.adam(betas=0.9), ValueError, "betas must be a pair"),
    (lambda: hf.optim.adam(eps=-1e-8), ValueError, "Invalid epsilon value"),
    (lambda: hf.optim.adam(weight_decay=-1), ValueError, "Invalid weight_decay value"),
    (lambda: hf.optim.adam(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate"),
    (lambda: hf.optim.adam(lr={"w": -0.1}), ValueError, "Invalid learning rate"),
    (lambda: hf.optim.adadelta(rho=1.5), ValueError, "Invalid rho value: 1.5"),
    (lambda: hf.optim.rprop(etas=(1.5, 2.0)), ValueError, "Invalid eta values"),
    (lambda: hf.optim.adam(amsgrad=1), TypeError, "amsgrad must be a bool"),
    (lambda: hf.optim.adamw(decoupled_weight_decay=False), ValueError, "always decouples"),
    (lambda: hf.optim.adam(amsgrad={"w": True}), TypeError, "cannot be given per parameter"),
    (
        lambda: hf.optim.rule_factory(torch.optim.LBFGS),
        ValueError,
        r"Optimizer type LBFGS is not supported\. Supported: .*register_rule",
    ),
    (
        lambda: hf.optim.make_rule(hf.optim.adam().spec, {"lrr": 1}),
        TypeError,
        r"unknown option\(s\) \['lrr'\]",
    ),
]

STEP_ERRORS: list[tuple[dict[str, Any], type, str]] = [
    ({"grads": {"w": torch.ones(2)}}, ValueError, r"Missing key\(s\): \['b'\]"),
    (
        {"grads": {"w": torch.ones(2), "b": torch.ones(1), "c": torch.ones(1)}},
        ValueError,
        r"Unexpected key\(s\): \['c'\]",
    ),
    ({"grads": {"w": torch.ones(2), "b": 1.0}}, TypeError, "grads must hold tensors or None"),
    (
        {"params": {"w": torch.ones(2), "b": 3.0}},
        TypeError,
        r"params\['b'\] must be a torch.Tensor",
    ),
    ({"state": "nope"}, TypeError, "state must be the AdamState returned by init"),
    ({"overrides": {"lrr": 0.1}}, TypeError, "unknown hyperparameter override 'lrr'"),
    ({"overrides": {"amsgrad": True}}, TypeError, "cannot override 'amsgrad' per step"),
    ({"overrides": {"lr": -1.0}}, ValueError, "Invalid learning rate: -1.0"),
    ({"overrides": {"lr": {"w": 0.1}}}, ValueError, r"per-parameter 'lr' must be keyed like"),
]


@pytest.mark.parametrize(("make", "error", "message"), BAD_INPUT)
def test_bad_construction(make, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(("change", "error", "message"), STEP_ERRORS)
def test_bad_step_input(change: dict[str, Any], error: type, message: str) -> None:
    rule = hf.optim.adam()
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    arguments = {
        "params": params,
        "grads": {"w": torch.ones(2), "b": torch.ones(1)},
        "state": rule.init(params),
    }
    overrides = change.pop("overrides", {})
    arguments.update(change)
    with pytest.raises(error, match=message):
        rule.step(arguments["params"], arguments["grads"], arguments["state"], **overrides)


def test_state_of_another_structure_is_refused() -> None:
    rule = hf.optim.sgd(momentum=0.9)
    state = rule.init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match=re.escape("state.momentum_buffer must have the same")):
        rule.step({"v": torch.ones(2)}, {"v": torch.ones(2)}, state)


def test_override_that_needs_missing_state_is_refused() -> None:
    rule = hf.optim.sgd(lr=0.1)
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="state.momentum_buffer is None"):
        rule.step(params, params, rule.init(params), momentum=0.9)


def test_unused_state_fields_pass_through_like_torch() -> None:
    """torch.optim keeps a momentum buffer untouched while momentum is 0, then resumes it."""
    rule = hf.optim.sgd(lr=0.1, momentum=0.9, dampening=0.2)
    params, grads = params_and_grads()
    leaves = [p.clone().requires_grad_() for p in params.values()]
    torch_opt = torch.optim.SGD(leaves, lr=0.1, momentum=0.9, dampening=0.2)
    state = rule.init(params)
    for momentum in (0.9, 0.0, 0.0, 0.9):
        new, new_state = rule.step(params, grads, state, momentum=momentum)
        if momentum == 0.0:
            assert new_state.momentum_buffer is state.momentum_buffer
            assert new_state.step is state.step
        params, state = new, new_state
        torch_opt.param_groups[0]["momentum"] = momentum
        for leaf, g in zip(leaves, grads.values(), strict=True):
            leaf.grad = g.clone()
        torch_opt.step()
        torch.testing.assert_close(list(params.values()), leaves, rtol=1e-13, atol=1e-15)


def test_a_hyperparameter_that_would_grow_a_parameter_is_refused() -> None:
    rule = hf.optim.adam(lr=torch.tensor([0.1]))
    params = {"scale": torch.tensor(1.0), "w": torch.ones(3)}
    with pytest.raises(ValueError, match=re.escape("shape of params['scale'] from () to (1,)")):
        rule.step(params, params, rule.init(params))


def test_tensor_overrides_are_not_read_per_step() -> None:
    """A learned value may cross a bound mid-training; reading it would also sync a GPU."""
    rule = hf.optim.sgd(lr=0.1)
    params = {"w": torch.ones(1)}
    new, _ = rule.step(params, params, rule.init(params), lr=torch.tensor(-0.5))
    torch.testing.assert_close(new["w"], torch.tensor([1.5]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        rule.step(params, params, rule.init(params), lr=-0.5)  # a plain number is checked


def test_init_only_option_override_is_refused() -> None:
    rule = hf.optim.rprop()
    params = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match="only init\\(\\) reads it"):
        rule.step(params, params, rule.init(params), lr=0.1)


@pytest.mark.parametrize("recorded", [False, True], ids=["foreach", "recorded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_sgd_equals_torch_bit_for_bit(recorded: bool, dtype: torch.dtype) -> None:
    """SGD's update is torch.optim's own op (add with alpha), so not even the last bit moves."""
    params, grads = params_and_grads(dtype)
    leaves = [p.clone().requires_grad_() for p in params.values()]
    torch_opt = torch.optim.SGD(leaves, lr=0.0123, weight_decay=0.01)
    rule = hf.optim.sgd(lr=0.0123, weight_decay=0.01)
    if recorded:
        params = {k: p.clone().requires_grad_() for k, p in params.items()}
    state = rule.init(params)
    for _ in range(3):
        params, state = rule.step(params, grads, state)
        for leaf, g in zip(leaves, grads.values(), strict=True):
            leaf.grad = g.clone()
        torch_opt.step()
    torch.testing.assert_close(list(params.values()), leaves, rtol=0, atol=0)


def test_implementation_flags_are_accepted_and_change_nothing() -> None:
    params, grads = params_and_grads()
    plain, _ = step_n(hf.optim.adam(lr=0.1), params, grads)
    flagged, _ = step_n(
        hf.optim.adam(lr=0.1, foreach=True, fused=False, capturable=True, differentiable=True),
        params,
        grads,
    )
    torch.testing.assert_close(plain, flagged, rtol=0, atol=0)


# --------------------------------------------------------------------------- registry


def test_registry_covers_the_torch_optimizers() -> None:
    supported = set(hf.optim.supported_optimizers())
    for case in CASES:
        assert case.torch_class in supported
        assert hf.optim.rule_factory(case.torch_class) is case.factory


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_defaults_are_written_once_in_the_factory_signature(case: OptimizerCase) -> None:
    """A rule's defaults are its factory's keyword defaults (plus AdamW's fixed decoupling),
    and each equals torch.optim's default for the option where torch has one."""
    signature = inspect.signature(case.factory).parameters
    written = {n: p.default for n, p in signature.items() if p.kind is p.KEYWORD_ONLY}
    built = case.factory().hyperparameters
    assert {k: built[k] for k in written} == written
    assert set(built) - set(written) <= {"decoupled_weight_decay"}
    torch_signature = inspect.signature(case.torch_class).parameters
    for name, value in written.items():
        torch_default = torch_signature[name].default if name in torch_signature else None
        if torch_default is not None and torch_default is not inspect.Parameter.empty:
            assert torch_default == value, name


def test_register_rule_validates_and_registers() -> None:
    class MySGD(torch.optim.SGD):
        pass

    assert hf.optim.rule_factory(MySGD) is hf.optim.sgd  # nearest registered base
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer subclass"):
        hf.optim.register_rule(int, hf.optim.sgd)
    with pytest.raises(TypeError, match="must build a rule from its defaults"):
        hf.optim.register_rule(MySGD, lambda **kw: object())
    hf.optim.register_rule(MySGD, hf.optim.adam)
    try:
        assert hf.optim.rule_factory(MySGD) is hf.optim.adam
    finally:
        from higher_func._rules._registry import _REGISTRY

        del _REGISTRY[MySGD]


def test_from_torch_optimizer_rejects_foreign_parameters() -> None:
    model = torch.nn.Linear(2, 1)
    other = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*is not among"):
        hf.optim.from_torch_optimizer(optimizer, model)


def test_from_torch_optimizer_ignores_scheduler_bookkeeping() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # adds initial_lr to the group
    [group] = hf.optim.from_torch_optimizer(optimizer, model)
    assert group.rule.hyperparameters["lr"] == 0.1
    assert group.names == ("weight", "bias")


# --------------------------------------------------------------------------- foreach path


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
def test_foreach_path_equals_per_tensor_path(
    case: OptimizerCase, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from higher_func import _execution

    params, grads = params_and_grads()
    params = {**params, "x": torch.randn(4, 1, dtype=torch.float64)}
    grads = {**grads, "x": torch.zeros(4, 1, dtype=torch.float64)}  # zero moments too
    calls = []

    def foreach(tensors, grads=(), *, others=(), rule=None):
        calls.append(len(tensors))
        return _execution.Plan.FOREACH

    monkeypatch.setattr(_execution, "plan", foreach)
    batched, batched_state = step_n(case.factory(**options), params, grads)
    assert calls == [3, 3, 3]  # the foreach path really ran, over all three tensors
    monkeypatch.setattr(_execution, "plan", lambda *a, **k: _execution.Plan.PER_TENSOR)
    single, single_state = step_n(case.factory(**options), params, grads)
    torch.testing.assert_close(batched, single, rtol=1e-15, atol=1e-300)
    torch.testing.assert_close(batched_state, single_state, rtol=1e-15, atol=1e-300)


def test_complex_parameters_are_refused() -> None:
    rule = hf.optim.adam()
    with pytest.raises(TypeError, match=r"params\['z'\] is complex"):
        rule.init({"z": torch.ones(2, dtype=torch.complex64)})
