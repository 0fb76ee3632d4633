"""The functional inner loop: closed forms, options, torch.optim parity and errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher_func as hf
from higher_func.func import (
    FunctionalModel,
    inner_loop,
    meta_loss,
    rule_from_optimizer,
)

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
CURVATURE, TARGET = 3.0, 2.0


def quadratic(params: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """0.5 * a * (w - t)^2: SGD's iterates are w_k = t + (1 - lr a)^k (w_0 - t)."""
    return 0.5 * CURVATURE * (params["w"] - target) ** 2


def scalar(value: float, grad: bool = True) -> torch.Tensor:
    return torch.tensor(value, dtype=DTYPE, requires_grad=grad)


def test_sgd_iterates_and_derivatives_match_the_closed_form() -> None:
    w0, lr, steps = scalar(0.5), scalar(0.1), 4
    target = torch.tensor(TARGET, dtype=DTYPE)
    result = inner_loop(
        quadratic,
        hf.optim.sgd(lr=0.1),
        {"w": w0},
        target,
        steps=steps,
        hyperparameters={"lr": lr},
    )
    contraction = 1 - lr.detach() * CURVATURE
    expected = TARGET + contraction**steps * (w0.detach() - TARGET)
    torch.testing.assert_close(result.params["w"], expected, **TOL)
    d_w0, d_lr = torch.autograd.grad(result.params["w"], (w0, lr))
    torch.testing.assert_close(d_w0, contraction**steps, **TOL)
    expected_d_lr = -steps * CURVATURE * contraction ** (steps - 1) * (w0.detach() - TARGET)
    torch.testing.assert_close(d_lr, expected_d_lr, **TOL)


def test_losses_and_trajectory_record_every_iterate() -> None:
    rule = hf.optim.adam(lr=0.1)
    params = {"w": scalar(0.5)}
    target = torch.tensor(TARGET, dtype=DTYPE)
    result = inner_loop(quadratic, rule, params, target, steps=3, trajectory=True)
    assert result.trajectory is not None and len(result.trajectory) == 4
    assert result.trajectory[0] is params
    state = rule.init(params)
    current = params
    for k in range(3):
        torch.testing.assert_close(result.losses[k], quadratic(current, target), **TOL)
        grads = {"w": CURVATURE * (current["w"] - target)}
        current, state = rule.step(current, grads, state)
        torch.testing.assert_close(result.trajectory[k + 1]["w"], current["w"], **TOL)
    torch.testing.assert_close(result.params["w"], current["w"], **TOL)
    torch.testing.assert_close(result.state.exp_avg["w"], state.exp_avg["w"], **TOL)
    assert inner_loop(quadratic, rule, params, target, steps=3).trajectory is None


def test_zero_steps_return_the_start() -> None:
    params = {"w": scalar(0.5)}
    result = inner_loop(quadratic, hf.optim.sgd(lr=0.1), params, torch.tensor(1.0), steps=0)
    assert result.params is params and result.losses.shape == (0,)


def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_point() -> None:
    """FOMAML with SGD: d L_q(phi_K) / d theta ~ grad L_q(phi_K) (inner Hessians dropped)."""
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    f = FunctionalModel(model)
    x, y = torch.randn(5, 2, dtype=DTYPE), torch.randn(5, 1, dtype=DTYPE)

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    rule = hf.optim.sgd(lr=0.2)
    adapted = inner_loop(loss, rule, f.params, x, y, steps=3, first_order=True).params
    meta = torch.autograd.grad(loss(adapted, x, y), list(f.params.values()))
    at_adapted = {n: p.detach().requires_grad_() for n, p in adapted.items()}
    direct = torch.autograd.grad(loss(at_adapted, x, y), list(at_adapted.values()))
    for a, e in zip(meta, direct, strict=True):
        torch.testing.assert_close(a, e, **TOL)
    second_order = inner_loop(loss, rule, f.params, x, y, steps=3).params
    full = torch.autograd.grad(loss(second_order, x, y), list(f.params.values()))
    assert not all(torch.allclose(a, b) for a, b in zip(full, meta, strict=True))


def test_truncation_differentiates_only_the_last_steps() -> None:
    w0, lr = scalar(0.5), scalar(0.1)
    target = torch.tensor(TARGET, dtype=DTYPE)
    rule = hf.optim.sgd(lr=0.1)
    result = inner_loop(
        quadratic,
        rule,
        {"w": w0},
        target,
        steps=4,
        truncate=1,
        hyperparameters={"lr": lr},
        trajectory=True,
    )
    assert result.trajectory is not None
    before_last = result.trajectory[3]["w"]
    assert not before_last.requires_grad  # the first three steps built no graph
    d_w0, d_lr = torch.autograd.grad(result.params["w"], (w0, lr), allow_unused=True)
    assert d_w0 is None
    # w_4 = w_3 - lr * a * (w_3 - t) with w_3 held constant.
    torch.testing.assert_close(d_lr, -CURVATURE * (before_last - TARGET), **TOL)

    def last_iterate(learning_rate: torch.Tensor) -> torch.Tensor:
        overrides = {"lr": learning_rate}
        w = {"w": w0.detach()}
        return inner_loop(
            quadratic, rule, w, target, steps=4, truncate=1, hyperparameters=overrides
        ).params["w"]

    torch.testing.assert_close(torch.func.grad(last_iterate)(lr.detach()), d_lr, **TOL)
    untruncated = inner_loop(quadratic, rule, {"w": w0}, target, steps=4, truncate=4)
    torch.testing.assert_close(untruncated.params["w"], result.params["w"], **TOL)
    assert untruncated.params["w"].requires_grad


def test_a_schedule_gives_each_step_its_own_learning_rate() -> None:
    rates = torch.tensor([0.1, 0.2, 0.05], dtype=DTYPE, requires_grad=True)
    w0 = scalar(0.5)
    target = torch.tensor(TARGET, dtype=DTYPE)
    result = inner_loop(
        quadratic,
        hf.optim.sgd(lr=1.0),
        {"w": w0},
        target,
        steps=3,
        hyperparameters=lambda k: {"lr": rates[k]},
    )
    expected = TARGET + torch.prod(1 - rates.detach() * CURVATURE) * (w0.detach() - TARGET)
    torch.testing.assert_close(result.params["w"], expected, **TOL)
    (d_rates,) = torch.autograd.grad(result.params["w"], rates)
    assert d_rates.abs().min() > 0


def test_outer_torch_func_grad_equals_backward() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).to(DTYPE)
    f = FunctionalModel(model)
    support = (torch.randn(6, 2, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE))
    query = (torch.randn(6, 2, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE))

    def loss(p: Any, buffers: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        out, buffers = f.with_buffers(p, buffers, x)
        return F.mse_loss(out, y), buffers

    def objective(p: Any) -> torch.Tensor:
        return meta_loss(
            loss, hf.optim.rmsprop(lr=0.01), p, support, query, steps=2, buffers=f.buffers
        )

    by_func = torch.func.grad(objective)({n: p.detach() for n, p in f.params.items()})
    by_backward = torch.autograd.grad(objective(f.params), list(f.params.values()))
    for name, expected in zip(f.params, by_backward, strict=True):
        torch.testing.assert_close(by_func[name], expected, **TOL)


# --------------------------------------------------------------------------- the model


def test_functional_model_equals_the_module_and_leaves_it_alone() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).to(DTYPE)
    reference = copy.deepcopy(model)
    f = FunctionalModel(model)
    x = torch.randn(5, 2, dtype=DTYPE)
    shifted = {n: p + 1 for n, p in f.params.items()}
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(1)
    torch.testing.assert_close(f(shifted, None, x), reference(x), **TOL)
    assert int(model[1].num_batches_tracked) == 0
    frozen_head = {n: v for n, v in shifted.items() if not n.startswith("2.")}
    with torch.no_grad():
        reference[2].weight.sub_(1)
        reference[2].bias.sub_(1)
    torch.testing.assert_close(f(frozen_head, None, x), reference(x), **TOL)


FUNCTIONAL_MODEL_ERRORS = [
    (lambda f, x: f({"weight": torch.zeros(1, 2)}, None, x), KeyError, r"\['weight'\].*not params"),
    (lambda f, x: f([torch.zeros(1)], None, x), TypeError, "params must be a dict"),
    (lambda f, x: f({}, {"running_mean": torch.zeros(1)}, x), KeyError, "not buffers"),
]


@pytest.mark.parametrize(("call", "error", "message"), FUNCTIONAL_MODEL_ERRORS)
def test_functional_model_rejects_bad_arguments(call: Any, error: type, message: str) -> None:
    f = FunctionalModel(nn.Sequential(nn.Linear(2, 1)))
    with pytest.raises(error, match=message):
        call(f, torch.zeros(1, 2))


def test_functional_model_needs_a_module() -> None:
    with pytest.raises(TypeError, match=r"expected a torch.nn.Module, got function"):
        FunctionalModel(lambda x: x)  # type: ignore[arg-type]


LOOP_ERRORS = [
    ({"steps": -1}, ValueError, "steps must be an integer >= 0, got -1"),
    ({"steps": 2.5}, ValueError, "steps must be an integer"),
    ({"truncate": -2}, ValueError, "truncate must be None"),
    ({"rule": torch.optim.SGD}, TypeError, "rule must be an update rule"),
    ({"loss": lambda p, t: p["w"] * torch.ones(2)}, TypeError, r"scalar tensor, got a tensor"),
    ({"hyperparameters": [0.1]}, TypeError, "hyperparameters must be a dict"),
    ({"hyperparameters": lambda k: 0.1}, TypeError, "returning float"),
    ({"buffers": {}}, TypeError, r"must return \(loss, new_buffers\)"),
]


@pytest.mark.parametrize(("changes", "error", "message"), LOOP_ERRORS)
def test_inner_loop_rejects_bad_arguments(
    changes: dict[str, Any], error: type, message: str
) -> None:
    arguments: dict[str, Any] = {
        "loss": lambda p, *rest: quadratic(p, torch.tensor(TARGET)),
        "rule": hf.optim.sgd(lr=0.1),
        "steps": 1,
        **changes,
    }
    loss, rule = arguments.pop("loss"), arguments.pop("rule")
    with pytest.raises(error, match=message):
        inner_loop(loss, rule, {"w": torch.tensor(0.0)}, torch.tensor(TARGET), **arguments)


# --------------------------------------------------------------------------- torch optimizers


def grouped_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2), nn.Linear(2, 1))
    model = model.to(DTYPE)
    model[2].bias.requires_grad_(False)  # frozen inside a group
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.05},
            {"params": model[2].parameters(), "lr": 0.2, "momentum": 0.9},
        ],
        lr=0.1,
    )  # model[3] is in no group: never adapted
    return model, optimizer


def torch_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: Any, y: Any, k: int) -> None:
    for _ in range(k):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def test_rule_from_optimizer_steps_like_the_torch_optimizer() -> None:
    """Groups, frozen parameters, ungrouped parameters and imported momentum state."""
    model, optimizer = grouped_model_and_optimizer()
    x, y = torch.randn(6, 2, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE)
    torch_steps(model, optimizer, x, y, 2)  # the optimizer now has momentum buffers
    twin = copy.deepcopy(model)
    twin_optimizer = type(optimizer)(
        [
            {"params": twin[0].parameters(), "lr": 0.05},
            {"params": twin[2].parameters(), "lr": 0.2, "momentum": 0.9},
        ],
        lr=0.1,
    )
    twin_optimizer.load_state_dict(optimizer.state_dict())

    rule, state = rule_from_optimizer(optimizer, model)
    f = FunctionalModel(model)

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    params = {n: p.detach() for n, p in f.params.items()}
    adapted = inner_loop(loss, rule, params, x, y, steps=3, state=state).params
    torch_steps(twin, twin_optimizer, x, y, 3)
    for name, expected in twin.named_parameters():
        torch.testing.assert_close(adapted[name], expected.detach(), **TOL)
    assert adapted["2.bias"] is params["2.bias"] and adapted["3.weight"] is params["3.weight"]


def test_rule_from_optimizer_rejects_foreign_parameters() -> None:
    model, other = nn.Linear(2, 1), nn.Linear(2, 1)
    with pytest.raises(ValueError, match="not among the given params"):
        rule_from_optimizer(torch.optim.SGD(other.parameters(), lr=0.1), model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        rule_from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), [model])  # type: ignore[arg-type]
