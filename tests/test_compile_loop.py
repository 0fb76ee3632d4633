"""torch.compile of inner loops: compiled equals eager, no recompilation, clear errors.

Compiling is slow on a small CPU (dynamo alone takes ~10-30 s for these tiny models,
inductor minutes), so every test that compiles a meta-gradient is marked ``slow``.  The
recompilation tests count graphs with a backend that records each compilation and runs
the captured graph eagerly: recompilation is decided by dynamo's guards, whatever the
backend.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher_func as hf
from higher_func._versions import COMPILED_INNER_LOOPS
from higher_func.func import (
    CompileError,
    FunctionalModel,
    MetaObjective,
    batched_meta_loss,
    compiled,
    compiled_innerloop,
)

from torch_versions import needs_torch

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
# On an older torch compiled() refuses (tests/test_versions.py checks that): skip.
compiles = needs_torch(COMPILED_INNER_LOOPS, "compiling inner loops")


class CountingBackend:
    """A dynamo backend that counts compilations and runs the captured graph as is."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1
        return graph.forward


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DTYPE)


def tiny_tasks(seed: int) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randn(2, 4, 2, dtype=DTYPE, generator=generator),
            torch.randn(2, 4, 1, dtype=DTYPE, generator=generator),
        )

    return batch(), batch()


def meta_gradient_fn(model: nn.Module, steps: int) -> Any:
    """``(params, lr, support, query) -> meta-gradient``: the function users compile."""
    f = FunctionalModel(model)
    rule = hf.optim.sgd(lr=0.1)

    def loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(f(p, None, x), y)

    def meta_gradient(params: Any, lr: torch.Tensor, support: Any, query: Any) -> Any:
        def objective(p: Any) -> torch.Tensor:
            return batched_meta_loss(
                loss, rule, p, support, query, steps=steps, hyperparameters={"lr": lr}
            )

        return torch.func.grad(objective)(params)

    return meta_gradient


def assert_same_grads(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **TOL)


@compiles
@pytest.mark.slow
def test_inductor_fullgraph_meta_gradient_equals_eager() -> None:
    torch._dynamo.reset()
    model = tiny_model()
    fn = meta_gradient_fn(model, steps=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    support, query = tiny_tasks(0)
    lr = torch.tensor(0.1, dtype=DTYPE)
    fast = compiled(fn)  # inductor, fullgraph=True
    assert_same_grads(fast(params, lr, support, query), fn(params, lr, support, query))


@compiles
@pytest.mark.slow
def test_no_recompilation_across_iterations_and_learning_rates() -> None:
    torch._dynamo.reset()
    model = tiny_model()
    fn = meta_gradient_fn(model, steps=2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    backend = CountingBackend()
    fast = compiled(fn, backend=backend)
    for iteration, lr in enumerate((0.1, 0.05, 0.3)):
        support, query = tiny_tasks(iteration)
        learning_rate = torch.tensor(lr, dtype=DTYPE)
        grads = fast(params, learning_rate, support, query)
        assert_same_grads(grads, fn(params, learning_rate, support, query))
        params = {n: p - 0.1 * grads[n] for n, p in params.items()}  # a meta-step
        assert backend.graphs == 1, f"recompiled at iteration {iteration + 1}"


@compiles
@pytest.mark.slow
def test_compiled_bridge_with_batch_norm_and_per_task_rates() -> None:
    """MetaObjective.value_and_grad compiles whole (decomposed batch norm, running stats)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1))
    model = model.to(DTYPE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    objective = MetaObjective(model, optimizer, F.mse_loss, steps=2)
    backend = CountingBackend()
    fast = compiled(objective.value_and_grad, backend=backend)
    for iteration in range(3):
        support, query = tiny_tasks(iteration)
        rates = {"lr": torch.tensor([0.1, 0.2], dtype=DTYPE) * (iteration + 1)}
        value, grads = fast(support, query, task_hyperparameters=rates)
        expected_value, expected_grads = objective.value_and_grad(
            support, query, task_hyperparameters=rates
        )
        torch.testing.assert_close(value, expected_value, **TOL)
        assert_same_grads(grads, expected_grads)
    assert backend.graphs == 1


def innerloop_steps(fmodel: Any, diffopt: Any, support: Any, query: Any) -> torch.Tensor:
    for _ in range(2):
        diffopt.step(F.mse_loss(fmodel(support[0]), support[1]))
    return F.mse_loss(fmodel(query[0]), query[1])


def innerloop_meta_gradient(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps_fn: Any, tasks: Any
) -> list[torch.Tensor]:
    support, query = tasks
    total = torch.zeros((), dtype=DTYPE)
    for task in range(support[0].shape[0]):
        with hf.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
            task_support = (support[0][task], support[1][task])
            task_query = (query[0][task], query[1][task])
            total = total + steps_fn(fmodel, diffopt, task_support, task_query)
    return list(torch.autograd.grad(total, list(model.parameters())))


@compiles
@pytest.mark.slow
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_compiled_innerloop_ctx_code_equals_eager_without_recompiling(
    optimizer_class: type,
) -> None:
    """higher-style code (autograd.grad(create_graph=True)) compiles, scoped, and is exact."""
    torch._dynamo.reset()
    model = tiny_model()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    backend = CountingBackend()
    fast = compiled_innerloop(innerloop_steps, backend=backend)
    for iteration in range(3):
        tasks = tiny_tasks(iteration)
        actual = innerloop_meta_gradient(model, optimizer, fast, tasks)
        expected = innerloop_meta_gradient(model, optimizer, innerloop_steps, tasks)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, **TOL)
    assert backend.graphs == 1
    assert torch._dynamo.config.trace_autograd_ops is False  # restored after every call


def third_power_gradient_norm(x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
    return (g**2).sum()


@compiles
def test_double_backward_without_compiled_innerloop_is_explained() -> None:
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)
    with pytest.raises(CompileError, match="compiled_innerloop"):
        compiled(third_power_gradient_norm, backend="eager")(x)
    assert torch._dynamo.config.trace_autograd_ops is False


@compiles
def test_compiled_innerloop_differentiates_a_gradient() -> None:
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)
    compiled_innerloop(third_power_gradient_norm, backend="eager")(x).backward()
    torch.testing.assert_close(x.grad, 36 * x.detach() ** 3, **TOL)  # d/dx sum((3x^2)^2)


@compiles
def test_graph_breaks_under_fullgraph_are_explained() -> None:
    def breaks(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return 2 * x

    with pytest.raises(CompileError, match="fullgraph=False"):
        compiled(breaks, backend="eager")(torch.ones(2))


@compiles
def test_innerloop_ctx_inside_a_full_graph_is_explained() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def whole_task(x: torch.Tensor) -> torch.Tensor:
        with hf.innerloop_ctx(model, optimizer) as (fmodel, _):
            return fmodel(x).sum()

    with pytest.raises(CompileError, match="Enter innerloop_ctx outside"):
        compiled(whole_task, backend="eager")(torch.ones(1, 2, dtype=DTYPE))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("InvalidCxxCompiler: No working C++ compiler found", "backend='aot_eager'"),
        (
            "torch.compile with aot_autograd does not currently support double backward",
            "compiled_innerloop",
        ),
        ("inputs with external grad_fn", "Compute the inner loss inside"),
    ],
)
def test_known_compile_failures_get_advice(message: str, expected: str) -> None:
    from higher_func._compile import explain_compile_error

    advice = explain_compile_error(RuntimeError(message))
    assert advice is not None and expected in advice
    assert explain_compile_error(ValueError("shapes do not match")) is None


def test_compiled_rejects_a_non_callable() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        compiled(3)  # type: ignore[arg-type]
