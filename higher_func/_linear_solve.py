"""Linear solvers over pytrees of tensors, for the adjoint systems of implicit differentiation.

Every solver has the signature ``solve(matvec, b, **options) -> x`` where ``matvec`` is a
linear function from a pytree like ``b`` to a pytree like ``b`` and ``x`` approximately
satisfies ``matvec(x) + damping * x = b``. They run a fixed number of iterations with no
``.item()`` and no Python branch on tensor values: once the tolerance is met, further updates
are masked off with ``torch.where``. So a solve runs unchanged under ``vmap``, ``grad`` and
``torch.compile``, and is itself differentiable (the second derivatives of
:mod:`higher_func.implicit` differentiate through it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = ["solve_cg", "solve_inv", "solve_lu", "solve_neumann", "solve_normal_cg"]

Tree = Any
MatVec = Callable[[Tree], Tree]


def _map(fn: Callable[..., Tensor], tree: Tree, *rest: Tree) -> Tree:
    return optree.tree_map(fn, tree, *rest)


def _vdot(a: Tree, b: Tree) -> Tensor:
    """``sum_leaves <a, b>``: a 0-dim tensor (batched under vmap)."""
    pairs = zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    return functools.reduce(torch.add, [torch.sum(x * y) for x, y in pairs])


def _axpy(alpha: Tensor | float, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y`` leaf by leaf."""
    return _map(lambda a, b: alpha * a + b, x, y)


def _where(condition: Tensor, x: Tree, y: Tree) -> Tree:
    return _map(lambda a, b: torch.where(condition, a, b), x, y)


def _damped(matvec: MatVec, damping: float) -> MatVec:
    if damping < 0:
        raise ValueError(
            f"damping: expected a float >= 0 (the ridge added to the linear system), got {damping}"
        )
    if damping == 0:
        return matvec
    return lambda x: _axpy(damping, x, matvec(x))


def _check_steps(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1 (a fixed iteration count), got {value!r}")


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 0 where the denominator is 0 (with finite gradients)."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator, 0.0) / torch.where(nonzero, denominator, 1.0)


def solve_cg(
    matvec: MatVec,
    b: Tree,
    *,
    maxiter: int | None = None,
    tol: float = 1e-10,
    damping: float = 0.0,
    init: Tree | None = None,
) -> Tree:
    """Conjugate gradients for a symmetric positive definite system ``(A + damping I) x = b``.

    The choice for the Hessian of a strictly convex inner objective. Runs ``maxiter``
    iterations; those after ``||r|| <= tol * ||b||`` leave ``x`` unchanged (masked, not
    skipped, so the count is fixed). On a non-symmetric ``A`` it converges to a wrong answer:
    use :func:`solve_normal_cg` there.

    Args:
        matvec: the linear map ``x -> A x`` over pytrees shaped like ``b``.
        b: the right-hand side, a pytree of tensors.
        maxiter: the fixed number of iterations; by default ``dim(b)`` (after which CG is
            exact in exact arithmetic), at most 100.
        tol: relative residual at which updates stop.
        damping: ``lambda >= 0`` added to the diagonal, for an ill-conditioned ``A``.
        init: a starting point shaped like ``b`` (zeros by default).

    Returns:
        ``x``, shaped like ``b``.

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> x = solve_cg(lambda v: A @ v, b)
        >>> torch.allclose(A @ x, b)
        True
    """
    if maxiter is None:
        maxiter = min(100, sum(leaf.numel() for leaf in optree.tree_leaves(b)))
    _check_steps("maxiter", maxiter)
    operator = _damped(matvec, damping)
    x = _map(torch.zeros_like, b) if init is None else init
    r = _axpy(-1.0, operator(x), b)
    p = r
    rs = _vdot(r, r)
    threshold = tol**2 * _vdot(b, b)
    for _ in range(maxiter):
        done = rs <= threshold
        ap = operator(p)
        alpha = _safe_divide(rs, _vdot(p, ap))
        x_next = _axpy(alpha, p, x)
        r_next = _axpy(-alpha, ap, r)
        rs_next = _vdot(r_next, r_next)
        p_next = _axpy(_safe_divide(rs_next, rs), p, r_next)
        x, r, p = _where(done, x, x_next), _where(done, r, r_next), _where(done, p, p_next)
        rs = torch.where(done, rs, rs_next)
    return x


def _transpose(matvec: MatVec, example: Tree) -> MatVec:
    """``y -> A^T y`` for the linear ``matvec``, by its vector-Jacobian product."""
    vjp = torch.func.vjp(matvec, _map(torch.zeros_like, example))[1]
    return lambda y: vjp(y)[0]


def solve_normal_cg(
    matvec: MatVec,
    b: Tree,
    *,
    maxiter: int | None = None,
    tol: float = 1e-10,
    damping: float = 0.0,
    init: Tree | None = None,
) -> Tree:
    """Conjugate gradients on the normal equations ``A^T A x = A^T b``, for any invertible ``A``.

    The general (and default) choice: no symmetry needed, at the price of a squared condition
    number. ``A^T`` comes from a vector-Jacobian product of ``matvec``. ``damping`` is added to
    ``A`` (not to ``A^T A``); the other arguments are those of :func:`solve_cg`.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
        >>> x = solve_normal_cg(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([-1.0, 1.0], dtype=torch.float64))
        True
    """
    operator = _damped(matvec, damping)
    transposed = _transpose(operator, b)
    return solve_cg(
        lambda x: transposed(operator(x)), transposed(b), maxiter=maxiter, tol=tol, init=init
    )


def solve_neumann(
    matvec: MatVec,
    b: Tree,
    *,
    steps: int = 20,
    alpha: float = 1.0,
    tol: float = 0.0,
    damping: float = 0.0,
) -> Tree:
    """The truncated Neumann series ``x = alpha sum_{k<=steps} (I - alpha A)^k b``.

    As in Lorraine et al. (2020): matrix-free, one ``matvec`` per term, converging when the
    spectral radius of ``I - alpha A`` is below 1 (``0 < alpha < 2 / lambda_max`` for a
    positive definite ``A``; for a fixed point ``x = T(x)`` with ``alpha = 1`` the terms are
    powers of ``dT/dx``). Terms after one of norm ``<= tol * ||b||`` are masked off.

    Args:
        matvec: the linear map ``x -> A x``.
        b: the right-hand side, a pytree of tensors.
        steps: the number of series terms after the first.
        alpha: the step size scaling ``A``.
        tol: relative term norm at which the series stops (0: all ``steps`` terms).
        damping: ``lambda >= 0`` added to the diagonal of ``A``.

    Example:
        >>> A = torch.tensor([[0.5, 0.1], [0.1, 0.4]], dtype=torch.float64)
        >>> x = solve_neumann(lambda v: A @ v, torch.ones(2, dtype=torch.float64), steps=200)
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64))
        True
    """
    _check_steps("steps", steps)
    operator = _damped(matvec, damping)
    term = _map(lambda leaf: alpha * leaf, b)
    total = term
    threshold = tol**2 * _vdot(b, b)
    for _ in range(steps):
        done = _vdot(term, term) <= threshold
        term = _where(done, _map(torch.zeros_like, term), _axpy(-alpha, operator(term), term))
        total = _map(torch.add, total, term)
    return total


def _dense(matvec: MatVec, b: Tree, damping: float) -> tuple[Tensor, Tensor, Callable]:
    """``(A + damping I)`` as a dense matrix over the flattened ``b``, the flat ``b``, unflatten."""
    leaves, treedef = optree.tree_flatten(b)
    shapes = [leaf.shape for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]

    def unflatten(flat: Tensor) -> Tree:
        parts = torch.split(flat, sizes)
        return optree.tree_unflatten(
            treedef, [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
        )

    def flat_matvec(flat: Tensor) -> Tensor:
        out = optree.tree_leaves(matvec(unflatten(flat)))
        return torch.cat([leaf.reshape(-1) for leaf in out])

    flat_b = torch.cat([leaf.reshape(-1) for leaf in leaves])
    eye = torch.eye(flat_b.numel(), dtype=flat_b.dtype, device=flat_b.device)
    matrix = torch.func.vmap(flat_matvec)(eye).T  # row i of vmap's output is A e_i
    if damping < 0:
        _damped(matvec, damping)  # raises the error
    return matrix + damping * eye, flat_b, unflatten


def solve_lu(matvec: MatVec, b: Tree, *, damping: float = 0.0) -> Tree:
    """Exact solve by LU factorisation of ``A`` materialised densely (``dim(b)`` matvecs).

    For small problems (a few thousand unknowns at most): the matrix costs ``dim(b)^2`` memory.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> b = {"x": torch.tensor([5.0, 6.0], dtype=torch.float64)}
        >>> x = solve_lu(lambda v: {"x": A @ v["x"]}, b)
        >>> torch.allclose(x["x"], torch.tensor([-4.0, 4.5], dtype=torch.float64))
        True
    """
    matrix, flat_b, unflatten = _dense(matvec, b, damping)
    return unflatten(torch.linalg.solve(matrix, flat_b))


def solve_inv(matvec: MatVec, b: Tree, *, damping: float = 0.0) -> Tree:
    """Exact solve by the explicit inverse of ``A`` materialised densely; see :func:`solve_lu`.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> solve_inv(lambda v: A @ v, torch.tensor([1.0, 1.0], dtype=torch.float64))
        tensor([0.5000, 0.2500], dtype=torch.float64)
    """
    matrix, flat_b, unflatten = _dense(matvec, b, damping)
    return unflatten(torch.linalg.inv(matrix) @ flat_b)
