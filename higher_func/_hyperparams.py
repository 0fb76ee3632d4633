"""Hyperparameters of the differentiable optimizers: overrides, schedules, the snapshot of a
torch optimizer's group options, and ``higher``'s trainable-hyperparameter helpers.

An *override* is ``{name: [value]}`` (every group) or ``{name: [v0, v1, ...]}`` (one value
per group); a *schedule* is ``{name: fn}`` or ``{name: [fn0, fn1, ...]}`` whose functions
of the step count give the override of each step.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from ._rules._core import IMPLEMENTATION_FLAGS
from ._rules._registry import _BOOKKEEPING_KEYS, is_immutable

__all__ = ["apply_trainable_opt_params", "get_trainable_opt_params"]

Override = Mapping[str, Sequence[Any]]
Schedule = Mapping[str, Callable[[int], Any] | Sequence[Callable[[int], Any]]]


def snapshot_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's options; tensors not requiring grad are cloned, so that a scheduler
    updating the torch optimizer in place cannot corrupt the graph of earlier steps."""

    def leaf(x: Any) -> Any:
        return x.detach().clone() if isinstance(x, Tensor) and not x.requires_grad else x

    return {
        k: v if is_immutable(v) else optree.tree_map(leaf, v)
        for k, v in group.items()
        if k != "params"
    }


def checked_override(override: Any) -> Mapping[str, Any]:
    """``override`` if it is a dict, else a ``TypeError`` saying what it must be."""
    if not isinstance(override, Mapping):
        raise TypeError(
            f"override must be a dict {{name: [value]}} or {{name: [v0, v1, ...]}} (one "
            f"value per parameter group), got {type(override).__name__}."
        )
    return override


def override_values(key: str, values: Any, num_groups: int) -> list[Any]:
    """One value per group from an override's ``[value]`` or ``[v0, v1, ...]``."""
    if isinstance(values, str | bytes | Mapping | Tensor) or not isinstance(values, Sequence):
        raise TypeError(
            f"override[{key!r}] must be a list of values, one for all groups or one per group, "
            f"got {type(values).__name__}. Wrap it: {{{key!r}: [value]}}."
        )
    if len(values) == 1:
        return [values[0]] * num_groups
    if len(values) != num_groups:
        raise ValueError(
            f"override[{key!r}] has {len(values)} values but the optimizer has {num_groups} "
            f"parameter group(s). Give one value for all groups ([v]) or one per group."
        )
    return list(values)


def checked_schedule(schedule: Schedule | None, num_groups: int) -> dict[str, list[Callable]]:
    """``{name: [fn per group]}`` from a schedule, its values checked."""
    if schedule is None:
        return {}
    if not isinstance(schedule, Mapping):
        raise TypeError(
            f"schedule must be a dict {{name: fn}} or {{name: [fn per group]}}, got "
            f"{type(schedule).__name__}."
        )
    result = {}
    for key, fns in schedule.items():
        fn_list = override_values(key, [fns] if callable(fns) else fns, num_groups)
        for fn in fn_list:
            if not callable(fn):
                raise TypeError(
                    f"schedule[{key!r}] must be a callable of the step count (or a list of "
                    f"them, one per group), got {type(fn).__name__}."
                )
        result[key] = fn_list
    return result


#: Option names of each rule factory (building a rule to read them costs a validation).
_OPTION_NAMES: weakref.WeakKeyDictionary[Callable[..., Any], frozenset[str]] = (
    weakref.WeakKeyDictionary()
)


def option_names(factory: Callable[..., Any]) -> frozenset[str]:
    """The hyperparameter names of the rules ``factory`` builds."""
    names = _OPTION_NAMES.get(factory)
    if names is None:
        names = _OPTION_NAMES[factory] = frozenset(factory().hyperparameters)
    return names


def check_options_supported(other: torch.optim.Optimizer, supported: frozenset[str]) -> None:
    """Raise if ``other`` has an option that no rule implements (it would be ignored)."""
    unsupported = set(other.defaults) - supported - IMPLEMENTATION_FLAGS
    if unsupported:
        raise ValueError(
            f"{type(other).__name__} option(s) {sorted(unsupported)} have no differentiable "
            f"implementation here (supported: {sorted(supported)}); they would be ignored. "
            f"Register a rule that implements them with higher_func.optim.register_rule."
        )


# --------------------------------------------------------------------------- learnable options


def get_trainable_opt_params(
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, list[Any]]:
    """An override dict with a tensor requiring grad for every numeric hyperparameter.

    Numbers (and tuples of numbers, e.g. ``betas``) become tensors requiring grad, one entry
    per parameter group; tensors are cloned.  Boolean options (``amsgrad``, ``nesterov``,
    ``maximize``, ...), ``None`` and scheduler bookkeeping (``initial_lr``) are left out:
    they are not meta-learnable.

    Args:
        opt: the optimizer.
        device: where to put the tensors (default: the default device).
        dtype: their dtype (default: ``torch.get_default_dtype()``).

    Returns:
        ``{name: [value for each group]}``, usable as ``override=``.

    Example:
        >>> import torch, higher_func as hf
        >>> opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1, amsgrad=True)
        >>> sorted(hf.optim.get_trainable_opt_params(opt))
        ['betas', 'eps', 'lr', 'weight_decay']
    """
    override: dict[str, list[Any]] = {}
    excluded = _BOOKKEEPING_KEYS | IMPLEMENTATION_FLAGS
    for group in opt.param_groups:
        for key, value in group.items():
            if key not in excluded and _is_numeric_tree(value):
                override.setdefault(key, []).append(_trainable(value, device, dtype))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Override) -> None:
    """Write learned hyperparameters (an override dict) back into ``opt``'s groups, detached.

    Each value takes the type of the entry it replaces (a float stays a float, a tuple a
    tuple, a tensor is updated in place).

    Example:
        >>> import torch, higher_func as hf
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> hf.optim.apply_trainable_opt_params(opt, {"lr": [torch.tensor(0.25)]})
        >>> opt.param_groups[0]["lr"]
        0.25
    """
    if not isinstance(override, Mapping):
        raise TypeError(
            f"override must be a dict {{name: [values]}}, got {type(override).__name__}."
        )
    for key, values in override.items():
        per_group = override_values(key, values, len(opt.param_groups))
        for index, (group, value) in enumerate(zip(opt.param_groups, per_group, strict=True)):
            if key not in group:
                raise ValueError(
                    f"override has key {key!r}, which opt.param_groups[{index}] does not have; "
                    f"its keys are {sorted(k for k in group if k != 'params')}."
                )
            group[key] = _assign_like(group[key], value, f"{key} (group {index})")


def _is_numeric_tree(value: Any) -> bool:
    leaves = optree.tree_leaves(value, none_is_leaf=True)
    return bool(leaves) and all(
        isinstance(x, Tensor) or (isinstance(x, numbers.Real) and not isinstance(x, bool))
        for x in leaves
    )


def _trainable(value: Any, device: Any, dtype: torch.dtype | None) -> Any:
    def leaf(x: Any) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().clone().to(device=device, dtype=dtype).requires_grad_()
        return torch.tensor(float(x), device=device, dtype=dtype, requires_grad=True)

    return optree.tree_map(leaf, value)


def _assign_like(target: Any, value: Any, where: str) -> Any:
    if isinstance(target, tuple | list):
        if not (isinstance(value, tuple | list) and len(value) == len(target)):
            raise ValueError(
                f"{where}: expected a sequence of {len(target)} values, got {value!r}."
            )
        return type(target)(_assign_like(t, v, where) for t, v in zip(target, value, strict=True))
    if isinstance(target, bool):
        raise TypeError(f"{where}: {target!r} is a Boolean option, not a learnable value.")
    if isinstance(target, Tensor):
        with torch.no_grad():
            target.copy_(torch.as_tensor(value))
        return target
    if isinstance(target, numbers.Real):
        number = value.detach().item() if isinstance(value, Tensor) else value
        return int(number) if isinstance(target, int) else float(number)
    raise TypeError(f"{where}: cannot write a learned value into {type(target).__name__}.")
