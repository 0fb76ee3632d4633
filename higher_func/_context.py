"""``innerloop_ctx`` and the inner-loop helpers ``higher``'s users asked for.

* :func:`innerloop_ctx`: ``higher``'s context manager yielding ``(fmodel, diffopt)``, plus
  ``first_order=True`` (first-order MAML whose initial weights still get a meta-gradient),
  ``schedule=`` (hyperparameter schedules inside the loop) and ``grad_callback=``.
* :func:`write_back_module`, :func:`write_back_optimizer`: carry adapted fast weights,
  BatchNorm statistics and optimizer state back into the model and its torch optimizer.
* :func:`truncate`: detach fast weights and optimizer state (truncated backpropagation).
* :func:`clip_grad_norm`, :func:`clip_grad_value`: differentiable gradient clipping, as a
  ``grad_callback``.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._constructors import get_diff_optim
from ._diffopt import DifferentiableOptimizer, GradCallback
from ._hyperparams import Override, Schedule
from ._patch import FunctionalModule, _monkeypatched
from ._torch_state import write_state

__all__ = [
    "clip_grad_norm",
    "clip_grad_value",
    "innerloop_ctx",
    "truncate",
    "write_back_module",
    "write_back_optimizer",
]

Grads = Sequence[Tensor | None]


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Override | None = None,
    track_higher_grads: bool = True,
    *,
    first_order: bool = False,
    schedule: Schedule | None = None,
    grad_callback: GradCallback | None = None,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """A functional copy of ``model`` and a differentiable twin of ``opt``, for an inner loop.

    ``monkeypatch(model, ...)`` then ``get_diff_optim(opt, model.parameters(), fmodel=...)``,
    exactly as in ``higher``.  Nothing happens on exit.

    Args:
        model: the module ``opt`` optimizes.
        opt: its ``torch.optim`` optimizer (state, if any, is imported detached).
        device: where fast weights and optimizer state live (default: the model's).
        copy_initial_weights: ``True``: the initial fast weights are detached copies (no
            gradient reaches ``model``); ``False``: they are ``model``'s parameters, so an
            outer ``backward`` fills ``model``'s ``.grad`` (MAML).
        override: ``{name: [value]}`` or ``{name: [v0, v1, ...]}`` (one per group).
        track_higher_grads: keep the graph through the steps (``False``: first-order/test).
        first_order: first-order MAML: the steps keep no graph (as with
            ``track_higher_grads=False``), yet the fast weights stay connected to ``model``'s
            parameters with an identity Jacobian, so an outer ``backward`` gives them the
            first-order meta-gradient (the query-loss gradient at the adapted weights).
            Needs ``copy_initial_weights=False``.
        schedule: ``{name: fn}`` (or ``[fn per group]``): before step ``t`` (from 0) the
            hyperparameter is set to ``fn(t)``; e.g. ``{"lr": lambda t: 0.1 * 0.5**t}``.
        grad_callback: applied to the gradients of every step (e.g. :func:`clip_grad_norm`).

    Yields:
        ``(fmodel, diffopt)``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x = torch.randn(4, 2)
        >>> with hf.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         _ = diffopt.step(fmodel(x).pow(2).mean())
        ...     fmodel(x).pow(2).mean().backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be a bool, got {type(first_order).__name__}.")
    if first_order and copy_initial_weights:
        raise ValueError(
            "first_order=True gives model's parameters a first-order meta-gradient, which "
            "copy_initial_weights=True rules out (it detaches them). Pass "
            "copy_initial_weights=False."
        )
    tracked = track_higher_grads and not first_order
    fmodel, parameters = _monkeypatched(model, device, copy_initial_weights, tracked)
    extras: dict[str, Any] = {}
    if schedule is not None:
        extras["schedule"] = schedule
    if grad_callback is not None:
        extras["grad_callback"] = grad_callback
    diffopt = get_diff_optim(
        opt,
        parameters,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=tracked,
        **extras,
    )
    if first_order:
        diffopt._connect_first_order(fmodel.fast_params)
    yield fmodel, diffopt


# --------------------------------------------------------------------------- write-back


def write_back_module(fmodel: FunctionalModule, module: nn.Module, buffers: bool = True) -> None:
    """Copy ``fmodel``'s latest fast weights (and buffers, e.g. BatchNorm running statistics)
    into ``module``, in place and without gradient.

    Call it after the outer ``backward``: the copy changes ``module``'s parameters in place,
    and autograd refuses to backpropagate through tensors modified after use.

    Args:
        fmodel: a functional module made from ``module`` (or a module of the same structure).
        module: the module to update.
        buffers: also copy the buffers (``fmodel``'s private running statistics).

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        ...     _ = diffopt.step(fmodel(torch.ones(1, 2)).sum())
        ...     hf.write_back_module(fmodel, model)
        >>> torch.equal(model.weight, fmodel.weight)
        True
    """
    params = dict(module.named_parameters())
    _copy_into(params, zip(fmodel.param_names, fmodel.fast_params, strict=True), "parameter")
    if buffers:
        _copy_into(dict(module.named_buffers()), fmodel.named_buffers(), "buffer")


def _copy_into(targets: Mapping[str, Tensor], sources: Any, what: str) -> None:
    pairs = list(sources)
    missing = sorted({name for name, _ in pairs} - set(targets))
    if missing:
        raise ValueError(
            f"module has no {what}(s) {missing}, which fmodel has: write back into the module "
            f"the fmodel was made from."
        )
    for name, value in pairs:
        if targets[name].shape != value.shape:
            raise ValueError(
                f"{what} {name!r} has shape {tuple(targets[name].shape)} in module but "
                f"{tuple(value.shape)} in fmodel: write back into the module fmodel was made from."
            )
    with torch.no_grad():
        for name, value in pairs:
            targets[name].copy_(value)


def write_back_optimizer(diffopt: DifferentiableOptimizer, opt: torch.optim.Optimizer) -> None:
    """Write ``diffopt``'s optimizer state (momentum buffers, moments, step counts) into the
    torch optimizer it was built from, so that ``opt`` continues where the inner loop ended.

    Entries are detached copies in ``torch.optim``'s conventions (dtype and device of each
    parameter; step counts as torch keeps them).  Parameters that ``diffopt`` never updated
    keep their torch state.  Hyperparameters are not written (see
    :func:`higher_func.optim.apply_trainable_opt_params`).

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters())
        >>> with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        ...     _ = diffopt.step(fmodel(torch.ones(1, 2)).sum())
        >>> hf.write_back_optimizer(diffopt, opt)
        >>> opt.state[model.weight]["step"]
        tensor(1.)
    """
    group_sizes = [len(indices) for indices in diffopt._group_to_param_list]
    write_state(diffopt.state, group_sizes, opt)


# --------------------------------------------------------------------------- truncation


def truncate(
    fmodel: FunctionalModule | None = None, diffopt: DifferentiableOptimizer | None = None
) -> None:
    """Detach the fast weights and the optimizer state here (truncated backpropagation).

    Later steps and losses are differentiated back to this point only.  For a tracking
    fmodel the history restarts: ``parameters(time=0)`` is now the truncated weights, and
    the earlier entries are released so their graph can be freed.  Frozen weights stay
    frozen.

    Args:
        fmodel: the functional module whose latest fast weights to detach.
        diffopt: the differentiable optimizer whose state to detach.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> with hf.innerloop_ctx(model, opt) as (fmodel, diffopt):
        ...     _ = diffopt.step(fmodel(torch.ones(1, 2)).sum())
        ...     hf.truncate(fmodel, diffopt)
        ...     fmodel.fast_params[0].grad_fn is None
        True
    """
    if diffopt is not None:
        diffopt.detach_state()
    if fmodel is not None:
        latest = [p.detach().requires_grad_(p.requires_grad) for p in fmodel.fast_params]
        tracking = fmodel.track_higher_grads
        fmodel.track_higher_grads = False  # releases the history but the latest entry
        fmodel.update_params(latest)
        fmodel.track_higher_grads = tracking


# --------------------------------------------------------------------------- clipping


def clip_grad_norm(
    max_norm: float | Tensor, norm_type: float = 2.0
) -> Callable[[Grads], list[Tensor | None]]:
    """A differentiable ``grad_callback`` scaling all gradients to a total norm <= ``max_norm``.

    The same math as ``torch.nn.utils.clip_grad_norm_``: the total ``norm_type``-norm ``n`` of
    all gradients, then every gradient times ``min(1, max_norm / (n + 1e-6))``, without in-place
    operations, so gradients flow through the clipping (and to ``max_norm`` if it is a tensor
    requiring grad).  ``None`` gradients stay ``None``.

    Args:
        max_norm: the largest total norm.
        norm_type: the norm's order (``float("inf")`` for the largest absolute value).

    Returns:
        ``grads -> clipped grads``, for ``grad_callback=``.

    Example:
        >>> import torch, higher_func as hf
        >>> clip = hf.clip_grad_norm(1.0)
        >>> clip([torch.tensor([3.0, 4.0]), None])
        [tensor([0.6000, 0.8000]), None]
    """
    _check_number("max_norm", max_norm)
    _check_number("norm_type", norm_type)

    def clip(grads: Grads) -> list[Tensor | None]:
        present = [g for g in grads if g is not None]
        if not present:
            return list(grads)
        device = present[0].device
        norms = [torch.linalg.vector_norm(g, norm_type).to(device) for g in present]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return [None if g is None else g * scale.to(g.device) for g in grads]

    return clip


def clip_grad_value(clip_value: float | Tensor) -> Callable[[Grads], list[Tensor | None]]:
    """A differentiable ``grad_callback`` clamping every gradient element to
    ``[-clip_value, clip_value]`` (``torch.nn.utils.clip_grad_value_`` without in-place ops).

    Example:
        >>> import torch, higher_func as hf
        >>> hf.clip_grad_value(0.5)([torch.tensor([-2.0, 0.1, 3.0])])
        [tensor([-0.5000,  0.1000,  0.5000])]
    """
    _check_number("clip_value", clip_value)

    def clip(grads: Grads) -> list[Tensor | None]:
        if isinstance(clip_value, Tensor):
            return [None if g is None else torch.clamp(g, -clip_value, clip_value) for g in grads]
        value = float(clip_value)
        return [None if g is None else torch.clamp(g, -value, value) for g in grads]

    return clip


def _check_number(argument: str, value: Any) -> None:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (is_number or (isinstance(value, Tensor) and value.numel() == 1)):
        raise TypeError(
            f"{argument} must be a number (or a one-element tensor), got "
            f"{type(value).__name__}. These helpers return the callback: pass "
            f"grad_callback=clip_grad_norm(1.0), not clip_grad_norm(grads, ...)."
        )
