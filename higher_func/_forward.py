"""Forward-mode hypergradients: memory flat in the number of inner steps.

Reverse mode (``.backward()`` on a meta-loss) keeps the unroll's graph, or its iterates with
``recompute=True``; forward mode (``torch.func.jvp``) carries one tangent along the steps
and keeps nothing, so its memory does not grow with the number of steps.  Its cost grows with
the number of hyperparameter elements instead (one tangent each), which makes it the method
for a few hyperparameters over long horizons.  :func:`hypergradient_forward` is
``torch.func.jacfwd`` for a scalar objective with its value returned and the tangents
pushed ``chunk_size`` at a time (``jacfwd`` pushes them all at once: ``n`` tangents, ``n``
times the memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor
from torch.func import jvp, vmap

__all__ = ["hypergradient_forward"]


def hypergradient_forward(
    objective: Callable[[Any], Tensor],
    hyperparameters: Any,
    *,
    chunk_size: int | None = 1,
) -> tuple[Tensor, Any]:
    """``(value, gradient)`` of a scalar ``objective(hyperparameters)`` by forward-mode AD.

    Exact (the same numbers as reverse mode up to rounding), with memory that does not grow
    with the number of inner steps inside ``objective``: build it on
    :func:`higher_func.func.meta_loss` with ``hyperparameters=...`` and leave
    ``recompute=False``.  One Jacobian-vector product per element of ``hyperparameters``.

    Args:
        objective: ``hyperparameters -> scalar tensor`` (e.g. a validation loss after an
            inner loop that uses them).
        hyperparameters: a tensor or a pytree (dict, tuple) of floating-point tensors.
        chunk_size: how many tangents to push at once under ``vmap`` (``1``, the default:
            one ``jvp`` at a time, the least memory; ``None``: all at once, like
            ``torch.func.jacfwd``).

    Returns:
        ``(value, gradient)``: the objective's value and its gradient, shaped like
        ``hyperparameters``.

    Example:
        >>> import torch, higher_func as hf
        >>> square = lambda p, target: (p["w"] - target) ** 2
        >>> def validation(h):
        ...     return hf.func.meta_loss(square, hf.optim.sgd(lr=0.1), {"w": torch.tensor(0.0)},
        ...                              torch.tensor(1.0), torch.tensor(1.0), steps=3,
        ...                              hyperparameters={"lr": h["lr"]})
        >>> value, grads = hypergradient_forward(validation, {"lr": torch.tensor(0.25)})
        >>> round(float(value), 6), round(float(grads["lr"]), 6)  # (1 - 2 lr)^6, its derivative
        (0.015625, -0.375)
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable, got {type(objective).__name__}.")
    leaves, spec = optree.tree_flatten(hyperparameters)
    bad = [leaf for leaf in leaves if not (isinstance(leaf, Tensor) and leaf.is_floating_point())]
    if bad or not leaves:
        got = type(bad[0]).__name__ if bad else "no tensors"
        raise TypeError(
            "hyperparameters must be a floating-point tensor or a pytree of them (e.g. "
            f"{{'lr': torch.tensor(0.1)}}), got {got}."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}.")
    primals = tuple(leaf.detach() for leaf in leaves)
    sizes = [leaf.numel() for leaf in primals]
    total = sum(sizes)

    def along(*tangents: Tensor) -> tuple[Tensor, Tensor]:
        def of_leaves(*xs: Tensor) -> Tensor:
            return _scalar(objective(optree.tree_unflatten(spec, list(xs))))

        value, derivative = jvp(of_leaves, primals, tangents)[:2]
        return value, derivative

    width = total if chunk_size is None else chunk_size
    value, columns = None, []
    for start in range(0, total, width):
        count = min(width, total - start)
        rows = torch.zeros(count, total, dtype=primals[0].dtype, device=primals[0].device)
        rows[torch.arange(count), torch.arange(start, start + count)] = 1.0
        tangents = _split(rows, sizes, primals)
        if rows.shape[0] == 1:
            value, derivative = along(*(t[0] for t in tangents))
            columns.append(derivative.reshape(1))
        else:
            values, derivatives = vmap(along)(*tangents)
            value = values[0]
            columns.append(derivatives)
    flat = torch.cat(columns)
    grads = [g.reshape(p.shape) for g, p in zip(flat.split(sizes), primals, strict=True)]
    assert value is not None
    return value, optree.tree_unflatten(spec, grads)


def _split(rows: Tensor, sizes: list[int], like: tuple[Tensor, ...]) -> list[Tensor]:
    """Rows of basis vectors as per-leaf tangents, shape ``(rows, *leaf.shape)``."""
    parts = rows.split(sizes, dim=1)
    return [
        part.reshape(rows.shape[0], *leaf.shape).to(leaf.dtype)
        for part, leaf in zip(parts, like, strict=True)
    ]


def _scalar(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"objective must return a scalar tensor, got {got}.")
    return value.reshape(())
