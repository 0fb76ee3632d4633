"""The one converter between ``torch.optim`` state and the rules' state, both directions.

* import: a live optimizer's per-parameter state dicts become a rule's state
  (:func:`import_state`, :func:`imported_group_state`), or, for a ``higher``-style class of
  one's own, a detached copy in ``higher``'s layout (:func:`copied_torch_state`);
* view: a rule's state read as ``torch.optim``'s ``{position: {key: tensor}}``
  (:func:`torch_style_state`, what ``diffopt.state`` shows);
* write-back: that view written into the torch optimizer in torch's own conventions of
  dtype and device (:func:`write_state`, behind :func:`higher_func.write_back_optimizer`).
"""

from __future__ import annotations

import collections
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ._rules._core import _assemble_state
from ._rules._protocol import UpdateRule, spec_of
from ._rules._sgd import SGDState

#: Options torch reads from ``optimizer.defaults``, never from the group, when it creates
#: a parameter's state: Adagrad seeds every accumulator from its constructor argument, also
#: in a group added by ``add_param_group(..., initial_accumulator_value=...)``.
SEEDED_FROM_DEFAULTS: dict[type, tuple[str, ...]] = {
    torch.optim.Adagrad: ("initial_accumulator_value",)
}

#: Fields a rule keeps that ``torch.optim`` does not (SGD counts steps to seed its buffer).
_RULE_ONLY_FIELDS: dict[type, frozenset[str]] = {SGDState: frozenset({"step"})}

#: ``torch.optim`` state entries that torch keeps as 0-d "scalar" tensors (on the CPU unless
#: the group is ``capturable`` or ``fused``), whatever the parameter's dtype.
_SCALAR_STATE_KEYS = frozenset({"step", "eta", "mu", "mu_product"})

TorchStateView = Sequence[Mapping[int, Mapping[str, Any]]]


def seeds_from_defaults(other: torch.optim.Optimizer) -> dict[str, Any]:
    """The values every group of the diffopt takes from ``other.defaults`` (as torch does)."""
    for klass, keys in SEEDED_FROM_DEFAULTS.items():
        if isinstance(other, klass):
            return {k: other.defaults[k] for k in keys if k in other.defaults}
    return {}


# --------------------------------------------------------------------------- import


class DeferredImport(NamedTuple):
    """What importing a group's torch state needs (its rule may be built only at the first
    step): the torch group, ``{reference index: torch state dict}`` and the parameters."""

    torch_group: Mapping[str, Any]
    torch_states: dict[int, Mapping[str, Any]]
    params: dict[int, Tensor]

    def copied(self) -> DeferredImport:
        """A copy that later changes to the torch optimizer cannot reach."""
        return self._replace(
            torch_group=dict(self.torch_group),
            torch_states={k: copy_to(v, None) for k, v in self.torch_states.items()},
        )


def import_state(
    rule: UpdateRule, params: dict[Any, Tensor], torch_states: Mapping[Any, Mapping[str, Any]]
) -> Any:
    """The rule's state for ``params`` from ``torch.optim`` per-parameter state dicts.

    ``torch_states`` maps each key of ``params`` to its ``optimizer.state[p]`` (empty where
    the optimizer has not stepped that parameter yet).
    """
    if not any(torch_states.values()):
        return rule.init(params)
    spec = spec_of(rule)
    if spec is None:
        raise TypeError(
            f"{rule!r} is not built from a RuleSpec, so torch.optim state cannot be imported "
            f"into it. Use a fresh optimizer, or build the rule with higher_func.optim.make_rule."
        )
    treespec: Any = optree.tree_structure(params, none_is_leaf=True)  # type: ignore[arg-type]
    names: list[Any] = treespec.flatten_up_to({name: name for name in params})
    per_leaf = []
    for name in names:
        p, torch_state = params[name], torch_states.get(name, {})
        fresh = spec.init(p.detach(), rule.hyperparameters)
        if spec.import_state is not None:
            entry = spec.import_state(torch_state, fresh)
        else:
            entry = {k: torch_state.get(k, v) for k, v in fresh.items()}
        per_leaf.append({k: _detached_like(v, fresh[k]) for k, v in entry.items()})
    return _assemble_state(spec.state_type, spec.fields(rule.hyperparameters), per_leaf, treespec)


def imported_group_state(rule: UpdateRule, deferred: DeferredImport, device: Any) -> Any:
    """A drop-in group's rule state (a list per field, in group order) from torch's, on
    ``device``; ``None`` where torch has none yet (it is built at the first step, as torch
    does)."""
    # A state torch filled when built (Adagrad's) is imported for parity, unless an option
    # read at initialisation was overridden: then it must come from the override.
    keep = _stepped_state if _init_option_overridden(rule, deferred.torch_group) else dict
    torch_states = {k: keep(v) for k, v in deferred.torch_states.items()}
    if not any(torch_states.values()):
        return None
    state = import_state(rule, deferred.params, torch_states)
    return _move_state(_positional(state, list(deferred.params)), device)


def copied_torch_state(
    other: torch.optim.Optimizer, device: Any
) -> list[collections.defaultdict[int, dict[str, Any]]]:
    """``other``'s state in ``higher``'s layout: per group, ``{position: {key: value}}``,
    detached copies on ``device`` (what a ``higher``-style class reads as ``self.state``)."""
    state = []
    for group in other.param_groups:
        group_state: collections.defaultdict[int, dict[str, Any]] = collections.defaultdict(dict)
        for position, p in enumerate(group["params"]):
            if p in other.state:
                group_state[position] = {
                    key: copy_to(value, device) for key, value in other.state[p].items()
                }
        state.append(group_state)
    return state


def _init_option_overridden(rule: UpdateRule, torch_group: Mapping[str, Any]) -> bool:
    """Whether the rule's value of an option read only by ``init`` differs from torch's."""
    spec = spec_of(rule)
    init_only = spec.init_only if spec is not None else frozenset()
    return any(rule.hyperparameters[k] is not torch_group.get(k) for k in init_only)


def _stepped_state(torch_state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A torch state entry, or ``{}`` if it was never stepped."""
    step = torch_state.get("step")
    if isinstance(step, Tensor | numbers.Real) and float(step) == 0:
        return {}
    return torch_state


def _positional(state: Any, indices: list[int]) -> Any:
    """A state keyed by parameter index as one in group order (a list per field)."""
    return state._replace(
        **{
            f: [getattr(state, f)[k] for k in indices]
            for f in state._fields
            if getattr(state, f) is not None
        }
    )


def _detached_like(value: Any, reference: Tensor) -> Tensor:
    value = torch.as_tensor(value)
    return value.detach().to(device=reference.device, dtype=reference.dtype).clone()


def _move_state(state: Any, device: Any) -> Any:
    if device is None:
        return state
    return optree.tree_map(lambda t: t.to(device), state)


def copy_to(value: Any, device: Any) -> Any:
    """``value`` with every tensor a detached copy (moved to ``device`` if given)."""

    def leaf(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        x = x.detach().clone()
        return x if device is None else x.to(device)

    return optree.tree_map(leaf, value)


# --------------------------------------------------------------------------- view


def torch_style_state(state: Any) -> dict[int, dict[str, Tensor]]:
    """A group's rule state (a list per field, in group order) as ``torch.optim`` keeps it:
    ``{position: {key: tensor}}`` for the parameters stepped so far."""
    hidden = _RULE_ONLY_FIELDS.get(type(state), frozenset())
    columns = {f: getattr(state, f) for f in state._fields if getattr(state, f) is not None}
    steps = columns.get("step")
    view = {}
    for position in range(len(next(iter(columns.values()), []))):
        if steps is not None and not bool(steps[position] != 0):
            continue  # never updated: torch would have no state for it
        view[position] = {f: c[position] for f, c in columns.items() if f not in hidden}
    return view


# --------------------------------------------------------------------------- write-back


def write_state(
    view: TorchStateView, group_sizes: Sequence[int], opt: torch.optim.Optimizer
) -> None:
    """Write a torch-style state ``view`` (a diffopt's ``state``, over groups of
    ``group_sizes`` parameters) into ``opt``, entry by entry, as detached copies."""
    sizes = [len(g["params"]) for g in opt.param_groups]
    if sizes != list(group_sizes):
        raise ValueError(
            f"opt has parameter groups of sizes {sizes} but diffopt has {list(group_sizes)}: "
            f"write back into the torch optimizer diffopt was built from."
        )
    for group, group_state in zip(opt.param_groups, view, strict=True):
        for position, p in enumerate(group["params"]):
            entry = group_state.get(position)
            if entry:
                old = opt.state.get(p, {})
                opt.state[p] = {
                    key: _torch_state_value(key, value, p, old.get(key), group)
                    for key, value in entry.items()
                }


def _torch_state_value(key: str, value: Any, param: Tensor, old: Any, group: Any) -> Any:
    if not isinstance(value, Tensor):
        return value
    value = value.detach()
    if isinstance(old, Tensor):
        return value.to(device=old.device, dtype=old.dtype, copy=True)
    if key in _SCALAR_STATE_KEYS and value.dim() == 0:
        on_device = group.get("capturable") or group.get("fused")
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        return value.to(device=param.device if on_device else "cpu", dtype=dtype, copy=True)
    return value.to(device=param.device, dtype=param.dtype, copy=True)
