"""Small helpers ``higher``'s users reach for: copies of parameters and nested containers.

``higher.utils`` exposed :func:`get_func_params` and :func:`flatten`; programs also called
its underscored helpers (``_copy_tensor``, ``_recursive_map``, ...), so those names exist
here too, as aliases of the public functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "copy_tensor",
    "find_param_in_list",
    "flatten",
    "get_func_params",
    "get_param_mapping",
    "is_container",
    "recursive_copy_and_cast",
    "recursive_detach",
    "recursive_map",
]

_CONTAINERS = (list, tuple, dict, set)


def copy_tensor(
    tensor: Tensor, safe_copy: bool = True, device: torch.device | str | None = None
) -> Tensor:
    """A detached leaf copy of ``tensor`` with the same ``requires_grad``.

    Args:
        tensor: the tensor to copy.
        safe_copy: ``True`` copies the data; ``False`` shares it (a detached view).
        device: where to put the copy (``None``: where ``tensor`` is).

    Returns:
        A leaf tensor (also when moved to another device, unlike ``higher``'s, which
        returned a non-leaf there).

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> c = copy_tensor(w)
        >>> c.is_leaf, c.requires_grad, c.data_ptr() != w.data_ptr()
        (True, True, True)
    """
    copied = tensor.detach()
    if device is not None:
        copied = copied.to(device)
    if safe_copy and copied.data_ptr() == tensor.data_ptr():
        copied = copied.clone()
    return copied.requires_grad_(tensor.requires_grad)


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached leaf copies of ``module.parameters()`` (same ``requires_grad``), in order.

    Args:
        module: the module whose parameters to copy (a tied parameter appears once).
        device: where to put the copies (``None``: where the parameters are).
        safe_copy: ``False`` shares the parameters' data instead of copying it.

    Returns:
        A list of tensors usable as ``params=`` of an fmodel.

    Example:
        >>> params = get_func_params(torch.nn.Linear(2, 1))
        >>> [tuple(p.shape) for p in params], all(p.is_leaf for p in params)
        ([(1, 2), (1,)], True)
    """
    return [copy_tensor(p, safe_copy, device) for p in module.parameters()]


def flatten(x: Any) -> list[Any]:
    """The leaves of nested lists, tuples, sets and dicts (dict values), depth first.

    Example:
        >>> flatten([1, (2, {"a": 3, "b": [4]}), {5}])
        [1, 2, 3, 4, 5]
    """
    if isinstance(x, dict):
        x = x.values()
    elif not isinstance(x, list | tuple | set):
        return [x]
    return [leaf for item in x for leaf in flatten(item)]


def is_container(x: Any) -> bool:
    """Whether ``x`` is a list, tuple, dict or set (what the recursive helpers descend into).

    Example:
        >>> is_container([1, 2]), is_container({"a": 1}), is_container(torch.ones(2))
        (True, True, False)
    """
    return isinstance(x, _CONTAINERS)


def recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """Apply ``map_fn`` to every leaf of nested lists, tuples, dicts and sets, keeping types.

    Example:
        >>> recursive_map({"a": [1, 2], "b": (3,)}, lambda v: v * 10)
        {'a': [10, 20], 'b': (30,)}
    """
    if isinstance(target, dict):
        return type(target)({k: recursive_map(v, map_fn) for k, v in target.items()})
    if isinstance(target, list | tuple | set):
        mapped = [recursive_map(item, map_fn) for item in target]
        if hasattr(target, "_fields"):  # a NamedTuple takes its fields positionally
            return type(target)(*mapped)
        return type(target)(mapped)
    return map_fn(target)


def recursive_detach(target: Any) -> Any:
    """``target`` with every tensor inside nested containers detached.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> detached = recursive_detach({"w": [w * 2], "step": 3})
        >>> detached["w"][0].requires_grad, detached["step"]
        (False, 3)
    """
    return recursive_map(target, lambda v: v.detach() if isinstance(v, Tensor) else v)


def recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """``target`` with every tensor replaced by :func:`copy_tensor` of it on ``device``.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> copied = recursive_copy_and_cast({"w": w, "names": ("w",)}, "cpu")
        >>> copied["w"].is_leaf, copied["w"].requires_grad, copied["w"] is w, copied["names"]
        (True, True, False, ('w',))
    """
    return recursive_map(
        target, lambda v: copy_tensor(v, True, device) if isinstance(v, Tensor) else v
    )


def find_param_in_list(param: Tensor, tensors: Iterable[Tensor]) -> int | None:
    """The index of the first element of ``tensors`` that *is* ``param``, else ``None``.

    Example:
        >>> a, b = torch.zeros(1), torch.zeros(1)
        >>> find_param_in_list(b, [a, b]), find_param_in_list(torch.zeros(1), [a, b])
        (1, None)
    """
    return next((i for i, t in enumerate(tensors) if t is param), None)


def get_param_mapping(
    module: nn.Module, seen: list[Tensor] | None = None, mapping: list[int] | None = None
) -> list[int]:
    """For every parameter occurrence (tied ones repeated), its index in ``module.parameters()``.

    ``seen`` and ``mapping`` are accumulators kept for ``higher``'s signature.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> get_param_mapping(torch.nn.Sequential(lin, lin))
        [0, 1, 0, 1]
    """
    seen = [] if seen is None else seen
    mapping = [] if mapping is None else mapping
    index_by_id = {id(t): i for i, t in enumerate(seen)}
    for _, param in module.named_parameters(remove_duplicate=False):
        index = index_by_id.setdefault(id(param), len(seen))
        if index == len(seen):
            seen.append(param)
        mapping.append(index)
    return mapping


# For compatibility with higher: its underscored names, which its users imported directly,
# and its type variables.
from ._compat import _T, _U  # noqa: E402, F401

_copy_tensor = copy_tensor
_find_param_in_list = find_param_in_list
_get_param_mapping = get_param_mapping
_is_container = is_container
_recursive_copy_and_cast = recursive_copy_and_cast
_recursive_detach = recursive_detach
_recursive_map = recursive_map
