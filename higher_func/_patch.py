"""The constructors of stateless ("functional") modules: ``monkeypatch``, ``make_functional``,
``buffer_sync`` (public in :mod:`higher_func.patch`).

How it works.  :func:`monkeypatch` copies the module's *structure* once (what
``copy.deepcopy`` would give, with every parameter and buffer pre-seeded in the memo, so no
weight is copied twice and the original module is not referenced afterwards).  In that
private copy every parameter slot (``submodule._parameters[name]``) holds a *fast weight*:
a plain tensor, which may carry an autograd graph.  Recording new fast weights rewrites
those slots through a table of ``(slots dict, key, index)`` built once per fmodel, so a call
without ``params`` is a plain module call, submodules and the module's own methods always
see the latest weights, and a call with ``params=`` swaps the slots in and restores them in
``finally`` (the mechanism of ``torch.func.functional_call``, without rebuilding the
name-to-module mapping on every call).  No class is created or patched: the fmodel is a
:class:`FunctionalModule` wrapping the private copy.

Where the pieces live: the structure copy in ``_module_copy.py``, the slot table and the
reading of user-given fast weights in ``_layout.py``, the fmodel and its submodule views
(with the history of fast weights) in ``_stateless.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._attention import any_may_attend
from ._dropin_checks import warn_parameters_in_plain_containers
from ._layout import _Layout
from ._module_copy import _copy_structure, _occurrences, _to, _walk
from ._stateless import DeviceLike, FunctionalModule, FunctionalSubmodule, _Core, _StatelessBase

__all__ = [
    "FunctionalModule",
    "FunctionalSubmodule",
    "buffer_sync",
    "make_functional",
    "monkeypatch",
]

InitialFn = Callable[[Tensor], Tensor]


def _check_module(module: Any) -> None:
    if isinstance(module, _StatelessBase):
        raise TypeError(
            "module is already a functional module; call it with params= or monkeypatch the "
            "original torch.nn.Module instead."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")


def _resolve_device(device: DeviceLike) -> torch.device | None:
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch.device, a string such as 'cuda:0' or None, got {device!r}."
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available; pass device=None to "
            "keep the fast weights on the model's device."
        )
    return resolved


def _check_has_data(name: str, tensor: Tensor, device: torch.device | None) -> None:
    if tensor.is_meta and (device is None or device.type != "meta"):
        implied = f"device={device}" if device else "device=None keeps the model's device"
        raise ValueError(
            f"'{name}' of the model is on the meta device (no data) but the fast weights "
            f"need data ({implied}); materialize the model first (module.to_empty(...) "
            "and load its weights)."
        )


# ---------------------------------------------------------------------------------------------
# Building an fmodel: the weights, a copy of the structure, the slot table.
# ---------------------------------------------------------------------------------------------


def _build(
    module: nn.Module, initial: InitialFn, device: torch.device | None, track: bool
) -> tuple[FunctionalModule, list[Tensor]]:
    """Copy ``module``'s structure with ``initial(p)`` in every parameter slot.

    Returns the fmodel and ``list(module.parameters())`` (the originals of its fast weights,
    in order), read from the walk when ``module`` lists its parameters as ``nn.Module`` does."""
    _check_module(module)
    walk = _walk(module)
    warn_parameters_in_plain_containers(walk)
    memo: dict[int, Any] = {}
    originals: list[Tensor] = []
    occurrences = list(_occurrences(walk))
    for name, _, _, param in occurrences:
        if id(param) not in memo:
            _check_has_data(name, param, device)
            memo[id(param)] = initial(param)
            originals.append(param)
    for prefix, owner in walk:
        for key, buffer in owner._buffers.items():
            if buffer is not None and id(buffer) not in memo:
                _check_has_data(f"{prefix}.{key}" if prefix else key, buffer, device)
                memo[id(buffer)] = _to(buffer.detach(), device)
    private = _copy_structure(module, memo, walk)
    try:
        layout = _Layout(module, copies=memo, occurrences=occurrences)  # on the copy
        copies = [memo[id(submodule)] for _, submodule in walk]
    except KeyError:  # a class whose own __deepcopy__ bypasses the memo: walk the copy
        layout = _Layout(private)
        copies = list(private.modules())
    attends = any_may_attend(copies)
    fmodel = FunctionalModule._wrap(private, _Core(private, track, layout, attends))
    if not _lists_parameters_like_torch(walk):
        originals = list(module.parameters())
    return fmodel, originals


def _lists_parameters_like_torch(walk: list[tuple[str, nn.Module]]) -> bool:
    """Whether ``root.parameters()`` is ``nn.Module``'s walk, so that it lists the distinct
    parameters of ``_occurrences(walk)`` in order (``walk[0]`` is the root)."""
    root = type(walk[0][1])
    return (
        root.parameters is nn.Module.parameters
        and root.named_parameters is nn.Module.named_parameters
        and root._named_members is nn.Module._named_members
        and all(type(m).named_modules is nn.Module.named_modules for _, m in walk)
    )


def _monkeypatched(
    module: nn.Module, device: DeviceLike, copy_initial_weights: bool, track_higher_grads: bool
) -> tuple[FunctionalModule, list[Tensor]]:
    """:func:`monkeypatch`'s fmodel and ``module``'s parameters (see :func:`_build`)."""
    if not isinstance(copy_initial_weights, bool):
        raise TypeError(
            f"copy_initial_weights must be a bool, got {type(copy_initial_weights).__name__}."
        )
    if not isinstance(track_higher_grads, bool):
        raise TypeError(
            f"track_higher_grads must be a bool, got {type(track_higher_grads).__name__}."
        )
    target = _resolve_device(device)

    def initial(param: Tensor) -> Tensor:
        if copy_initial_weights:
            return _to(param.detach(), target).requires_grad_(param.requires_grad)
        return _to(param, target)

    return _build(module, initial, target, track_higher_grads)


# ---------------------------------------------------------------------------------------------
# The functions higher's users call.
# ---------------------------------------------------------------------------------------------


def monkeypatch(
    module: nn.Module,
    device: DeviceLike = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """Make a stateless version of ``module`` whose initial fast weights are its parameters.

    Args:
        module: any ``torch.nn.Module``; it is neither modified nor kept alive by the result.
        device: where the fast weights and private buffers live (``None``: the model's).
        copy_initial_weights: ``True`` makes the initial fast weights detached leaf copies
            (no gradient reaches ``module``); ``False`` keeps them differentiable copies of
            ``module.parameters()``, so an outer ``backward`` fills the model's ``.grad``
            (the MAML setting).
        track_higher_grads: keep every update (``True``) or only the latest (``False``).

    Returns:
        A :class:`FunctionalModule`; its buffers are private detached copies.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> fmodel = monkeypatch(model, copy_initial_weights=False)
        >>> fmodel(torch.ones(2, 3)).sum().backward()
        >>> model.weight.grad
        tensor([[2., 2., 2.]])
    """
    return _monkeypatched(module, device, copy_initial_weights, track_higher_grads)[0]


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
) -> FunctionalModule:
    """Make a stateless version of ``module`` without copying its weights.

    The initial fast weights are detached views of ``module``'s parameters (no copy, no
    gradient), so ``fmodel(x)`` runs the model's current weights; pass ``params=`` or call
    ``update_params`` to use others. (``higher`` left them empty and raised instead.)
    Buffers are private copies; :func:`buffer_sync` refreshes them.

    Args:
        module: any ``torch.nn.Module``.
        encapsulator: called as ``encapsulator(fmodel, module)`` before returning, as in
            ``higher`` (e.g. to set initial weights).

    Returns:
        A :class:`FunctionalModule` tracking higher gradients.

    Example:
        >>> import torch
        >>> from higher_func.patch import make_functional
        >>> model, x = torch.nn.Linear(2, 1), torch.ones(1, 2)
        >>> fmodel = make_functional(model)
        >>> weight = fmodel.fast_params[0]  # a detached view of model.weight: no copy
        >>> torch.equal(fmodel(x), model(x)), weight.data_ptr() == model.weight.data_ptr()
        (True, True)
    """
    fmodel, _ = _build(module, Tensor.detach, None, True)
    if encapsulator is not None:
        encapsulator(fmodel, module)
    return fmodel


def buffer_sync(module: nn.Module, fmodule: _StatelessBase, device: DeviceLike = None) -> None:
    """Copy ``module``'s buffers (detached) into ``fmodule``'s private buffers, by name.

    Args:
        module: the model the fmodel was made from (or one with the same structure).
        fmodule: a :class:`FunctionalModule` (or a submodule view).
        device: where to put the copies (``None``: the device of ``module``'s buffers).

    Raises:
        KeyError: ``module`` has a buffer that ``fmodule`` does not.

    Example:
        >>> import torch
        >>> from higher_func.patch import buffer_sync, monkeypatch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fmodel = monkeypatch(bn)
        >>> _ = bn(torch.ones(4, 2))  # updates bn's running statistics, not fmodel's
        >>> buffer_sync(bn, fmodel)
        >>> fmodel.running_mean, fmodel.num_batches_tracked
        (tensor([0.1000, 0.1000]), tensor(1))
    """
    if not isinstance(fmodule, _StatelessBase):
        raise TypeError(
            f"fmodule must be a functional module made by monkeypatch, got "
            f"{type(fmodule).__name__}."
        )
    target = _resolve_device(device)
    owners = dict(fmodule._sub.named_modules(remove_duplicate=False))
    copies: dict[int, Any] = {}
    for name, buffer in module.named_buffers(remove_duplicate=False):
        owner_name, _, key = name.rpartition(".")
        owner = owners.get(owner_name)
        if owner is None or key not in owner._buffers:
            raise KeyError(
                f"buffer '{name}' of module has no counterpart in fmodule; buffer_sync needs "
                "the model fmodule was made from (same structure)."
            )
        if id(buffer) not in copies:
            copies[id(buffer)] = _to(buffer.detach(), target)
        owner._buffers[key] = copies[id(buffer)]
