"""Many tasks at once: :func:`batched_meta_loss`, one task's meta-loss ``vmap``-ed over tasks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optree
from torch import Tensor
from torch.func import vmap

from ._attention import vmap_attention
from ._batching import BATCHING, batch_tasks, loop_over_tasks
from ._inner_loop import Hyperparameters, Params, _as_tuple, _overrides_at, meta_loss
from ._loop_checks import _RANDOMNESS, _REDUCTIONS, _check_choice, _check_task_batch

__all__ = ["batched_meta_loss"]


def batched_meta_loss(
    loss: Callable[..., Any],
    rule: Any,
    params: Any,
    support: Any,
    query: Any,
    *,
    query_loss: Callable[..., Any] | None = None,
    steps: int = 1,
    state: Any = None,
    buffers: Params | None = None,
    hyperparameters: Hyperparameters = None,
    task_hyperparameters: Mapping[str, Tensor] | None = None,
    first_order: bool = False,
    truncate: int | None = None,
    reduction: str = "mean",
    randomness: str = "error",
    chunk_size: int | None = None,
    recompute: bool = False,
    batching: str = "auto",
) -> Tensor:
    """:func:`meta_loss` over a batch of tasks in one ``vmap``, ``params`` shared.

    ``params``, ``state``, ``buffers`` and ``hyperparameters`` are shared by all tasks
    (``in_dims=None``); every tensor in ``support``, ``query`` and
    ``task_hyperparameters`` has the task as its first dimension.  The result equals a
    Python loop over tasks of :func:`meta_loss` (tested in float64 to 1e-10, batch and
    layer norms included) and is differentiable with respect to ``params`` and to tensor
    hyperparameters, by ``.backward()`` or ``torch.func.grad``; the whole meta-gradient
    compiles with ``torch.compile(fullgraph=True)``.

    Args:
        loss, rule, params, query_loss, steps, state, buffers, hyperparameters,
            first_order, truncate, recompute: as in :func:`meta_loss`.
        support: per-task support data: a tuple of tensors (or one tensor) of shape
            ``(tasks, ...)``.
        query: per-task query data, likewise.
        task_hyperparameters: per-task overrides applied at every step, e.g.
            ``{"lr": lrs}`` with ``lrs`` of shape ``(tasks,)`` (learned per-task learning
            rates); they take precedence over ``hyperparameters``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one loss per task).
        randomness: ``vmap``'s policy for random ops such as dropout: ``"error"`` (raise),
            ``"different"`` (independent per task) or ``"same"`` (one draw for all).
        chunk_size: vmap this many tasks at a time (less memory, same result).
        batching: ``"auto"`` (default): ``vmap``, or a per-task loop with a one-time
            warning naming the module or op when ``vmap`` cannot batch the model (an
            ``nn.LSTM``, a training-mode ``spectral_norm``, transformers' 0/1 attention
            masks); ``"vmap"``: raise a :class:`~higher_func.func.BatchingError` naming the
            module and the fix instead; ``"loop"``: always the loop (same result; random
            ops draw per task, or from one state with ``randomness="same"``).

    Returns:
        The reduced meta-loss (shape ``()``; ``(tasks,)`` with ``reduction="none"``).

    Example:
        >>> import torch, higher_func as hf
        >>> theta = {"w": torch.tensor(0.0, requires_grad=True)}
        >>> square = lambda p, target: ((p["w"] - target) ** 2).mean()
        >>> targets = torch.tensor([[1.0], [2.0]])
        >>> losses = batched_meta_loss(square, hf.optim.sgd(lr=0.25), theta, targets, targets,
        ...                            reduction="none")
        >>> losses.detach()  # per task: (0.5 * target) ** 2
        tensor([0.2500, 1.0000])
    """
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("randomness", randomness, _RANDOMNESS)
    _check_choice("batching", batching, BATCHING)
    support, query = _as_tuple(support), _as_tuple(query)
    per_task = dict(task_hyperparameters or {})
    tasks = _check_task_batch(support, query, per_task)
    options: dict[str, Any] = {
        "query_loss": query_loss,
        "steps": steps,
        "first_order": first_order,
        "truncate": truncate,
        "recompute": recompute,
    }

    def task_loss(
        params: Any, state: Any, buffers: Any, support: Any, query: Any, per_task: Any
    ) -> Tensor:
        return meta_loss(
            loss,
            rule,
            params,
            support,
            query,
            state=state,
            buffers=buffers,
            hyperparameters=_with_task_overrides(hyperparameters, per_task),
            **options,
        )

    def vmapped() -> Tensor:
        with vmap_attention(params):
            return vmap(
                task_loss,
                in_dims=(None, None, None, 0, 0, 0),
                randomness=randomness,
                chunk_size=chunk_size,
            )(params, state, buffers, support, query, per_task)

    def one_task(i: int) -> Tensor:
        batches: Any = (support, query, per_task)
        return task_loss(params, state, buffers, *optree.tree_map(lambda t: t[i], batches))

    def looped() -> Tensor:
        return loop_over_tasks(tasks, one_task, randomness)

    try:
        losses = batch_tasks(vmapped, looped, batching, "batched_meta_loss")
    except RuntimeError as error:
        if "randomness error mode" not in str(error):
            raise
        raise RuntimeError(_RANDOM_OP_UNDER_VMAP) from None
    return _reduce(losses, reduction)


_RANDOM_OP_UNDER_VMAP = (
    "A random operation (e.g. dropout) ran inside the task batch, which randomness='error' "
    "(the default) refuses. Pass randomness='different' (independent draws per task, like "
    "a loop over tasks) or randomness='same' (one draw shared by all tasks) to "
    "MetaObjective(...) or batched_meta_loss(...), or put the model in eval() mode."
)


def _with_task_overrides(shared: Hyperparameters, per_task: Mapping[str, Any]) -> Hyperparameters:
    if not per_task:
        return shared
    if shared is None or isinstance(shared, Mapping):
        return {**(shared or {}), **per_task}
    schedule = shared
    return lambda k: {**_overrides_at(schedule, k), **per_task}


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
