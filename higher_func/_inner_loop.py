"""Functional inner loops: k steps of a rule with ``torch.func.grad``, batched with ``vmap``.

The math of gradient-based meta-learning, written as functions::

    phi_0 = theta
    phi_{k+1}, s_{k+1} = rule.step(phi_k, grad L_support(phi_k), s_k)      k < K
    meta-loss(theta) = L_query(phi_K)

* :class:`FunctionalModel` turns an ``nn.Module`` into ``f(params, buffers, *inputs)``.
* :func:`inner_loop` runs the K steps for one task and returns ``phi_K`` (and more).
* :func:`meta_loss` is ``L_query(phi_K(theta))`` for one task; :func:`batched_meta_loss`
  vmaps it over a batch of tasks, ``theta`` shared.
* :class:`MetaObjective` builds the same batched meta-loss from the pieces of
  ``innerloop_ctx`` code: a model, its torch inner optimizer and a per-task loss.

Inner gradients come from ``torch.func.grad`` (never ``autograd.grad(create_graph=True)``),
so the whole meta-gradient can be vmapped over tasks and compiled with ``torch.compile``.

Randomness under ``vmap``: dropout and other random ops raise by default
(``randomness="error"``); pass ``randomness="different"`` for independent draws per task
(what a per-task loop does) or ``"same"`` for one draw shared by all tasks.  Neither
reproduces a per-task loop's random numbers bit for bit: compare with dropout off.

Where the pieces live: this module holds one task (:func:`inner_loop`, :func:`meta_loss`);
``_functional_model.py`` the model, ``_batched.py`` many tasks, ``_optimizer_rule.py`` a
torch optimizer as a rule, ``_meta_objective.py`` :class:`MetaObjective`, ``_loop_checks.py``
the argument checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch.func import grad

from ._attention import second_order_attention
from ._loop_checks import _check_callable, _check_rule, _check_scalar, _check_steps
from ._recompute import recomputed_inner_loop

__all__ = ["InnerLoop", "inner_loop", "meta_loss"]


Params = Mapping[str, Tensor]
Hyperparameters = Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None


class InnerLoop(NamedTuple):
    """What :func:`inner_loop` returns.

    Attributes:
        params: the adapted parameters ``phi_K``, keyed like the input ``params``.
        state: the rule's state after the K steps.
        buffers: the buffers after the K forwards (``None`` when none were given).
        losses: the inner losses ``L_support(phi_k)`` for ``k = 0 .. K-1``, shape ``(K,)``.
        trajectory: ``(phi_0, ..., phi_K)`` when asked for with ``trajectory=True``,
            else ``None``.

    Example:
        >>> import torch, higher_func as hf
        >>> square = lambda p: (p["w"] - 3.0) ** 2
        >>> rule, params = hf.optim.sgd(lr=0.25), {"w": torch.tensor(1.0)}
        >>> result = hf.func.inner_loop(square, rule, params, steps=2, trajectory=True)
        >>> result.params["w"], result.losses, len(result.trajectory)
        (tensor(2.5000), tensor([4., 1.]), 3)
    """

    params: Any
    state: Any
    buffers: Any
    losses: Tensor
    trajectory: tuple[Any, ...] | None


def inner_loop(
    loss: Callable[..., Any],
    rule: Any,
    params: Any,
    *batch: Any,
    steps: int = 1,
    state: Any = None,
    buffers: Params | None = None,
    hyperparameters: Hyperparameters = None,
    first_order: bool = False,
    truncate: int | None = None,
    trajectory: bool = False,
    recompute: bool = False,
) -> InnerLoop:
    """K differentiable steps of ``rule`` on ``loss``: ``phi_{k+1} = step(phi_k, grad L(phi_k))``.

    Gradients come from ``torch.func.grad``; the result is differentiable with respect to
    ``params`` (and to any tensor hyperparameter) to every order, by ``torch.func``
    transforms or by ``.backward()``, and the function runs under ``vmap`` and
    ``torch.compile``.

    Args:
        loss: ``loss(params, *batch) -> scalar``; with ``buffers`` given,
            ``loss(params, buffers, *batch) -> (scalar, new_buffers)`` (e.g. built on
            :meth:`FunctionalModel.with_buffers`), so running statistics carry from step
            to step.
        rule: an update rule from :mod:`higher_func.optim` (``hf.optim.sgd(lr=0.1)``), or
            anything with ``init(params)`` and ``step(params, grads, state, **overrides)``.
        params: the starting point ``phi_0`` (a dict of tensors, or any pytree of them).
            Every leaf is adapted; leave a tensor out to freeze it.  A parameter the loss
            does not use gets a zero gradient (``torch.func.grad`` cannot tell "unused"
            from "zero"), so with weight decay or momentum it still moves: leave it out.
        *batch: the task's data, passed on to ``loss``.
        steps: K, the number of steps (``>= 0``).
        state: the rule's starting state (default ``rule.init(params)``), e.g. imported
            from a torch optimizer.
        buffers: the model's buffers, threaded through the steps (see ``loss``).
        hyperparameters: overrides for every step (``{"lr": lr}``; tensors requiring grad
            receive hypergradients), or a function ``k -> overrides`` for a schedule
            (``lambda k: {"lr": lrs[k]}``).
        first_order: use ``stop_gradient(grad L(phi_k))`` (first-order MAML): the
            meta-gradient skips second derivatives but still reaches ``params`` and the
            hyperparameters through the steps.
        truncate: differentiate through the last ``truncate`` steps only; the earlier
            ones run without building a graph (truncated backpropagation, Shaban et al.
            2019), so nothing before them (``params`` included) receives a gradient
            through them.  ``None`` differentiates through all steps.
        trajectory: also return every iterate ``(phi_0, ..., phi_K)``.
        recompute: keep no graph across steps: store each step's iterate (params, state,
            buffers) and rebuild one step at a time in the backward pass
            (:mod:`higher_func._recompute`).  Same meta-gradient, memory bounded by the
            iterates plus one step's graph, about one extra inner step per step of time.
            Reverse mode only; every tensor requiring grad must be passed in (``params``,
            ``state``, ``buffers``, ``hyperparameters``, the batch or the rule).

    Returns:
        An :class:`InnerLoop` ``(params, state, buffers, losses, trajectory)``.

    Example:
        >>> import torch, higher_func as hf
        >>> theta = {"w": torch.tensor(1.0, requires_grad=True)}
        >>> square = lambda p, target: (p["w"] - target) ** 2
        >>> result = inner_loop(square, hf.optim.sgd(lr=0.25), theta, torch.tensor(3.0), steps=2)
        >>> result.params["w"]  # 1 -> 2 -> 2.5
        tensor(2.5000, grad_fn=<SubBackward0>)
        >>> torch.autograd.grad(result.params["w"], theta["w"])[0]  # (1 - 2 * 0.25) ** 2
        tensor(0.2500)
    """
    _check_rule(rule)
    _check_steps(steps, truncate)
    _check_callable("loss", loss)
    if state is None:
        state = rule.init(params)
    objective = _objective(loss, stateful=buffers is not None)
    if recompute and steps and truncate != 0:  # else there is no graph to spare
        schedule = [_overrides_at(hyperparameters, k) for k in range(steps)]
        start, flags = (params, state, buffers), (first_order, truncate, trajectory)
        return InnerLoop(*recomputed_inner_loop(objective, rule, start, batch, schedule, *flags))
    history = [params]
    losses = []
    for k in range(steps):
        differentiable = truncate is None or k >= steps - truncate
        with nullcontext() if differentiable else torch.no_grad():
            overrides = _overrides_at(hyperparameters, k)
            at = _detach(params) if first_order else params
            with second_order_attention(not first_order):
                grads, (value, new_buffers) = grad(objective, has_aux=True)(at, buffers, *batch)
            buffers = new_buffers if buffers is not None else None
            params, state = rule.step(params, grads, state, **overrides)
        losses.append(value)
        if trajectory:
            history.append(params)
    stacked = torch.stack(losses) if losses else _no_losses(params)
    return InnerLoop(params, state, buffers, stacked, tuple(history) if trajectory else None)


def _no_losses(params: Any) -> Tensor:
    leaves = optree.tree_leaves(params)
    return leaves[0].new_zeros(0) if leaves else torch.zeros(0)


def _objective(loss: Callable[..., Any], stateful: bool) -> Callable[..., Any]:
    """``loss`` as ``(params, buffers, *batch) -> (value, (value, new_buffers))``.

    Without buffers the auxiliary output is ``(value, {})`` (``grad`` cannot return ``None``).
    """

    def objective(params: Any, buffers: Any, *batch: Any) -> tuple[Tensor, Any]:
        if stateful:
            value, buffers = _split_stateful(loss(params, buffers, *batch))
        else:
            value, buffers = loss(params, *batch), {}
        _check_scalar(value)
        return value, (value, buffers)

    return objective


def _split_stateful(result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(
            "With buffers=..., loss(params, buffers, *batch) must return (loss, new_buffers), "
            f"got {type(result).__name__}. Return e.g. (F.mse_loss(out, y), new_buffers) with "
            "out, new_buffers = fmodel.with_buffers(params, buffers, x)."
        )
    return result


def _detach(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.detach(), tree)


def _overrides_at(hyperparameters: Hyperparameters, k: int) -> Mapping[str, Any]:
    if hyperparameters is None:
        return {}
    # isinstance before callable(): dynamo cannot trace callable() on a dict.
    if isinstance(hyperparameters, Mapping):
        return hyperparameters
    overrides = hyperparameters(k) if callable(hyperparameters) else None
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"hyperparameters must be a dict of overrides (e.g. {{'lr': lr}}) or a function "
            f"step -> dict, got {type(hyperparameters).__name__}"
            f"{f' returning {type(overrides).__name__}' if callable(hyperparameters) else ''}."
        )
    return overrides


def meta_loss(
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
    first_order: bool = False,
    truncate: int | None = None,
    recompute: bool = False,
) -> Tensor:
    """One task's meta-loss ``L_query(phi_K(params))`` after :func:`inner_loop` on ``support``.

    Args:
        loss: the inner (support) loss, as in :func:`inner_loop`.
        rule, params, steps, state, buffers, hyperparameters, first_order, truncate,
            recompute: as in :func:`inner_loop`.
        support: the support batch, a tuple of arguments for ``loss`` (a single tensor is
            taken as a 1-tuple).
        query: the query batch, likewise.
        query_loss: the outer loss, same signature as ``loss`` (default ``loss``).  With
            ``buffers``, it runs with the adapted buffers and its buffer updates are
            dropped.

    Returns:
        The scalar meta-loss, differentiable with respect to ``params``.

    Example:
        >>> import torch, higher_func as hf
        >>> theta = {"w": torch.tensor(0.0, requires_grad=True)}
        >>> square = lambda p, target: (p["w"] - target) ** 2
        >>> meta_loss(square, hf.optim.sgd(lr=0.25), theta, torch.tensor(2.0), torch.tensor(1.0))
        tensor(0., grad_fn=<PowBackward0>)
    """
    adapted = inner_loop(
        loss,
        rule,
        params,
        *_as_tuple(support),
        steps=steps,
        state=state,
        buffers=buffers,
        hyperparameters=hyperparameters,
        first_order=first_order,
        truncate=truncate,
        recompute=recompute,
    )
    outer = loss if query_loss is None else query_loss
    if buffers is None:
        value = outer(adapted.params, *_as_tuple(query))
    else:
        value, _ = _split_stateful(outer(adapted.params, adapted.buffers, *_as_tuple(query)))
    _check_scalar(value)
    return value


def _as_tuple(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)
