"""Implicit differentiation of a solver's output: ``custom_root`` and ``custom_fixed_point``.

If ``F(x*(theta), theta) = 0`` then ``dx*/dtheta = -(dF/dx)^{-1} dF/dtheta`` (the implicit
function theorem), so a vector-Jacobian product needs one linear solve with ``(dF/dx)^T`` and
one vector-Jacobian product of ``F``; nothing of the solver's own iterations is kept.

The solver runs inside an ``autograd.Function`` (``setup_context``, ``generate_vmap_rule``),
whose ``backward`` and ``jvp`` are built from ``torch.func.vjp``/``torch.func.jvp`` of the
optimality function at the saved solution. The saved solution is the Function's own output, so
differentiating the backward (``hessian``, ``grad(grad)``) differentiates through the implicit
function again: second derivatives are exact, not those of a frozen solution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

from ._implicit_checks import (
    check_optimality_fn,
    check_requires_no_grad,
    check_same_structure,
)
from ._linear_solve import solve_cg, solve_normal_cg  # noqa: F401 (solve_cg: the doctests)

__all__ = ["custom_fixed_point", "custom_root"]

Tree = Any
Solve = Callable[..., Tree]


class _Problem:
    """What the Function needs besides tensors: the functions and how to rebuild the trees."""

    def __init__(
        self, optimality_fn: Callable, solver: Callable, solve: Solve, has_aux: bool, init, args
    ) -> None:
        self.optimality_fn, self.solver, self.solve, self.has_aux = (
            optimality_fn,
            solver,
            solve,
            has_aux,
        )
        init_leaves, self.init_def = optree.tree_flatten(init, none_is_leaf=True)
        self.n_init = len(init_leaves)
        arg_leaves, self.args_def = optree.tree_flatten(args, none_is_leaf=True)
        self.tensor_positions = [i for i, leaf in enumerate(arg_leaves) if isinstance(leaf, Tensor)]
        self.arg_leaves = arg_leaves  # the non-tensor leaves are used as they are
        self.solution_def: Any = None
        self.aux_def: Any = None
        self.aux_leaves: list[Any] = []
        self.aux_tensor_positions: list[int] = []

    def args(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> tuple:
        leaves = list(self.arg_leaves)
        for position, tensor in zip(self.tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        return tuple(optree.tree_unflatten(self.args_def, leaves))

    def solution(self, leaves: tuple[Tensor, ...] | list[Tensor]) -> Tree:
        return optree.tree_unflatten(self.solution_def, list(leaves))

    def aux(self, tensors: tuple[Tensor, ...]) -> Tree:
        leaves = list(self.aux_leaves)
        for position, tensor in zip(self.aux_tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        return optree.tree_unflatten(self.aux_def, leaves)

    def residual(self, solution: Tree, arg_tensors: tuple[Tensor, ...]) -> Tree:
        # Tuple concatenation, not f(x, *a): torch 2.4's Dynamo fails on the latter (twice).
        residual = self.optimality_fn(*((solution,) + self.args(arg_tensors)))  # noqa: RUF005
        check_same_structure(
            "optimality_fn(solution, *args)", residual, "the solution", solution, shapes=True
        )
        return residual

    def solve_checked(self, matvec: Callable, rhs: Tree) -> Tree:
        answer = self.solve(matvec, rhs)
        check_same_structure("solve(matvec, b)", answer, "b", rhs, shapes=True)
        return answer


def _zeros_for_none(values: tuple, like: tuple[Tensor, ...]) -> list[Tensor]:
    return [torch.zeros_like(t) if v is None else v for v, t in zip(values, like, strict=True)]


class _ImplicitSolution(torch.autograd.Function):
    """``(problem, *init_leaves, *arg_tensors) -> (*solution_leaves, *aux_tensors)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: _Problem, *tensors: Tensor) -> tuple[Tensor, ...]:
        init = optree.tree_unflatten(problem.init_def, list(tensors[: problem.n_init]))
        output = problem.solver(*((init,) + problem.args(tensors[problem.n_init :])))  # noqa: RUF005
        if problem.has_aux:
            if not (isinstance(output, tuple) and len(output) == 2):
                raise TypeError(
                    "has_aux=True: expected the solver to return a pair (solution, aux), got "
                    f"{type(output).__name__}; return (solution, aux) or set has_aux=False"
                )
            solution, aux = output
        else:
            solution, aux = output, ()
        check_same_structure("the solver's solution", solution, "init", init, shapes=True)
        leaves, problem.solution_def = optree.tree_flatten(solution, none_is_leaf=True)
        aux_leaves, problem.aux_def = optree.tree_flatten(aux, none_is_leaf=True)
        problem.aux_leaves = aux_leaves
        problem.aux_tensor_positions = [
            i for i, leaf in enumerate(aux_leaves) if isinstance(leaf, Tensor)
        ]
        aux_tensors = [aux_leaves[i] for i in problem.aux_tensor_positions]
        # An output that is an input would alias it; autograd.Function wants fresh tensors.
        inputs = {id(t) for t in tensors}
        return tuple(t.clone() if id(t) in inputs else t for t in leaves + aux_tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        problem, *tensors = inputs
        n_solution = len(output) - len(problem.aux_tensor_positions)
        solution, aux = output[:n_solution], output[n_solution:]
        arg_tensors = tensors[problem.n_init :]
        ctx.problem, ctx.n_solution = problem, n_solution
        ctx.mark_non_differentiable(*aux)
        ctx.save_for_backward(*solution, *arg_tensors)
        ctx.save_for_forward(*solution, *arg_tensors)

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        saved = ctx.saved_tensors
        solution_leaves, arg_tensors = saved[: ctx.n_solution], saved[ctx.n_solution :]
        solution = problem.solution(solution_leaves)
        check_requires_no_grad(problem.optimality_fn, solution, problem.args(arg_tensors))
        v = problem.solution(_zeros_for_none(cotangents[: ctx.n_solution], solution_leaves))
        vjp_solution = torch.func.vjp(lambda x: problem.residual(x, arg_tensors), solution)[1]
        # u = (dF/dx)^{-T} v, then the cotangent of the args is -u^T dF/dargs.
        u = problem.solve_checked(lambda w: vjp_solution(w)[0], v)
        vjp_args = torch.func.vjp(lambda *a: problem.residual(solution, a), *arg_tensors)[1]
        arg_cotangents = [None if g is None else -g for g in vjp_args(u)]
        return (None, *([None] * problem.n_init), *arg_cotangents)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        saved = ctx.saved_tensors
        solution_leaves, arg_tensors = saved[: ctx.n_solution], saved[ctx.n_solution :]
        solution = problem.solution(solution_leaves)
        arg_tangents = tuple(_zeros_for_none(tangents[1 + problem.n_init :], arg_tensors))
        residual_tangent = torch.func.jvp(
            lambda *a: problem.residual(solution, a), tuple(arg_tensors), arg_tangents
        )[1]
        rhs = optree.tree_map(torch.neg, residual_tangent)

        def matvec(w: Tree) -> Tree:
            return torch.func.jvp(lambda x: problem.residual(x, arg_tensors), (solution,), (w,))[1]

        # t = -(dF/dx)^{-1} (dF/dargs . dargs)
        tangent = problem.solve_checked(matvec, rhs)
        n_aux = len(problem.aux_tensor_positions)
        return (*optree.tree_leaves(tangent, none_is_leaf=True), *([None] * n_aux))


def _implicit_solution(
    optimality_fn: Callable, solve: Solve, has_aux: bool, solver: Callable, init: Tree, args: tuple
) -> Any:
    problem = _Problem(optimality_fn, solver, solve, has_aux, init, args)
    init_leaves = optree.tree_leaves(init, none_is_leaf=True)
    for leaf in init_leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"init: expected a pytree of tensors (the starting solution), got a leaf of type "
                f"{type(leaf).__name__}; pass tensors, e.g. torch.zeros(n)"
            )
    check_optimality_fn(optimality_fn, init, args)
    arg_tensors = [problem.arg_leaves[i] for i in problem.tensor_positions]
    outputs = _ImplicitSolution.apply(problem, *init_leaves, *arg_tensors)
    n_solution = len(outputs) - len(problem.aux_tensor_positions)
    solution = problem.solution(outputs[:n_solution])
    return (solution, problem.aux(outputs[n_solution:])) if has_aux else solution


def custom_root(
    optimality_fn: Callable[..., Tree], solve: Solve = solve_normal_cg, has_aux: bool = False
) -> Callable[[Callable], Callable]:
    """Decorate ``solver(init, *args) -> solution`` to differentiate it by the implicit function.

    ``optimality_fn(solution, *args)`` returns a pytree shaped like ``solution`` that is zero
    at the solution (e.g. the gradient of an inner objective). The decorated solver's output is
    differentiable with respect to every tensor of ``args`` by ``torch.func.grad``, ``vjp``,
    ``jacrev``, ``jacfwd``, ``hessian``, ``vmap`` and ``.backward()``; ``init`` is not
    differentiated, and the solver's own iterations are never differentiated (it may use any
    algorithm, even a closed form, and runs with gradients off).

    Every tensor that the optimality function depends on and that should get a gradient must
    be in ``args``; one captured by its closure raises an error (it would get none).

    Args:
        optimality_fn: ``F(solution, *args)``, zero at the solution.
        solve: the linear solver ``solve(matvec, b) -> x`` for ``(dF/dx)^T x = b`` (and
            ``dF/dx`` for forward mode): one of :mod:`higher_func.implicit`'s ``solve_*``,
            optionally with options bound by ``functools.partial``. The default,
            :func:`solve_normal_cg`, needs no symmetry; :func:`solve_cg` is faster when
            ``dF/dx`` is symmetric positive definite (the Hessian of a convex objective).
        has_aux: the solver returns ``(solution, aux)``; ``aux`` is returned, not
            differentiated.

    Returns:
        A decorator; the decorated function has the solver's signature.

    Example:
        Ridge regression, ``w* = argmin |X w - y|^2 / 2 + lam |w|^2 / 2``:

        >>> def grad_of_objective(w, lam, X, y):
        ...     return X.T @ (X @ w - y) + lam * w
        >>> @custom_root(grad_of_objective, solve=solve_cg)
        ... def ridge(init, lam, X, y):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1]), X.T @ y)
        >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64)
        >>> dw = torch.func.jacrev(lambda lam: ridge(torch.zeros(3), lam, X, y))(lam)
        >>> A = X.T @ X + lam * torch.eye(3, dtype=torch.float64)
        >>> torch.allclose(dw, -torch.linalg.solve(A, torch.linalg.solve(A, X.T @ y)))
        True
    """

    def decorator(solver: Callable) -> Callable:
        @functools.wraps(solver)
        def solver_with_implicit_gradient(init: Tree, *args: Any) -> Any:
            return _implicit_solution(optimality_fn, solve, has_aux, solver, init, args)

        return solver_with_implicit_gradient

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Tree], solve: Solve = solve_normal_cg, has_aux: bool = False
) -> Callable[[Callable], Callable]:
    """:func:`custom_root` for a solver of ``x = T(x, *args)``, with ``T = fixed_point_fn``.

    The optimality function is ``x - T(x, *args)``, so ``dF/dx = I - dT/dx``: for
    ``T(x) = x - eta grad L(x)`` it is ``eta`` times the Hessian (use :func:`solve_cg`), and
    :func:`solve_neumann` with ``alpha=1`` sums the powers of ``dT/dx``.

    Example:
        >>> def step(x, a):  # the fixed point of x = 0.5 x + a is x = 2 a
        ...     return 0.5 * x + a
        >>> @custom_fixed_point(step)
        ... def iterate(init, a):
        ...     x = init
        ...     for _ in range(60):
        ...         x = step(x, a)
        ...     return x
        >>> torch.func.grad(lambda a: iterate(torch.zeros(()), a))(torch.tensor(1.0))
        tensor(2.)
    """

    def optimality_fn(x: Tree, *args: Any) -> Tree:
        return optree.tree_map(torch.sub, x, fixed_point_fn(x, *args))

    optimality_fn.__wrapped__ = fixed_point_fn  # type: ignore[attr-defined]
    return custom_root(optimality_fn, solve=solve, has_aux=has_aux)
