"""The batched (vmapped) meta-loss equals a per-task loop built on plain autograd.

The reference, :func:`per_task_meta_loss`, is what ``higher`` users write: for each task,
native modules via ``functional_call``, gradients by ``torch.autograd.grad(create_graph=True)``,
running statistics updated in place on private copies, query losses averaged.  No vmap,
no ``torch.func.grad``, no decomposed norms: an independent computation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import higher_func as hf
from higher_func.func import FunctionalModel, MetaObjective, batched_meta_loss

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}

RULES = {
    "sgd": lambda: hf.optim.sgd(lr=0.1),
    "sgd_momentum": lambda: hf.optim.sgd(lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda: hf.optim.adam(lr=0.01),
    "rmsprop": lambda: hf.optim.rmsprop(lr=0.01, momentum=0.5, centered=True),
}


def per_task_meta_loss(
    model: nn.Module,
    rule: Any,
    params: dict[str, torch.Tensor],
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    loss_fn: Callable[..., torch.Tensor] = F.mse_loss,
    task_overrides: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over tasks of the query loss after ``steps`` autograd steps (the reference)."""
    losses = []
    for task in range(support[0].shape[0]):
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        overrides = {k: v[task] for k, v in (task_overrides or {}).items()}
        fast, state = dict(params), rule.init(params)
        x, y = support[0][task], support[1][task]
        for _ in range(steps):
            loss = loss_fn(functional_call(model, (fast, buffers), (x,)), y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast, state = rule.step(fast, dict(zip(fast, grads, strict=True)), state, **overrides)
        out = functional_call(model, (fast, buffers), (query[0][task],))
        losses.append(loss_fn(out, query[1][task]))
    return torch.stack(losses).mean()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    )


def regression_tasks(tasks: int, shots: int, input_shape: tuple[int, ...]) -> tuple[Any, Any]:
    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randn(tasks, shots, *input_shape, dtype=DTYPE),
            torch.randn(tasks, shots, 2, dtype=DTYPE),
        )

    return batch(), batch()


MODELS = {"mlp": (mlp, (3,)), "conv_bn": (conv_bn, (1, 6, 6))}


def meta_gradient(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(params.values())))


def assert_close_lists(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_batched_meta_loss_equals_per_task_loop(model_name: str, rule_name: str) -> None:
    build, input_shape = MODELS[model_name]
    model = build().to(DTYPE)
    f = FunctionalModel(model)
    params = f.params
    support, query = regression_tasks(3, 5, input_shape)
    rule = RULES[rule_name]()

    def loss(p: Any, buffers: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        out, buffers = f.with_buffers(p, buffers, x)
        return F.mse_loss(out, y), buffers

    batched = batched_meta_loss(loss, rule, params, support, query, steps=3, buffers=f.buffers)
    reference = per_task_meta_loss(model, rule, params, support, query, steps=3)
    torch.testing.assert_close(batched, reference, **TOL)
    assert_close_lists(meta_gradient(batched, params), meta_gradient(reference, params))


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_meta_objective_bridge_equals_per_task_loop(rule_name: str) -> None:
    """From a model, its torch optimizer and a per-task loss: the loop's meta-gradient."""
    model = conv_bn().to(DTYPE)
    torch_class = {"sgd": torch.optim.SGD, "sgd_momentum": torch.optim.SGD}.get(
        rule_name, {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}.get(rule_name)
    )
    accepted = inspect.signature(torch_class).parameters  # an older torch has fewer options
    options = {k: v for k, v in RULES[rule_name]().hyperparameters.items() if k in accepted}
    optimizer = torch_class(model.parameters(), **options)
    support, query = regression_tasks(3, 5, (1, 6, 6))
    objective = MetaObjective(model, optimizer, F.mse_loss, steps=2)

    value, grads = objective.value_and_grad(support, query)
    summed, summed_grads = objective.value_and_grad(support, query, reduction="sum")
    torch.testing.assert_close(summed, 3 * value, **TOL)
    assert_close_lists(list(summed_grads.values()), [3 * g for g in grads.values()])
    objective(support, query).backward()
    params = dict(model.named_parameters())
    reference = per_task_meta_loss(model, RULES[rule_name](), params, support, query, steps=2)
    expected = meta_gradient(reference, params)
    torch.testing.assert_close(value, reference.detach(), **TOL)
    assert_close_lists(list(grads.values()), expected)
    assert_close_lists([p.grad for p in params.values()], expected)


def test_per_task_learned_learning_rates() -> None:
    """A learning rate per task, learned: loss and hypergradients equal the loop's."""
    model = mlp().to(DTYPE)
    f = FunctionalModel(model)
    params = f.params
    support, query = regression_tasks(4, 5, (3,))
    lrs = torch.tensor([0.01, 0.05, 0.1, 0.2], dtype=DTYPE, requires_grad=True)
    rule = hf.optim.adam(lr=0.01)

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    batched = batched_meta_loss(
        loss, rule, params, support, query, steps=3, task_hyperparameters={"lr": lrs}
    )
    reference = per_task_meta_loss(
        model, rule, params, support, query, steps=3, task_overrides={"lr": lrs}
    )
    torch.testing.assert_close(batched, reference, **TOL)
    inputs = [lrs, *params.values()]
    batched_grads = list(torch.autograd.grad(batched, inputs))
    assert_close_lists(batched_grads, list(torch.autograd.grad(reference, inputs)))
    assert batched_grads[0].abs().min() > 0  # every task's rate receives a hypergradient


def test_per_task_rates_with_shared_schedule() -> None:
    """A shared per-step schedule combined with per-task momentum overrides."""
    model = mlp().to(DTYPE)
    f = FunctionalModel(model)
    support, query = regression_tasks(2, 4, (3,))
    schedule = torch.tensor([0.1, 0.05], dtype=DTYPE, requires_grad=True)
    momenta = torch.tensor([0.5, 0.9], dtype=DTYPE)
    rule = hf.optim.sgd(lr=0.1, momentum=0.9)

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    batched = batched_meta_loss(
        loss,
        rule,
        f.params,
        support,
        query,
        steps=2,
        hyperparameters=lambda k: {"lr": schedule[k]},
        task_hyperparameters={"momentum": momenta},
    )
    per_task = [
        hf.func.meta_loss(
            loss,
            rule,
            f.params,
            (support[0][t], support[1][t]),
            (query[0][t], query[1][t]),
            steps=2,
            hyperparameters=lambda k, t=t: {"lr": schedule[k], "momentum": momenta[t]},
        )
        for t in range(2)
    ]
    reference = torch.stack(per_task).mean()
    torch.testing.assert_close(batched, reference, **TOL)
    torch.testing.assert_close(
        torch.autograd.grad(batched, schedule)[0],
        torch.autograd.grad(reference, schedule)[0],
        **TOL,
    )


def test_chunked_and_unreduced_results_agree() -> None:
    model = mlp().to(DTYPE)
    f = FunctionalModel(model)
    support, query = regression_tasks(4, 3, (3,))

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    rule = hf.optim.sgd(lr=0.1)
    each = batched_meta_loss(loss, rule, f.params, support, query, reduction="none")
    chunked = batched_meta_loss(loss, rule, f.params, support, query, chunk_size=3)
    summed = batched_meta_loss(loss, rule, f.params, support, query, reduction="sum")
    assert each.shape == (4,)
    torch.testing.assert_close(chunked, each.mean(), **TOL)
    torch.testing.assert_close(summed, each.sum(), **TOL)


def dropout_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).to(DTYPE)


def test_dropout_under_vmap_needs_a_randomness_policy() -> None:
    model = dropout_model()
    f = FunctionalModel(model)
    support, query = regression_tasks(3, 4, (3,))

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    rule = hf.optim.sgd(lr=0.1)
    with pytest.raises(RuntimeError, match="randomness"):
        batched_meta_loss(loss, rule, f.params, support, query)
    # "same": one dropout mask for every task, so identical tasks give identical losses.
    same_support = tuple(t[:1].expand_as(t) for t in support)
    same_query = tuple(t[:1].expand_as(t) for t in query)
    same = batched_meta_loss(
        loss, rule, f.params, same_support, same_query, randomness="same", reduction="none"
    )
    torch.testing.assert_close(same, same[:1].expand(3), **TOL)
    different = batched_meta_loss(
        loss, rule, f.params, same_support, same_query, randomness="different", reduction="none"
    )
    assert not torch.allclose(different, different[:1].expand(3))
    model.eval()  # without dropout every policy is the deterministic loop
    evaluated = batched_meta_loss(loss, rule, f.params, support, query, randomness="different")
    reference = per_task_meta_loss(model, rule, f.params, support, query, steps=1)
    torch.testing.assert_close(evaluated, reference, **TOL)


BAD_BATCHES = [
    (
        {"support": (torch.zeros(3, 2), torch.zeros(2, 2))},
        ValueError,
        r"same number of tasks.*support\[1\]: 2",
    ),
    (
        {"support": (torch.tensor(1.0), torch.zeros(3))},
        ValueError,
        r"support\[0\] must be a tensor",
    ),
    ({"task_hyperparameters": {"lr": torch.zeros(4)}}, ValueError, "task_hyperparameters"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"randomness": "any"}, ValueError, "randomness must be one of"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD_BATCHES)
def test_bad_batches_raise_clear_errors(changes: dict[str, Any], error: type, message: str) -> None:
    params = {"w": torch.zeros(2)}
    arguments: dict[str, Any] = {
        "support": (torch.zeros(3, 2), torch.zeros(3, 2)),
        "query": (torch.zeros(3, 2), torch.zeros(3, 2)),
        **changes,
    }

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((p["w"] * x - y) ** 2).mean()

    with pytest.raises(error, match=message):
        batched_meta_loss(loss, hf.optim.sgd(lr=0.1), params, **arguments)


def test_bridge_rejects_bad_input() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        MetaObjective(model, optimizer, "mse")  # type: ignore[arg-type]
    objective = MetaObjective(model, optimizer, F.mse_loss)
    with pytest.raises(TypeError, match=r"support must be a pair \(inputs, targets\)"):
        objective((torch.zeros(2, 3, 3),), (torch.zeros(2, 3, 3), torch.zeros(2, 3, 2)))


@pytest.mark.parametrize(
    "optimizer_class", hf.optim.supported_optimizers(), ids=lambda c: c.__name__
)
def test_every_rule_runs_batched_and_equals_the_loop(optimizer_class: type) -> None:
    """Every registered rule, default hyperparameters: vmap over tasks equals the loop."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    f = FunctionalModel(model)
    params = f.params
    support, query = regression_tasks(2, 4, (3,))
    rule = hf.optim.rule_factory(optimizer_class)()

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    batched = batched_meta_loss(loss, rule, params, support, query, steps=2)
    reference = per_task_meta_loss(model, rule, params, support, query, steps=2)
    torch.testing.assert_close(batched, reference, **TOL)
    assert_close_lists(meta_gradient(batched, params), meta_gradient(reference, params))


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_meta_objective_equals_innerloop_ctx_code(optimizer_class: type) -> None:
    """The bridge gives innerloop_ctx code's meta-gradient (batch norm in the model)."""
    model = conv_bn().to(DTYPE)
    optimizer = optimizer_class(model.parameters(), lr=0.05)
    support, query = regression_tasks(3, 5, (1, 6, 6))
    value, grads = MetaObjective(model, optimizer, F.mse_loss, steps=2).value_and_grad(
        support, query
    )
    total = torch.zeros((), dtype=DTYPE)
    for task in range(3):
        with hf.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(support[0][task]), support[1][task]))
            total = total + F.mse_loss(fmodel(query[0][task]), query[1][task])
    reference = total / 3
    torch.testing.assert_close(value, reference.detach(), **TOL)
    expected = torch.autograd.grad(reference, list(model.parameters()))
    assert_close_lists(list(grads.values()), list(expected))


def test_value_and_grad_skips_frozen_parameters() -> None:
    model = mlp().to(DTYPE)
    model[0].weight.requires_grad_(False)
    objective = MetaObjective(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss)
    support, query = regression_tasks(2, 3, (3,))
    value, grads = objective.value_and_grad(support, query)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(grads) == list(trainable)
    reference = objective(support, query)
    torch.testing.assert_close(value, reference.detach(), **TOL)
    expected = torch.autograd.grad(reference, list(trainable.values()))
    assert_close_lists(list(grads.values()), list(expected))
