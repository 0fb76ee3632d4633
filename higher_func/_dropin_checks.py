"""Checks for the classic mistakes of the drop-in API (``innerloop_ctx``, ``monkeypatch``,
``diffopt.step``), each turned into a clear error or warning, and the detached copies of a
differentiable optimizer and of its state."""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import optree
from torch import Tensor, nn

from ._errors import grad_shape

#: ``diffopt.step(loss)`` where ``loss`` reaches none of the fast weights being stepped.
UNUSED_LOSS: Final = (
    "loss does not depend on any of the fast weights this step updates, so the step would "
    "change nothing. Was it computed from the original model (model(x)) instead of the "
    "functional one (fmodel(x))? Or from fmodel(x, params=new) without passing "
    "step(loss, params=new)? Compute the loss from the weights you step."
)

#: A module attribute that is a plain list, tuple or dict holding one of its parameters.
STALE_CONTAINER: Final = (
    "{owner}.{attribute} holds the parameter '{name}' in a plain Python {kind}. The fmodel "
    "swaps fast weights into the module's parameter slots only, so a forward that reads "
    "{owner}.{attribute} still sees the initial weight, not the updated one (the same "
    "limitation as higher and torch.func.functional_call). Hold it in an nn.ParameterList / "
    "nn.ParameterDict, or read it where it is registered (model.{name}) in forward."
)


def check_scalar_loss(loss: Tensor) -> None:
    """Raise unless ``loss`` is a one-element tensor (what ``autograd.grad`` needs)."""
    if loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar tensor (one element), got shape {tuple(loss.shape)}. "
            f"Reduce it first, e.g. diffopt.step(loss.mean()) or diffopt.step(loss.sum())."
        )


def check_some_gradient(grads: Sequence[Tensor | None]) -> None:
    """Raise :data:`UNUSED_LOSS` if autograd found no gradient at all."""
    for g in grads:  # a loop, not all(...): no Python call per gradient
        if g is not None:
            return
    raise ValueError(UNUSED_LOSS)


def check_like_params(
    argument: str, values: Sequence[Tensor | None], params: Sequence[Tensor]
) -> None:
    """Raise if a gradient is not a tensor shaped like its parameter (``None`` allowed)."""
    for k, (value, param) in enumerate(zip(values, params, strict=True)):
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{argument}[{k}] must be a torch.Tensor or None, got {type(value).__name__}."
            )
        if value.shape != param.shape:
            raise grad_shape(
                f"{argument}[{k}]", tuple(value.shape), f"params[{k}]", tuple(param.shape)
            )


def check_no_shared_parameter(group_to_param_list: Sequence[Sequence[int]]) -> None:
    """Raise if a parameter sits in two groups, or twice in one (``torch.optim`` would step
    it twice, once per occurrence; a differentiable step cannot reproduce that)."""
    seen: dict[int, tuple[int, int]] = {}
    for g, indices in enumerate(group_to_param_list):
        for position, k in enumerate(indices):
            if k in seen:
                first_group, first_position = seen[k]
                raise ValueError(
                    f"The optimizer's param_groups[{g}]['params'][{position}] is the same tensor "
                    f"as param_groups[{first_group}]['params'][{first_position}] (reference "
                    f"parameter {k}); torch.optim would update it twice per step. Keep every "
                    f"parameter in exactly one group."
                )
            seen[k] = (g, position)


#: The attributes every ``nn.Module`` has (its parameter, buffer, module and hook dicts).
_MODULE_FIELDS: Final = frozenset(nn.Module().__dict__)


def warn_parameters_in_plain_containers(walk: Iterable[tuple[str, nn.Module]]) -> None:
    """Warn (:data:`STALE_CONTAINER`) for each module attribute that is a plain list, tuple
    or dict holding one of the model's parameters: its fast weights would go stale."""
    walk = list(walk)
    names: dict[int, str] | None = None  # parameter names, made on the first container
    for prefix, owner in walk:
        fields = owner.__dict__
        # torch's own private lists are kept in sync by torch (RNNs' ``_flat_weights``).
        from_torch = type(owner).__module__.startswith("torch.")
        extra = [
            attribute
            for attribute in fields.keys() - _MODULE_FIELDS
            if isinstance(fields[attribute], list | tuple | dict)
            and not (from_torch and attribute.startswith("_"))
        ]
        if not extra:
            continue  # most modules: no container besides nn.Module's own
        if names is None:
            names = {
                id(tensor): (f"{p}.{key}" if p else key)
                for p, module in walk
                for key, tensor in module._parameters.items()
                if tensor is not None
            }
        for attribute in sorted(extra, key=list(fields).index):  # in attribute order
            value = fields[attribute]
            items = value.values() if isinstance(value, Mapping) else value
            for item in items:
                name = names.get(id(item)) if isinstance(item, nn.Parameter) else None
                if name is not None:
                    warnings.warn(
                        STALE_CONTAINER.format(
                            owner=f"model.{prefix}" if prefix else "model",
                            attribute=attribute,
                            name=name,
                            kind=type(value).__name__,
                        ),
                        UserWarning,
                        stacklevel=4,
                    )
                    break


# --------------------------------------------------------------------------- copying


def detached_deepcopy(obj: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of ``obj`` (copied through its ``__dict__``) in which every tensor is a
    detached copy with the same ``requires_grad`` (torch cannot deep-copy a tensor that
    carries a graph).  A tensor reached twice is copied once; modules (an fmodel) copy
    themselves, sharing ``memo``, so copying an fmodel and its optimizer together keeps
    them linked."""
    if id(obj) in memo:
        return memo[id(obj)]
    _seed(obj.__dict__, memo, set())
    cls: type = type(obj)
    clone: Any = object.__new__(cls)
    memo[id(obj)] = clone
    for key, value in obj.__dict__.items():
        object.__setattr__(clone, key, copy.deepcopy(value, memo))
    return clone


_OPAQUE = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, nn.Module)


def _seed(value: Any, memo: dict[int, Any], seen: set[int]) -> None:
    if id(value) in seen or id(value) in memo:
        return
    seen.add(id(value))
    if isinstance(value, Tensor):
        copied = value.detach().clone()
        memo[id(value)] = copied.requires_grad_(value.requires_grad and copied.is_floating_point())
    elif isinstance(value, Mapping):
        for item in value.values():
            _seed(item, memo, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            _seed(item, memo, seen)
    elif not isinstance(value, _OPAQUE):
        for item in getattr(value, "__dict__", {}).values():
            _seed(item, memo, seen)
        for slot in getattr(type(value), "__slots__", ()):
            _seed(getattr(value, slot, None), memo, seen)


def detached(tree: Any) -> Any:
    """``tree`` with every tensor detached (no graph is kept through it)."""
    return optree.tree_map(_detach_tensor, tree)


def _detach_tensor(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x
