"""The batched meta-loss of ``innerloop_ctx`` code, from its pieces: :class:`MetaObjective`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from ._batched import batched_meta_loss
from ._batching import BATCHING, choose_batching
from ._functional_model import FunctionalModel
from ._inner_loop import Params, _as_tuple
from ._loop_checks import (
    _RANDOMNESS,
    _check_callable,
    _check_choice,
    _check_has_examples,
    _check_steps,
    _leaves_with_paths,
)
from ._optimizer_rule import rule_from_optimizer

__all__ = ["MetaObjective"]


class MetaObjective:
    """The batched meta-loss of ``innerloop_ctx`` code, from its pieces, without a rewrite.

    ``innerloop_ctx`` code adapts ``model`` with ``inner_optimizer`` on each task's support
    set and sums the query losses.  This class computes the same meta-loss for a whole batch
    of tasks at once (``vmap`` over tasks, ``torch.func.grad`` inside), which pays off on
    small models and many tasks (see ``benchmarks/``; on a small CPU, conv nets can be
    faster as a loop); compiled (``compiled(objective.value_and_grad)``) it is faster still.
    The meta-gradient equals the per-task loop's, batch norm included.

    Args:
        model: the meta-model; its parameters are the meta-parameters (``.backward()`` on
            the result fills their ``.grad``).  Its buffers are each task's starting
            buffers and are never modified.  ``train()``/``eval()`` applies as usual.
        inner_optimizer: the ``torch.optim`` optimizer used as ``innerloop_ctx``'s inner
            optimizer: its class, parameter groups, hyperparameters and any state are taken
            (once, here).  Parameters in no group, or not requiring grad, are not adapted.
        loss_fn: the per-task loss ``loss_fn(predictions, targets) -> scalar``, e.g.
            ``F.cross_entropy``.
        steps: inner steps per task.
        first_order: first-order MAML (see :func:`inner_loop`).
        truncate: differentiate through the last ``truncate`` steps only.
        randomness: ``vmap``'s policy for dropout and other random ops (``"error"``,
            ``"different"``, ``"same"``).
        chunk_size: vmap this many tasks at a time.
        batching: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :func:`batched_meta_loss`);
            ``"auto"`` goes straight to the loop, with a one-time warning, for a model
            with an ``nn.LSTM``/``GRU``/``RNN`` or a training-mode ``spectral_norm``.
        recompute: store iterates and rebuild steps in the backward pass, for long inner
            loops at bounded memory (see :func:`inner_loop`).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> model = torch.nn.Linear(1, 1)
        >>> objective = MetaObjective(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                           F.mse_loss, steps=2)
        >>> x, y = torch.randn(4, 5, 1), torch.randn(4, 5, 1)   # 4 tasks of 5 points
        >>> objective((x, y), (x, y)).backward()                 # support, query
        >>> model.weight.grad.shape
        torch.Size([1, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], Tensor],
        *,
        steps: int = 1,
        first_order: bool = False,
        truncate: int | None = None,
        randomness: str = "error",
        chunk_size: int | None = None,
        batching: str = "auto",
        recompute: bool = False,
    ) -> None:
        _check_callable("loss_fn", loss_fn)
        _check_steps(steps, truncate)
        _check_choice("randomness", randomness, _RANDOMNESS)
        _check_choice("batching", batching, BATCHING)
        self.batching = batching
        self.model = FunctionalModel(model)
        self.rule, self.state = rule_from_optimizer(inner_optimizer, model)
        self.loss_fn = loss_fn
        self.options: dict[str, Any] = {
            "steps": steps,
            "first_order": first_order,
            "truncate": truncate,
            "randomness": randomness,
            "chunk_size": chunk_size,
            "recompute": recompute,
        }

    def _task_loss(self, params: Params, buffers: Params, inputs: Any, targets: Any) -> Any:
        predictions, buffers = self.model.with_buffers(params, buffers, *_as_tuple(inputs))
        return self.loss_fn(predictions, targets), buffers

    def loss(
        self,
        params: Params,
        support: tuple[Any, Any],
        query: tuple[Any, Any],
        *,
        task_hyperparameters: Mapping[str, Tensor] | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """The batched meta-loss at meta-parameters ``params`` (a dict by name)."""
        return batched_meta_loss(
            self._task_loss,
            self.rule,
            params,
            _pair("support", support),
            _pair("query", query),
            state=self.state,
            buffers=self.model.buffers,
            task_hyperparameters=task_hyperparameters,
            reduction=reduction,
            batching=choose_batching(self.batching, self.model.module),
            **self.options,
        )

    def __call__(
        self,
        support: tuple[Any, Any],
        query: tuple[Any, Any],
        *,
        task_hyperparameters: Mapping[str, Tensor] | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """The batched meta-loss at the model's parameters (call ``.backward()`` on it).

        Args:
            support: ``(inputs, targets)``, each with the task as dimension 0; ``inputs``
                may be a tuple of tensors (several model inputs).
            query: ``(inputs, targets)``, likewise.
            task_hyperparameters: per-task overrides, e.g. ``{"lr": lrs}`` (shape
                ``(tasks,)``), for every parameter group.
            reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        """
        return self.loss(
            self.model.params,
            support,
            query,
            task_hyperparameters=task_hyperparameters,
            reduction=reduction,
        )

    def value_and_grad(
        self,
        support: tuple[Any, Any],
        query: tuple[Any, Any],
        *,
        task_hyperparameters: Mapping[str, Tensor] | None = None,
        reduction: str = "mean",
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(meta-loss, meta-gradient by name)`` for parameters requiring grad, by ``torch.func``.

        Same arguments as calling the objective; ``reduction`` is ``"mean"`` or ``"sum"``.
        Compile it whole: ``higher_func.func.compiled(objective.value_and_grad)``.
        """
        _check_choice("reduction", reduction, ("mean", "sum"))
        params = self.model.params
        trainable = {name: p.detach() for name, p in params.items() if p.requires_grad}
        frozen = {name: p.detach() for name, p in params.items() if not p.requires_grad}

        def objective(trainable: Params) -> Tensor:
            return self.loss(
                {**trainable, **frozen},
                support,
                query,
                task_hyperparameters=task_hyperparameters,
                reduction=reduction,
            )

        grads, value = grad_and_value(objective)(trainable)
        return value, grads


def _pair(argument: str, batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"{argument} must be a pair (inputs, targets) with the task as dimension 0, got "
            f"{type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, tuple | list) else ''}."
        )
    for where, leaf in _leaves_with_paths(f"{argument} inputs", batch[0]):
        _check_has_examples(where, leaf)
    return (batch[0], batch[1])
