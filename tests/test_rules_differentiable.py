"""Gradients through the rules: gradcheck/gradgradcheck, torch.func.grad, zero second moments."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import higher_func as hf

from optimizer_cases import CASE_IDS, CASES, OptimizerCase


def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A smooth, non-quadratic loss, so that second-order terms matter."""
    return (torch.sin(params["w"]) * params["w"]).sum() + (params["b"] ** 3).sum()


def unroll(rule: hf.optim.Rule, params: dict[str, torch.Tensor], steps: int):
    state = rule.init(params)
    for _ in range(steps):
        values = torch.autograd.grad(loss_fn(params), list(params.values()), create_graph=True)
        params, state = rule.step(params, dict(zip(params, values, strict=True)), state)
    return params


def hyperparameter_leaves(case: OptimizerCase) -> tuple[list[str], list[torch.Tensor]]:
    """Every numeric hyperparameter of the case as a float64 tensor requiring grad."""
    names, leaves = [], []
    for name, value in case.tensor_hyperparameters.items():
        for index, v in enumerate(value if isinstance(value, tuple) else (value,)):
            names.append(f"{name}.{index}" if isinstance(value, tuple) else name)
            leaves.append(torch.tensor(v, dtype=torch.float64, requires_grad=True))
    return names, leaves


def rebuild(case: OptimizerCase, names: list[str], leaves: tuple[torch.Tensor, ...]) -> dict:
    options: dict[str, Any] = dict(case.gradcheck_options)
    pairs: dict[str, list[torch.Tensor]] = {}
    for name, leaf in zip(names, leaves, strict=True):
        if "." in name:
            pairs.setdefault(name.split(".")[0], []).append(leaf)
        else:
            options[name] = leaf
    options.update({k: tuple(v) for k, v in pairs.items()})
    return options


def initial_params() -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.tensor([[0.3, -1.2], [0.8, 2.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, -0.7, 1.1], dtype=torch.float64, requires_grad=True)
    return w, b


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_through_unrolled_steps(case: OptimizerCase) -> None:
    names, hyper = hyperparameter_leaves(case)

    def final_params(w, b, *hyper_leaves):
        rule = case.factory(**rebuild(case, names, hyper_leaves))
        out = unroll(rule, {"w": w, "b": b}, case.gradcheck_steps)
        return out["w"], out["b"]

    inputs = (*initial_params(), *hyper)
    assert gradcheck(final_params, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradgradcheck_through_unrolled_steps(case: OptimizerCase) -> None:
    names, hyper = hyperparameter_leaves(case)

    def final_loss(w, b, *hyper_leaves):
        rule = case.factory(**rebuild(case, names, hyper_leaves))
        return loss_fn(unroll(rule, {"w": w, "b": b}, 2))

    inputs = (*initial_params(), *hyper)
    assert gradgradcheck(final_loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_func_grad_of_three_step_unroll_equals_autograd(case: OptimizerCase) -> None:
    rule = case.factory(**case.option_sets[-1])

    def unrolled_loss(params):
        state = rule.init(params)
        for _ in range(3):
            params, state = rule.step(params, torch.func.grad(loss_fn)(params), state)
        return loss_fn(params)

    w, b = initial_params()
    params = {"w": w, "b": b}
    expected = torch.autograd.grad(loss_fn(unroll(rule, params, 3)), [w, b])
    got = torch.func.grad(unrolled_loss)(params)
    torch.testing.assert_close(got["w"], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["b"], expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradient_stays_finite_when_a_gradient_is_exactly_zero(case: OptimizerCase) -> None:
    """A zero gradient gives a zero second moment; sqrt'(0) must not turn into nan."""
    for options in case.option_sets:
        if case.unsupported(options):  # refused on this torch: nothing to differentiate
            with pytest.raises(hf.TorchVersionError, match="needs torch >="):
                case.factory(**options)
            continue
        w = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
        rule = case.factory(**options)

        def quadratic_with_flat_spot(p):
            return (p * p * torch.tensor([0.0, 1.0], dtype=torch.float64)).sum()

        params, state = {"w": w}, rule.init({"w": w})
        for _ in range(3):
            (g,) = torch.autograd.grad(
                quadratic_with_flat_spot(params["w"]), [params["w"]], create_graph=True
            )
            params, state = rule.step(params, {"w": g}, state)
        (meta_grad,) = torch.autograd.grad(params["w"].sum(), [w])
        assert torch.isfinite(meta_grad).all(), f"{case.name}{options}: {meta_grad}"


def test_safe_sqrt_values_and_derivatives() -> None:
    x = torch.tensor([0.0, 4.0, -1.0], dtype=torch.float64, requires_grad=True)
    y = hf.optim.safe_sqrt(x)
    assert y[0] == 0 and y[1] == 2 and torch.isnan(y[2])
    (g,) = torch.autograd.grad(y[:2].sum(), [x])
    assert g.tolist()[:2] == [0.0, 0.25]


def _where_form_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``safe_sqrt`` as every transform runs it (vmap, grad, forward mode, compile)."""
    zero = x == 0
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_recorded_safe_sqrt_equals_the_where_form_bit_for_bit(dtype) -> None:
    """While autograd records, safe_sqrt of a large tensor runs one sqrt forward (a custom
    autograd Function); its values, first and second derivatives are the where form's, bit
    for bit, zeros (also -0.0) included."""
    from higher_func._execution import ONE_PASS_SQRT_MIN_ELEMENTS

    torch.manual_seed(0)
    start = torch.rand(ONE_PASS_SQRT_MIN_ELEMENTS, dtype=dtype)
    start[::7] = 0.0
    start[3] = -0.0
    weights = torch.randn(ONE_PASS_SQRT_MIN_ELEMENTS, dtype=dtype)
    results = []
    for sqrt in (hf.optim.safe_sqrt, _where_form_sqrt):
        x = start.clone().requires_grad_()
        y = sqrt(x)
        (first,) = torch.autograd.grad((y * weights).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad((first * weights).sum(), x)
        results.append((y.detach(), first.detach(), second, type(y.grad_fn).__name__))
    (ours, reference) = results
    assert ours[3] == "_RecordedSafeSqrtBackward" and reference[3] == "WhereBackward0"
    assert all(torch.equal(a, b) for a, b in zip(ours[:3], reference[:3], strict=True))
    assert torch.isnan(hf.optim.safe_sqrt(torch.tensor([-1.0], requires_grad=True))).all()
    small = hf.optim.safe_sqrt(start[:-1].clone().requires_grad_())  # one element fewer
    assert type(small.grad_fn).__name__ == "WhereBackward0"  # the four ops cost less there


def test_recorded_safe_sqrt_passes_gradcheck_to_second_order() -> None:
    from higher_func._rules._math import _RecordedSafeSqrt

    x = (torch.rand(6, dtype=torch.float64) + 0.1).requires_grad_()
    assert gradcheck(_RecordedSafeSqrt.apply, (x,))
    assert gradgradcheck(_RecordedSafeSqrt.apply, (x,))


def test_learned_lr_receives_its_hypergradient() -> None:
    """d/d lr of one SGD step on a quadratic is known in closed form: -g . g."""
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    rule = hf.optim.sgd(lr=lr)
    params, _ = rule.step({"w": w}, {"w": 2 * w}, rule.init({"w": w}))
    loss = (params["w"] ** 2).sum()  # = |w - 2 lr w|^2
    (d_lr,) = torch.autograd.grad(loss, [lr])
    expected = (2 * (w - 2 * lr * w) * (-2 * w)).sum()
    torch.testing.assert_close(d_lr, expected.detach(), rtol=1e-14, atol=0)


def test_safe_sqrt_second_derivative_is_finite_at_zero() -> None:
    """Through a gradient that is exactly zero in places: sqrt(g^2) differentiated twice."""
    x = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([0.0, 1.0], dtype=torch.float64)
    (g,) = torch.autograd.grad((x * x * mask).sum(), x, create_graph=True)
    (first,) = torch.autograd.grad(hf.optim.safe_sqrt(g * g).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    assert first.tolist() == [0.0, 2.0]
    assert second.tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- forward mode

#: The gradient of a quadratic, written out so that forward mode needs no reverse pass;
#: its second row and the last element of ``b`` get exactly zero gradients every step,
#: so second moments stay exactly zero there (where ``sqrt``'s derivative is infinite).
CURVATURE = torch.tensor(
    [[1.5, -0.3, 0.2, 0.0], [0.0] * 4, [0.2, 0.4, 2.0, 0.0], [0.0] * 4], dtype=torch.float64
)


def forward_unroll(case: OptimizerCase, start: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """The weights after ``case.gradcheck_steps`` steps from ``start``, a function of both."""
    options = {**case.gradcheck_options, **case.tensor_hyperparameters, "lr": lr}
    if "weight_decay" in options and not options.get("decoupled_weight_decay", False):
        options["weight_decay"] = 0.0  # coupled weight decay would make the zero gradients not zero
    rule = case.factory(**options)
    params = {"w": start}
    state = rule.init(params)
    for _ in range(case.gradcheck_steps):
        w = params["w"]
        grad = CURVATURE @ w + torch.tensor([0.3, 0.0, -0.5, 0.0], dtype=torch.float64)
        params, state = rule.step(params, {"w": grad}, state)
    return params["w"]


def forward_point(case: OptimizerCase) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    start = torch.tensor([0.4, -0.9, 1.3, 0.7], dtype=torch.float64)
    lr = torch.tensor(float(case.tensor_hyperparameters.get("lr", 0.01)), dtype=torch.float64)
    tangents = (
        torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64),
        torch.tensor(0.7, dtype=torch.float64),
    )
    return (start, lr), tangents


def reverse_jvp(case: OptimizerCase, primals, tangents) -> torch.Tensor:
    """J @ v from the reverse-mode Jacobian."""
    jacobians = torch.autograd.functional.jacobian(lambda *a: forward_unroll(case, *a), primals)
    return sum(j.reshape(4, -1) @ t.reshape(-1) for j, t in zip(jacobians, tangents, strict=True))


@pytest.mark.usefixtures("float64_scalar_state")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_mode_equals_reverse_mode(case: OptimizerCase) -> None:
    """forward_ad, torch.func.jvp and jacfwd through every rule: finite (zero second moments
    included) and equal to reverse mode."""
    primals, tangents = forward_point(case)
    expected = reverse_jvp(case, primals, tangents)
    assert torch.isfinite(expected).all()
    with torch.autograd.forward_ad.dual_level():
        duals = [
            torch.autograd.forward_ad.make_dual(p, t)
            for p, t in zip(primals, tangents, strict=True)
        ]
        dual_ad = torch.autograd.forward_ad.unpack_dual(forward_unroll(case, *duals)).tangent
    _, dual_jvp = torch.func.jvp(lambda *a: forward_unroll(case, *a), primals, tangents)
    jac_w, jac_lr = torch.func.jacfwd(lambda *a: forward_unroll(case, *a), argnums=(0, 1))(*primals)
    dual_jacfwd = jac_w @ tangents[0] + jac_lr * tangents[1]
    for got in (dual_ad, dual_jvp, dual_jacfwd):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
