"""The flat-group engine: a parameter group stepped as one flat tensor.

The planner (:func:`higher_func._execution.plan`) decides when a group runs flat; this
module carries it out.  While autograd records the steps, a group of same-dtype,
same-device dense parameters whose rule is elementwise is stepped as one flat tensor: one
autograd node per line of the rule instead of one per line and parameter, so both the step
and the outer ``backward`` through it run a few large kernels rather than many tiny ones.
The values are those of the per-parameter step: every element sees the same arithmetic.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeGuard

import torch
from torch import Tensor

from ._dropin_checks import detached
from ._execution import Plan
from ._rules._core import Rule
from ._rules._protocol import UpdateRule


class _FlatState(NamedTuple):
    """A group's optimizer state kept over one flat tensor, with the fast weights it made.

    The group's new fast weights are views (``views``) of the new flat weights
    (``params``); a later step that finds them unchanged in the fmodel steps ``params``
    directly, with the gradient autograd assembles for it in the same backward pass, so
    nothing is concatenated again.  A state imported from ``torch.optim`` (or kept per
    parameter by an earlier step) is flattened at its first flat step, without weights to
    reuse (``params`` and ``views`` are ``None``).  ``state`` is the rule's state of the
    one-tensor list ``[flat weights]``: each field a list of one tensor.
    """

    state: Any
    params: Tensor | None
    views: tuple[Tensor, ...] | None


def as_flat_state(state: Any, params: list[Tensor]) -> _FlatState | None:
    """``state`` as a flat state, or ``None`` when it is missing or cannot be flattened.

    A per-parameter state flattens when its fields are either shaped like the parameters
    (per element) or 0-d and equal across the group (step counts; compared on the CPU
    only, since reading accelerator values would synchronise).  A group of 0-d
    parameters only stays per parameter: there both kinds of field look alike.
    """
    if state is None or isinstance(state, _FlatState):
        return state
    if all(p.dim() == 0 for p in params):
        return None
    fields = {}
    for field in state._fields:
        tensors = getattr(state, field)
        if tensors is None:
            continue
        first = tensors[0]
        if all(
            t.shape == p.shape and t.dtype == first.dtype and t.device == first.device
            for t, p in zip(tensors, params, strict=True)
        ):
            fields[field] = [torch.cat([_flattened(t) for t in tensors])]
        elif all(t.dim() == 0 for t in tensors):
            if first.device.type != "cpu" or not all(torch.equal(t, first) for t in tensors):
                return None
            fields[field] = [first]
        else:
            return None
    return _FlatState(state._replace(**fields), None, None)


def reusable(state: Any, params: Sequence[Tensor]) -> TypeGuard[_FlatState]:
    """Whether ``params`` are still the views a flat group's last step cut."""
    return (
        isinstance(state, _FlatState)
        and state.views is not None
        and len(state.views) == len(params)
        and all(map(operator.is_, params, state.views))  # map: no Python call per tensor
    )


def reusable_weights(
    states: Sequence[Any], params: Sequence[Tensor], groups: Sequence[Sequence[int]]
) -> dict[int, Tensor]:
    """``{group: flat weights}`` for the flat groups whose views are still the fast weights
    ``params``: differentiated with them, their gradient needs no concatenation."""
    weights = {}
    for i, (state, indices) in enumerate(zip(states, groups, strict=True)):
        if not isinstance(state, _FlatState):
            continue  # a group stepped per tensor: no list to gather
        if reusable(state, [params[k] for k in indices]) and state.params is not None:
            weights[i] = state.params
    return weights


def flat_step(
    rule: UpdateRule,
    state: _FlatState | None,
    params: list[Tensor],
    grads: Sequence[Tensor | None],
    flat_grad: Tensor | None,
) -> tuple[list[Tensor], _FlatState]:
    """A group's step on one flat tensor: its new fast weights (views of the new flat
    weights) and its new flat state.  ``flat_grad``: the gradient of the reused flat
    weights, if autograd assembled it."""
    if reusable(state, params):
        flat = state.params  # the fast weights are still the views cut at the last step
    else:
        flat, flat_grad = torch.cat([_flattened(p) for p in params]), None
    if flat_grad is None:
        flat_grad = torch.cat([_flattened(g) for g in grads if g is not None])  # none is None
    assert flat is not None
    rule_state = state.state if state is not None else rule.init([flat])
    if isinstance(rule, Rule):  # the plan is made: one tensor runs per tensor
        new, new_state = rule.step_list([flat], [flat_grad], rule_state, Plan.PER_TENSOR)
    else:  # a rule of one's own (the UpdateRule protocol)
        new, new_state = rule.step([flat], [flat_grad], rule_state)
    new_flat = new[0]
    chunks = torch.split_with_sizes(new_flat, [p.numel() for p in params])
    pairs = zip(chunks, params, strict=True)
    views = [c if c.shape == p.shape else c.view(p.shape) for c, p in pairs]
    return views, _FlatState(new_state, new_flat, tuple(views))


def unflattened(state: Any) -> Any:
    """A group's state per parameter (a list per field, in group order), from a flat one."""
    if not isinstance(state, _FlatState):
        return state
    views = state.views
    assert views is not None, "a stored flat state always has its views"
    sizes = [v.numel() for v in views]

    def column(field: list[Tensor] | None) -> list[Tensor] | None:
        if field is None:
            return None
        flat = field[0]
        if flat.dim() == 0:  # a per-parameter scalar (the step count): the same for all
            return [flat] * len(views)
        chunks = flat.split(sizes)
        return [_shaped(c, v.shape) for c, v in zip(chunks, views, strict=True)]

    rule_state = state.state
    return rule_state._replace(**{f: column(getattr(rule_state, f)) for f in rule_state._fields})


def detached_state(state: Any) -> Any:
    """A group's state (flat or per parameter) with its graph cut."""
    if isinstance(state, _FlatState):
        # The views stay: while the fmodel still holds them, a later step reuses their
        # flat weights (only the optimizer state is cut, as for a per-parameter state).
        return state._replace(state=detached(state.state))
    return detached(state) if state is not None else None


def _flattened(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.reshape(-1)  # a 1-d tensor as is: no autograd node


def _shaped(chunk: Tensor, shape: torch.Size) -> Tensor:
    return chunk if chunk.shape == shape else chunk.view(shape)
