"""Recompute mode: the same meta-gradients as the plain unroll, for every rule and option."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch
from torch import nn

import higher_func as hf
from higher_func._versions import RECOMPUTE_UNDER_VMAP
from higher_func.func import FunctionalModel, batched_meta_loss, inner_loop, meta_loss

from optimizer_cases import CASE_IDS, CASES, OPTION_CASES, OPTION_IDS, OptimizerCase
from torch_versions import needs_torch

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def mlp(norm: bool = False) -> FunctionalModel:
    layers: list[nn.Module] = [nn.Linear(3, 6)]
    layers += [nn.BatchNorm1d(6)] if norm else []
    layers += [nn.Tanh(), nn.Linear(6, 1)]
    return FunctionalModel(nn.Sequential(*layers).to(DTYPE))


def data(tasks: int | None = None, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n,) if tasks is None else (tasks, n)
    x = torch.randn(*shape, 3, dtype=DTYPE)
    return x, torch.sin(x.sum(-1, keepdim=True))


def squared_error(model: FunctionalModel) -> Any:
    def loss(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((model(params, None, x) - y) ** 2).mean()

    return loss


def stateful_error(model: FunctionalModel) -> Any:
    def loss(params: Any, buffers: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        out, buffers = model.with_buffers(params, buffers, x)
        return ((out - y) ** 2).mean(), buffers

    return loss


def leaves(model: FunctionalModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().requires_grad_() for name, p in model.params.items()}


def tensor_hyperparameters(case: OptimizerCase) -> dict[str, Any]:
    """The case's numeric hyperparameters as float64 tensors requiring grad."""
    out: dict[str, Any] = {}
    for name, value in case.tensor_hyperparameters.items():
        as_tensor = lambda v: torch.tensor(v, dtype=DTYPE, requires_grad=True)  # noqa: E731
        out[name] = tuple(map(as_tensor, value)) if isinstance(value, tuple) else as_tensor(value)
    return out


def both_ways(objective: Any, inputs: list[torch.Tensor]) -> list[tuple[Any, Any]]:
    """``(plain, recomputed)`` gradients of ``objective(recompute)`` with respect to inputs."""
    plain = torch.autograd.grad(objective(False), inputs, allow_unused=True)
    recomputed = torch.autograd.grad(objective(True), inputs, allow_unused=True)
    return list(zip(plain, recomputed, strict=True))


def assert_same(pairs: list[tuple[Any, Any]]) -> None:
    assert any(a is not None for a, _ in pairs)
    for plain, recomputed in pairs:
        if plain is None:
            assert recomputed is None or not recomputed.any()
        else:
            torch.testing.assert_close(recomputed, plain, **TOL)


# --------------------------------------------------------------------------- every rule


@pytest.mark.parametrize(("case", "options"), OPTION_CASES, ids=OPTION_IDS)
def test_meta_gradient_equals_the_plain_unroll(case: OptimizerCase, options: dict) -> None:
    model = mlp()
    params, loss = leaves(model), squared_error(model)
    rule = case.factory(**options)
    # A learned per-step hyperparameter: the learning rate (Rprop reads it in init only).
    name = "etas" if "lr" in rule.spec.init_only else "lr"
    value = rule.hyperparameters[name]
    hyper = {name: torch.tensor(value, dtype=DTYPE, requires_grad=True)}
    if isinstance(value, tuple):
        hyper[name] = tuple(torch.tensor(v, dtype=DTYPE, requires_grad=True) for v in value)
    support, query = data(), data()

    def objective(recompute: bool) -> torch.Tensor:
        return meta_loss(
            loss, rule, params, support, query, steps=max(3, case.gradcheck_steps),
            hyperparameters=hyper, recompute=recompute,
        )  # fmt: skip

    assert_same(both_ways(objective, [*params.values(), *optree.tree_leaves(hyper)]))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_tensor_hyperparameter_of_the_rule_gets_its_hypergradient(
    case: OptimizerCase,
) -> None:
    model = mlp()
    params, loss = leaves(model), squared_error(model)
    hyper = tensor_hyperparameters(case)
    support, query = data(), data()

    def objective(recompute: bool) -> torch.Tensor:
        rule = case.factory(**case.gradcheck_options, **hyper)  # the rule holds the tensors
        steps = max(3, case.gradcheck_steps)
        return meta_loss(loss, rule, params, support, query, steps=steps, recompute=recompute)

    assert_same(both_ways(objective, [*params.values(), *optree.tree_leaves(hyper)]))


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"first_order": True},
        {"truncate": 2},
        {"truncate": 9},
        {"truncate": 1, "first_order": True},
    ],
    ids=["second-order", "first-order", "truncate-2", "truncate-over", "truncate-1-first-order"],
)
def test_options_give_the_plain_meta_gradient(options: dict) -> None:
    model = mlp()
    params, loss = leaves(model), squared_error(model)
    lr = torch.tensor(0.05, dtype=DTYPE, requires_grad=True)
    (x, y), query = data(), data()
    x.requires_grad_()  # the data too (dataset distillation)

    def objective(recompute: bool) -> torch.Tensor:
        result = inner_loop(
            loss, hf.optim.adam(lr=0.01, amsgrad=True), params, x, y, steps=5,
            hyperparameters={"lr": lr}, recompute=recompute, **options,
        )  # fmt: skip
        # Every output is used: final parameters, state and the inner losses.
        return (
            loss(result.params, *query)
            + result.losses.sum()
            + result.state.exp_avg_sq["0.weight"].sum()
        )

    assert_same(both_ways(objective, [*params.values(), lr, x]))


def test_a_per_step_schedule_gets_one_hypergradient_per_step() -> None:
    model = mlp()
    params, loss = leaves(model), squared_error(model)
    lrs = torch.linspace(0.01, 0.05, 6, dtype=DTYPE).requires_grad_()
    support, query = data(), data()

    def objective(recompute: bool) -> torch.Tensor:
        return meta_loss(
            loss, hf.optim.sgd(lr=0.1, momentum=0.9), params, support, query, steps=6,
            hyperparameters=lambda k: {"lr": lrs[k]}, recompute=recompute,
        )  # fmt: skip

    pairs = both_ways(objective, [lrs, *params.values()])
    assert_same(pairs)
    assert pairs[0][1].abs().min() > 0  # every step's learning rate matters


def test_trajectory_iterates_are_differentiable() -> None:
    model = mlp()
    params, loss = leaves(model), squared_error(model)
    x, y = data()

    def objective(recompute: bool) -> torch.Tensor:
        result = inner_loop(
            loss, hf.optim.rmsprop(lr=0.01, momentum=0.5), params, x, y, steps=4,
            trajectory=True, truncate=3, recompute=recompute,
        )  # fmt: skip
        assert result.trajectory is not None and len(result.trajectory) == 5
        assert result.trajectory[0] is params
        return sum(loss(phi, x, y) for phi in result.trajectory)

    assert_same(both_ways(objective, list(params.values())))


def test_batch_norm_buffers_thread_through_the_steps() -> None:
    model = mlp(norm=True)
    params, loss = leaves(model), stateful_error(model)
    support, query = data(), data()

    def run(recompute: bool) -> Any:
        return inner_loop(
            loss, hf.optim.adam(lr=0.02), params, *support, steps=4, buffers=model.buffers,
            recompute=recompute,
        )  # fmt: skip

    plain, recomputed = run(False), run(True)
    for name, buffer in plain.buffers.items():
        torch.testing.assert_close(recomputed.buffers[name], buffer, **TOL)
    assert int(recomputed.buffers["1.num_batches_tracked"]) == 4

    def objective(recompute: bool) -> torch.Tensor:
        return meta_loss(
            loss, hf.optim.adam(lr=0.02), params, support, query, steps=4,
            buffers=model.buffers, recompute=recompute,
        )  # fmt: skip

    assert_same(both_ways(objective, list(params.values())))


def test_a_rules_own_tensor_hyperparameter_gets_its_gradient() -> None:
    model = mlp()
    params, loss = leaves(model), squared_error(model)
    lr = torch.tensor(0.05, dtype=DTYPE, requires_grad=True)
    support, query = data(), data()

    def objective(recompute: bool) -> torch.Tensor:
        rule = hf.optim.sgd(lr=lr, momentum=0.9)
        return meta_loss(loss, rule, params, support, query, steps=3, recompute=recompute)

    assert_same(both_ways(objective, [lr, *params.values()]))


# --------------------------------------------------------------------------- transforms


@needs_torch(RECOMPUTE_UNDER_VMAP, "recompute=True under vmap")
def test_batched_meta_loss_under_vmap_with_per_task_hyperparameters() -> None:
    model = mlp(norm=True)
    params, loss = leaves(model), stateful_error(model)
    lrs = torch.tensor([0.01, 0.02, 0.03], dtype=DTYPE, requires_grad=True)
    support, query = data(tasks=3), data(tasks=3)

    def objective(recompute: bool) -> torch.Tensor:
        return batched_meta_loss(
            loss, hf.optim.adam(lr=0.01), params, support, query, steps=3,
            buffers=model.buffers, task_hyperparameters={"lr": lrs}, recompute=recompute,
        )  # fmt: skip

    assert_same(both_ways(objective, [lrs, *params.values()]))

    def by_func(recompute: bool) -> Any:
        detached = {k: v.detach() for k, v in params.items()}
        return torch.func.grad(
            lambda p: batched_meta_loss(
                loss,
                hf.optim.adam(lr=0.01),
                p,
                support,
                query,
                steps=3,
                buffers=model.buffers,
                recompute=recompute,
            )
        )(detached)

    plain, recomputed = by_func(False), by_func(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], **TOL)


def test_second_order_meta_derivatives_are_exact() -> None:
    model = mlp()
    loss = squared_error(model)
    params = {k: v.detach() for k, v in model.params.items()}
    support, query = data(), data()

    def of_lr(lr: torch.Tensor, recompute: bool) -> torch.Tensor:
        return meta_loss(
            loss, hf.optim.adam(lr=0.01), params, support, query, steps=3,
            hyperparameters={"lr": lr}, recompute=recompute,
        )  # fmt: skip

    lr = torch.tensor(0.02, dtype=DTYPE)
    hessian = torch.func.grad(torch.func.grad(of_lr))
    torch.testing.assert_close(hessian(lr, True), hessian(lr, False), **TOL)
    leaf = lr.clone().requires_grad_()
    (first,) = torch.autograd.grad(of_lr(leaf, True), leaf, create_graph=True)
    (second,) = torch.autograd.grad(first, leaf)
    torch.testing.assert_close(second, hessian(lr, False), **TOL)


def test_gradcheck_and_gradgradcheck() -> None:
    w0 = torch.tensor([0.3, -0.4], dtype=DTYPE, requires_grad=True)
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    target = torch.tensor([1.0, 2.0], dtype=DTYPE)

    def loss(params: Any, target: torch.Tensor) -> torch.Tensor:
        return (torch.sin(params["w"]) * (params["w"] - target) ** 2).sum()

    def objective(w0: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        return meta_loss(
            loss, hf.optim.adam(lr=0.1), {"w": w0}, target, target, steps=3,
            hyperparameters={"lr": lr}, recompute=True,
        )  # fmt: skip

    assert torch.autograd.gradcheck(objective, (w0, lr))
    assert torch.autograd.gradgradcheck(objective, (w0, lr))


# --------------------------------------------------------------------------- errors


def test_forward_mode_asks_for_the_plain_unroll() -> None:
    params = {"w": torch.tensor(1.0, dtype=DTYPE)}
    square = lambda p, t: (p["w"] - t) ** 2  # noqa: E731
    target = torch.tensor(2.0, dtype=DTYPE)

    def of_lr(lr: torch.Tensor) -> torch.Tensor:
        return meta_loss(
            square, hf.optim.sgd(lr=0.1), params, target, target, steps=2,
            hyperparameters={"lr": lr}, recompute=True,
        )  # fmt: skip

    one = torch.tensor(1.0, dtype=DTYPE)
    with pytest.raises(NotImplementedError, match="reverse mode only.*recompute=False"):
        torch.func.jvp(of_lr, (torch.tensor(0.1, dtype=DTYPE),), (one,))


def test_a_captured_tensor_requiring_grad_is_an_error() -> None:
    scale = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    params = {"w": torch.tensor(1.0, dtype=DTYPE, requires_grad=True)}
    captured = lambda p, t: scale * (p["w"] - t) ** 2  # noqa: E731
    target = torch.tensor(2.0, dtype=DTYPE)
    with pytest.raises(ValueError, match="requires grad but is not passed in"):
        meta_loss(captured, hf.optim.sgd(lr=0.1), params, target, target, recompute=True)
    with torch.no_grad():  # nothing to differentiate: nothing to check
        meta_loss(captured, hf.optim.sgd(lr=0.1), params, target, target, recompute=True)


def test_a_state_that_changes_structure_is_an_error() -> None:
    class Growing:
        """State None at first, a dict after one step."""

        def init(self, params: Any) -> None:
            return None

        def step(self, params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
            return {k: p - 0.1 * grads[k] for k, p in params.items()}, dict(grads)

    params = {"w": torch.tensor(1.0, dtype=DTYPE, requires_grad=True)}
    square = lambda p, t: (p["w"] - t) ** 2  # noqa: E731
    target = torch.tensor(2.0, dtype=DTYPE)
    meta_loss(square, Growing(), params, target, target, steps=2)  # fine without recompute
    with pytest.raises(ValueError, match="keep their structure from step to step"):
        meta_loss(square, Growing(), params, target, target, steps=2, recompute=True)


def test_zero_steps_and_no_grad_runs() -> None:
    params = {"w": torch.tensor(1.0, dtype=DTYPE, requires_grad=True)}
    square = lambda p, t: (p["w"] - t) ** 2  # noqa: E731
    target = torch.tensor(2.0, dtype=DTYPE)
    result = inner_loop(square, hf.optim.sgd(lr=0.1), params, target, steps=0, recompute=True)
    assert result.params is params and result.losses.shape == (0,)
    with torch.no_grad():
        result = inner_loop(square, hf.optim.sgd(lr=0.25), params, target, steps=2, recompute=True)
    torch.testing.assert_close(result.params["w"], torch.tensor(1.75, dtype=DTYPE))
    result = inner_loop(
        square, hf.optim.sgd(lr=0.25), params, target, steps=2, truncate=0, recompute=True
    )
    assert not result.params["w"].requires_grad  # as without recompute: no step differentiated


@pytest.mark.slow
def test_under_torch_compile_recompute_runs_eagerly() -> None:
    params = {"w": torch.tensor([1.0, 2.0], dtype=DTYPE)}
    target = torch.tensor([0.5, 0.1], dtype=DTYPE)

    def loss(p: Any, t: torch.Tensor) -> torch.Tensor:
        return ((p["w"] - t) ** 2).sum()

    def objective(p: Any, recompute: bool) -> torch.Tensor:
        rule = hf.optim.adam(lr=0.1)
        return meta_loss(loss, rule, p, target, target, steps=3, recompute=recompute)

    expected = torch.func.grad(objective)(params, False)
    got = torch.compile(torch.func.grad(objective))(params, True)
    torch.testing.assert_close(got["w"], expected["w"], **TOL)


@needs_torch(RECOMPUTE_UNDER_VMAP, "recompute=True under vmap")
def test_meta_objective_from_innerloop_ctx_pieces() -> None:
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)
    inner = torch.optim.Adam(net.parameters(), lr=0.01)
    support, query = data(tasks=2), data(tasks=2)

    def meta_gradient(recompute: bool) -> list[torch.Tensor]:
        objective = hf.MetaObjective(
            net, inner, torch.nn.functional.mse_loss, steps=4, recompute=recompute
        )
        return list(objective.value_and_grad(support, query)[1].values())

    for plain, recomputed in zip(meta_gradient(False), meta_gradient(True), strict=True):
        torch.testing.assert_close(recomputed, plain, **TOL)


def test_dropout_draws_the_same_masks_when_a_step_is_rebuilt() -> None:
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).to(DTYPE)
    model = FunctionalModel(net.train())
    params, loss = leaves(model), squared_error(model)
    support, query = data(), data()

    def objective(recompute: bool) -> torch.Tensor:
        torch.manual_seed(3)  # the same random stream for both
        return meta_loss(
            loss, hf.optim.adam(lr=0.01), params, support, query, steps=4, recompute=recompute
        )

    assert_same(both_ways(objective, list(params.values())))


@needs_torch(RECOMPUTE_UNDER_VMAP, "recompute=True under vmap")
def test_dropout_under_vmap_with_different_randomness_per_task() -> None:
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).to(DTYPE)
    model = FunctionalModel(net.train())
    params, loss = leaves(model), squared_error(model)
    support, query = data(tasks=3), data(tasks=3)

    def objective(recompute: bool) -> torch.Tensor:
        torch.manual_seed(5)
        return batched_meta_loss(
            loss, hf.optim.adam(lr=0.01), params, support, query, steps=3,
            randomness="different", recompute=recompute,
        )  # fmt: skip

    assert_same(both_ways(objective, list(params.values())))
