"""Copying a module's structure for an fmodel: ``copy.deepcopy`` without copying weights.

:func:`higher_func.patch.monkeypatch` pre-seeds the deep-copy memo with the fast weights and
private buffers, then copies the rest of the module once (:func:`_copy_structure`): the copy
then holds no reference to the original, no weight is copied twice, and the hooks the user
registered are shared with the copy rather than copied (:func:`_seed_hooks`).
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

__all__: list[str] = []  # private helpers of monkeypatch


def _walk(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule occurrence with its name (shared ones under each name), in order."""
    return list(module.named_modules(remove_duplicate=False))


#: ``(name, owner, key, tensor)``: one parameter slot ``owner._parameters[key]`` of a module.
Occurrence = tuple[str, nn.Module, str, Tensor]


def _occurrences(walk: list[tuple[str, nn.Module]]) -> Iterator[Occurrence]:
    """``(name, owner, key, tensor)`` for every parameter occurrence, in the order of
    ``module.named_parameters(remove_duplicate=False)`` (which walks the same way)."""
    for prefix, owner in walk:
        for key, tensor in owner._parameters.items():
            if tensor is not None:
                yield (f"{prefix}.{key}" if prefix else key), owner, key, tensor


def _check_hook(hook: Any, name: str) -> None:
    if isinstance(hook, WeightNorm | SpectralNorm):
        kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
        raise TypeError(
            f"submodule '{name}' uses the hook-based torch.nn.utils.{kind}, which recomputes "
            "its weight outside the parameters and cannot see fast weights. Use "
            f"torch.nn.utils.parametrizations.{kind} instead."
        )


def _seed_hooks(
    module: nn.Module, memo: dict[int, Any], walk: list[tuple[str, nn.Module]] | None = None
) -> None:
    """Make a deep copy share the user's hook callables instead of copying them.

    A hook is usually a closure or a ``functools.partial`` that writes into the user's own
    objects; a copy of those would record into a copy nobody reads.  Bound methods of the
    module's own submodules are still copied, so they bind to the copied submodule.
    """
    named = walk or _walk(module)
    own: set[int] | None = None
    for name, submodule in named:
        for attribute, hooks in submodule.__dict__.items():
            if not hooks or "hook" not in attribute or not isinstance(hooks, dict):
                continue  # most modules have only empty hook dicts
            for hook in hooks.values():
                _check_hook(hook, name or type(module).__name__)
                if isinstance(hook, types.MethodType):
                    if own is None:
                        own = {id(m) for _, m in named}
                    if id(hook.__self__) in own:
                        continue  # bound to a copied submodule: copied with it
                memo.setdefault(id(hook), hook)


#: Values a deep copy shares (immutable).
_ATOMIC = frozenset(
    {type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, type}
)
_EMPTY_COPIES = frozenset({dict, OrderedDict, set, list})
_TENSOR_DICTS = frozenset({"_parameters", "_buffers"})


def _copies_like_deepcopy(cls: type) -> bool:
    """Whether ``copy.deepcopy`` would copy an instance of ``cls`` field by field."""
    return (
        cls.__getstate__ is nn.Module.__getstate__
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and not hasattr(cls, "__deepcopy__")
    )


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, faster for the fields every module has.

    The result equals a deep copy: parameters and buffers come from ``memo`` (pre-seeded),
    immutable values are shared, anything else is deep-copied. Hook dicts are rebuilt
    entry by entry so the hooks seeded in ``memo`` are shared. Classes that customise
    copying or pickling go through ``copy.deepcopy`` itself.
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _copies_like_deepcopy(cls):
        return copy.deepcopy(module, memo)
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    state = module.__dict__.copy()  # immutable values stay shared; the loop replaces the rest
    state.pop("_compiled_call_impl", None)  # torch.compile's wrapper is not copied
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC or key == "_compiled_call_impl":
            continue
        if not value and kind in _EMPTY_COPIES:
            state[key] = kind()  # most hook dicts: an empty container, copied cheaply
        elif key == "_modules":
            state[key] = kind(
                {
                    name: None if child is None else _copy_module(child, memo)
                    for name, child in value.items()
                }
            )
        elif isinstance(value, dict) and (key in _TENSOR_DICTS or "hook" in key):
            state[key] = kind({k: _copy_entry(v, memo) for k, v in value.items()})
        else:
            state[key] = copy.deepcopy(value, memo)
    if cls.__setstate__ is nn.Module.__setstate__:
        clone.__dict__.update(state)  # what Module.__setstate__ does for a complete state
    else:
        clone.__setstate__(state)
    return clone


def _copy_entry(value: Any, memo: dict[int, Any]) -> Any:
    """A parameter, buffer or hook: its pre-seeded copy, else a deep copy."""
    seeded = memo.get(id(value), memo)
    return copy.deepcopy(value, memo) if seeded is memo else seeded


def _copy_structure(
    module: nn.Module, memo: dict[int, Any], walk: list[tuple[str, nn.Module]]
) -> nn.Module:
    _seed_hooks(module, memo, walk)
    try:
        return _copy_module(module, memo)
    except Exception as error:
        raise TypeError(
            f"monkeypatch copies the structure of {type(module).__name__} with copy.deepcopy "
            f"(its parameters and buffers excepted) and that failed: {error}. Make the module's "
            "non-tensor attributes deep-copyable."
        ) from error


def _to(tensor: Tensor, device: torch.device | None) -> Tensor:
    return tensor.clone() if device is None else tensor.to(device, copy=True)


def _snapshot(tensor: Tensor) -> Tensor:
    copied = tensor.detach().clone()
    return copied.requires_grad_(tensor.requires_grad) if copied.is_floating_point() else copied
