"""Module-level names of ``higher`` 0.2.1 that public code imports, with ``higher``'s behaviour.

Custom optimizers written for ``higher`` copy its ``DifferentiableSGD`` and import its private
helpers (``from higher.optim import _add, _GroupedGradsType``); type hints name its private
types (``higher.patch._MonkeyPatchBase``).  Everything here exists only so that such code
runs unchanged under ``import higher_func as higher``: new code should not use it.  The
public modules re-export these names (``higher_func.optim``, ``.patch``, ``.utils``).

Not provided: ``higher.patch``'s machinery for building subclasses at run time
(``_make_functional``, ``_update_patched_params``, ``_patched_parameters``,
``_ParameterPlaceholder``, ``_modify_internally``, ``_internal_attrs``), which higher_func
replaces by a slot swap and which no program needs to call.
"""

from __future__ import annotations

import typing
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []  # nothing here is public API: see the module docstring

# --------------------------------------------------------------------------- higher.optim types
# For compatibility with higher: the type aliases of higher.optim, as higher spelled them.

_GroupedGradsType = list[list[Tensor]]
_StateType = list[defaultdict[int, Any]]
_GradClosureType = Callable[[Tensor], Tensor]
_OverrideType = dict[str, list[Any]]
_GradCallbackType = Callable[[list[Tensor]], list[Tensor]]
_OptMappingType = dict[type, type]

# --------------------------------------------------------------------------- higher.patch types
# For compatibility with higher: the type aliases of higher.patch.

_BufferType = dict[str, Tensor | None]
_EncapsulatorType = Callable[[Any, torch.nn.Module], None] | None

# --------------------------------------------------------------------------- higher.utils types
# For compatibility with higher: the type variables of higher.utils.

_T = typing.TypeVar("_T")
_U = typing.TypeVar("_U")

# --------------------------------------------------------------------------- higher.optim helpers
# For compatibility with higher: the out-of-place versions of torch's deprecated
# ``add(value, other)`` / ``addcdiv(value, t1, t2)`` / ``addcmul(value, t1, t2)`` calling
# conventions that higher's optimizers (and their public copies) are written with.  Each
# computes exactly what higher's did (same operations, same order, so the same float32
# rounding).


def _add(tensor: Tensor, a1: float | Tensor, a2: Tensor | None = None) -> Tensor:
    """``tensor + a1`` or, with ``a2``, ``tensor + a1 * a2`` (higher's ``_add``).

    Example:
        >>> _add(torch.ones(2), -0.5, torch.tensor([2.0, 4.0]))
        tensor([ 0., -1.])
    """
    if a2 is None:
        return tensor + (1.0 * a1)
    return tensor + (a1 * a2)


def _addcdiv(tensor: Tensor, a1: float | Tensor, a2: Tensor, a3: Tensor | None = None) -> Tensor:
    """``tensor + a1 / a2`` or, with ``a3``, ``tensor + a1 * (a2 / a3)`` (higher's ``_addcdiv``).

    Example:
        >>> _addcdiv(torch.ones(2), 2.0, torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0]))
        tensor([1.5000, 2.0000])
    """
    if a3 is None:
        return tensor + 1.0 * (a1 / a2)
    return tensor + a1 * (a2 / a3)


def _addcmul(tensor: Tensor, a1: float | Tensor, a2: Tensor, a3: Tensor | None = None) -> Tensor:
    """``tensor + a1 * a2`` or, with ``a3``, ``tensor + a1 * a2 * a3`` (higher's ``_addcmul``).

    Example:
        >>> _addcmul(torch.zeros(2), 0.5, torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))
        tensor([1., 2.])
    """
    if a3 is None:
        return tensor + (1.0 * a1 * a2)
    return tensor + (a1 * a2 * a3)


def _get_mask_closure(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """A gradient hook zeroing the gradient where ``mask`` is true, at every order
    (higher's ``_get_mask_closure``)."""

    def closure(grad: Tensor) -> Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:
            grad.register_hook(_get_mask_closure(mask))
        return grad

    return closure


def _maybe_mask(tensor: Tensor, mask: Tensor) -> None:
    """Zero the gradients flowing into ``tensor`` where ``mask`` is true (higher's
    ``_maybe_mask``, used before a ``sqrt`` whose input may be 0).

    Example:
        >>> v = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> s = v * 1.0
        >>> _maybe_mask(s, s == 0)
        >>> s.sqrt().sum().backward()
        >>> v.grad
        tensor([0.0000, 0.2500])
    """
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))


_CONTAINERS = (list, tuple, dict, set)


def _recursive_apply(replacement: Any, target: Any) -> Any:
    """``target`` with the values of ``replacement`` written in, keeping ``target``'s types
    (higher's ``_recursive_apply``, behind its ``apply_trainable_opt_params``): a number
    takes the tensor's ``item()``, a tensor takes the replacement's data in place.

    Example:
        >>> _recursive_apply((torch.tensor(0.5), torch.tensor(0.25)), (0.9, 0.999))
        (0.5, 0.25)
    """
    if not isinstance(replacement, type(target)):
        if isinstance(replacement, Tensor) and not isinstance(target, _CONTAINERS):
            return type(target)(replacement.item())
        raise ValueError(
            f"Expected an non-container type for target, but got {type(target)} with value {target}"
        )
    if isinstance(replacement, Tensor) and isinstance(target, Tensor):
        target.data = replacement.to(target.device).data  # higher's in-place data swap
        return target
    if isinstance(target, list | tuple):
        return type(target)(
            [_recursive_apply(r, t) for r, t in zip(replacement, target, strict=False)]
        )
    if isinstance(replacement, dict) and isinstance(target, dict):
        return type(target)(
            {
                k: _recursive_apply(r, t)
                for (_, r), (k, t) in zip(replacement.items(), target.items(), strict=False)
            }
        )
    if isinstance(target, set):
        return type(target)(
            {_recursive_apply(r, t) for r, t in zip(replacement, target, strict=False)}
        )
    raise ValueError(
        f"Couldn't apply replacement of type {type(replacement)} to target of type {type(target)}"
    )
