"""Differentiable optimizers with ``higher``'s interface, built on the pure update rules.

A :class:`DifferentiableOptimizer` is the differentiable twin of a live ``torch.optim``
optimizer: ``diffopt.step(loss)`` differentiates ``loss`` with respect to the current fast
weights, runs the optimizer's update rule once per parameter group and returns (and records
in the functional module) the new fast weights.  The built-in classes
(:class:`DifferentiableSGD`, :class:`DifferentiableAdam`, ...) delegate the math to the pure
rules of :mod:`higher_func.optim`; a user class written for ``higher`` (a subclass
implementing ``_update(grouped_grads)``) keeps working unchanged.

What differs from ``higher`` on purpose:

* set-up copies no parameter (``higher`` deep-copied ``param_groups``, parameters included);
* with ``track_higher_grads=False`` parameters *and optimizer state* are detached after every
  step, and frozen parameters stay frozen;
* every ``torch.optim`` option is honoured (``maximize``, ``decoupled_weight_decay``, ...),
  and an option that no rule implements raises instead of being ignored;
* ``create_diff_optim`` accepts a list of parameter-group dicts;
* Boolean options are never turned into trainable tensors by
  :func:`get_trainable_opt_params`.
"""

from __future__ import annotations

import abc
import collections
import numbers
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeGuard

import optree
import torch
from torch import Tensor

from ._rules._core import IMPLEMENTATION_FLAGS
from ._rules._registry import (
    _BOOKKEEPING_KEYS,
    group_keys,
    import_state,
    rule_factory,
    supported_optimizers,
)
from ._rules._sgd import SGDState

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableRuleOptimizer",
    "DifferentiableSGD",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
]

Grads = Sequence[Tensor | None]
GradCallback = Callable[[tuple[Tensor | None, ...]], Iterable[Tensor | None]]
Override = Mapping[str, Sequence[Any]]
Schedule = Mapping[str, Callable[[int], Any] | Sequence[Callable[[int], Any]]]

#: Fields a rule keeps that ``torch.optim`` does not (SGD counts steps to seed its buffer).
_RULE_ONLY_FIELDS: dict[type, frozenset[str]] = {SGDState: frozenset({"step"})}


class DifferentiableOptimizer(abc.ABC):
    """The differentiable twin of a ``torch.optim`` optimizer (``higher``'s interface).

    Build one with :func:`get_diff_optim` (from a live optimizer), :func:`create_diff_optim`
    (from a class and its options) or :func:`higher_func.innerloop_ctx`.  Subclasses
    implement ``_update(grouped_grads, **kwargs)``: for each group ``i``, read the current
    parameters from ``self.param_groups[i]['params']``, their gradients from
    ``grouped_grads[i]`` (``None`` = leave unchanged), per-parameter state from
    ``self.state[i][j]``, and write the new parameters back into
    ``self.param_groups[i]['params'][j]``.  Nothing may be modified in place.

    Attributes:
        param_groups: one dict per group of the torch optimizer: its hyperparameters (a
            shallow copy; tensors not requiring grad are cloned, so a scheduler updating the
            torch optimizer in place cannot reach them; overrides replace entries) and
            ``'params'``, which holds the group's current fast weights during and after a step.
        state: per group, ``{position in group: {torch state key: tensor}}`` (for the
            built-in classes a read-only view of the rules' state).
        _group_to_param_list: per group, the indices of its parameters in
            ``reference_params`` (the order of ``fmodel.fast_params``).
        _fmodel: the functional module whose fast weights ``step`` reads and records.
        _track_higher_grads: whether steps keep the graph (see :attr:`track_higher_grads`).
        _grad_callback: the default ``grad_callback``.

    History semantics: every :meth:`step` records exactly one new entry in ``fmodel`` (its
    ``update_params``); with ``track_higher_grads=False`` the fmodel keeps only the latest.

    Example (a custom optimizer written for ``higher``):
        >>> import torch, higher_func as hf
        >>> class PlainSGD(torch.optim.SGD):
        ...     pass
        >>> class DifferentiablePlainSGD(hf.optim.DifferentiableOptimizer):
        ...     def _update(self, grouped_grads, **kwargs):
        ...         for group, grads in zip(self.param_groups, grouped_grads):
        ...             for j, (p, g) in enumerate(zip(group["params"], grads)):
        ...                 if g is not None:
        ...                     group["params"][j] = p - group["lr"] * g
        >>> hf.register_optim(PlainSGD, DifferentiablePlainSGD)
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> with hf.innerloop_ctx(model, PlainSGD(model.parameters(), lr=0.5)) as (fm, diffopt):
        ...     new = diffopt.step(fm(torch.ones(1, 1)).sum())
        >>> new[0]
        tensor([[0.5000]], grad_fn=<SubBackward0>)
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: torch.device | str | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        *,
        schedule: Schedule | None = None,
    ) -> None:
        """Mirror ``other``'s parameter groups and state over ``reference_params``.

        Args:
            other: the ``torch.optim`` optimizer to mirror; its state (momentum buffers,
                moments, step counts) is imported detached, and nothing is written back.
            reference_params: the parameters of the module ``other`` optimizes, in
                ``module.parameters()`` order (the order of ``fmodel.fast_params``).
            fmodel: the functional module whose fast weights ``step`` updates; without it,
                pass ``params=`` to every ``step``.
            device: where to move the imported optimizer state (default: where it is).
            override: ``{name: [value]}`` (all groups) or ``{name: [v0, v1, ...]}`` (one per
                group) replacing hyperparameters; tensors requiring grad receive
                hypergradients.  Persists for every later step.
            grad_callback: ``grads -> grads`` applied to the tuple of gradients (in
                ``reference_params`` order, ``None`` included) before every update.
            track_higher_grads: keep the graph through the steps (``False``: first-order /
                test mode; parameters and state are detached after every step).
            schedule: ``{name: fn}`` or ``{name: [fn0, fn1, ...]}``: before step ``t``
                (counted from 0), the hyperparameter ``name`` is set to ``fn(t)``, like an
                override given to that step.
        """
        _check_optimizer(other)
        reference = _checked_tensors("reference_params", reference_params)
        position = {id(t): k for k, t in enumerate(reference)}
        self._group_to_param_list = group_keys(other, position, "reference_params")
        self.param_groups: list[dict[str, Any]] = [
            {**_snapshot_hyperparameters(group), "params": [None] * len(group["params"])}
            for group in other.param_groups
        ]
        self._num_params = len(reference)
        self._fmodel = fmodel
        if fmodel is not None:
            _check_fmodel(fmodel, len(reference))
        self._device = device
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)
        self._step_count = 0
        self._first_order_anchor: list[Tensor] | None = None
        self._schedule = _checked_schedule(schedule, len(self.param_groups))
        if override is not None:
            self._apply_override(override)
        self._import_state(other, reference)

    # ------------------------------------------------------------------ public interface

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep the graph for higher-order gradients (settable)."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        self._track_higher_grads = bool(value)

    @property
    def step_count(self) -> int:
        """How many steps this optimizer has taken (what schedules are called with)."""
        return self._step_count

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One differentiable optimizer step: ``diffopt.step(loss)`` replaces
        ``opt.zero_grad(); loss.backward(); opt.step()``.

        Args:
            loss: a scalar tensor computed from the current fast weights.
            params: the fast weights to update, in ``reference_params`` order (default: the
                fmodel's latest).  Needed when the optimizer has no fmodel.
            override: like the constructor's; applies from this step on (and persists).
            grad_callback: replaces the constructor's callback for this step.
            **kwargs: passed to ``_update`` (for custom optimizers).

        Returns:
            The new fast weights (all of them, in ``reference_params`` order).  Parameters
            that do not require grad, or that ``loss`` does not use, are returned unchanged.
            They are also recorded in the fmodel (one history entry).
        """
        self._apply_schedule()
        if override is not None:
            self._apply_override(override)
        params = self._params_for_step(params)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        found = self._differentiate(loss, params, callback is None)
        grads: Sequence[Tensor | None] = found
        if callback is not None:
            grads = _checked_callback_grads(callback(found), len(params))
        grouped_grads = []
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            group["params"] = [params[k] for k in indices]
            grouped_grads.append([grads[k] for k in indices])
        self._update(grouped_grads, **kwargs)
        new_params = self._gather(params)
        if not self._track_higher_grads:
            self._detach_state()
        self._step_count += 1
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    @abc.abstractmethod
    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Write each group's new parameters into ``self.param_groups[i]['params']``."""

    def _differentiate(
        self, loss: Tensor, params: list[Tensor], exact: bool
    ) -> tuple[Tensor | None, ...]:
        """The gradients of ``loss`` for ``params`` (``exact``: no callback changes them)."""
        del exact
        return _gradients(loss, params, self._track_higher_grads)[0]

    # ------------------------------------------------------------------ overridable hooks

    def _import_state(self, other: torch.optim.Optimizer, reference: list[Tensor]) -> None:
        """``self.state[i][j]``: ``other``'s state of group ``i``'s ``j``-th parameter."""
        self.state: list[collections.defaultdict[int, dict[str, Any]]] = []
        for group in other.param_groups:
            group_state: collections.defaultdict[int, dict[str, Any]] = collections.defaultdict(
                dict
            )
            for position, p in enumerate(group["params"]):
                if p in other.state:
                    group_state[position] = {
                        key: _copy_to(value, self._device) for key, value in other.state[p].items()
                    }
            self.state.append(group_state)

    def _detach_state(self) -> None:
        """Cut the state's graph (first-order mode): nothing may grow across steps."""
        for group_state in self.state:
            for position, entry in group_state.items():
                group_state[position] = _detached(entry)

    def _check_override_key(self, key: str) -> None:
        """Raise if ``key`` cannot be overridden (any key is accepted for custom classes)."""
        del key

    # ------------------------------------------------------------------ internals

    def _apply_override(self, override: Override) -> None:
        if not isinstance(override, Mapping):
            raise TypeError(
                f"override must be a dict {{name: [value]}} or {{name: [v0, v1, ...]}} (one "
                f"value per parameter group), got {type(override).__name__}."
            )
        per_group = {}
        for key, values in override.items():
            self._check_override_key(key)
            per_group[key] = _override_values(key, values, len(self.param_groups))
        for key, values in per_group.items():
            for group, value in zip(self.param_groups, values, strict=True):
                group[key] = value

    def _apply_schedule(self) -> None:
        if self._schedule:
            values = {k: [fn(self._step_count) for fn in fns] for k, fns in self._schedule.items()}
            self._apply_override(values)

    def _params_for_step(self, params: Iterable[Tensor] | None) -> list[Tensor]:
        if params is None:
            if self._fmodel is None:
                raise ValueError(
                    "step() needs params= (the current fast weights, in reference_params "
                    "order) because this optimizer was built without an fmodel."
                )
            return list(self._fmodel.fast_params)  # checked by the fmodel when recorded
        result = _checked_tensors("params", params)
        if len(result) != self._num_params:
            raise ValueError(
                f"params has {len(result)} tensors but the optimizer was built over "
                f"{self._num_params} reference parameters. Pass every fast weight, in "
                f"model.parameters() order (fmodel.fast_params)."
            )
        return result

    def _gather(self, params: list[Tensor]) -> list[Tensor]:
        new_params = list(params)
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            finished = group["params"]
            if not self._track_higher_grads:
                finished = [
                    self._finish(params[k], new, k)
                    for k, new in zip(indices, finished, strict=True)
                ]
                group["params"] = finished
            for k, new in zip(indices, finished, strict=True):
                new_params[k] = new
        return new_params

    def _finish(self, old: Tensor, new: Tensor, index: int) -> Tensor:
        """The parameter recorded after an untracked step (detached, or first-order MAML's)."""
        if new is old:
            return new
        anchor = self._first_order_anchor
        if anchor is not None and old.requires_grad and anchor[index].requires_grad:
            # Value of ``new``, Jacobian of the identity w.r.t. the initial weights: the
            # outer gradient reaching them is first-order MAML's.
            return anchor[index] + (new - anchor[index]).detach()
        return new.detach().requires_grad_(old.requires_grad)


class DifferentiableRuleOptimizer(DifferentiableOptimizer):
    """A differentiable optimizer whose math is a pure rule of :mod:`higher_func.optim`.

    One rule per parameter group, built from the group's hyperparameters; ``step`` calls
    ``rule.step`` once per group over all of the group's parameters.  Changing a group's
    hyperparameter (an override, a schedule, or writing ``param_groups[i][name]``) rebuilds
    that group's rule, validated, at the next step.  The state is imported from the torch
    optimizer (detached) or, for a fresh optimizer, initialised at the first step, as torch
    does.  :attr:`state` is a read-only torch-style view of it.

    The generic class serves any ``torch.optim`` class with a rule registered through
    :func:`higher_func.optim.register_rule`; the named subclasses fix the torch class.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableRuleOptimizer(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    #: The ``torch.optim`` class whose rule this class runs (``None``: ``other``'s type).
    torch_class: ClassVar[type[torch.optim.Optimizer] | None] = None

    def __init__(self, other: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        _check_optimizer(other)
        torch_class = self.torch_class or type(other)
        if not isinstance(other, torch_class):
            raise TypeError(
                f"{type(self).__name__} mirrors a {torch_class.__name__}, got a "
                f"{type(other).__name__}. Use higher_func.get_diff_optim(opt, ...), which "
                f"picks the right class."
            )
        self._factory = rule_factory(torch_class, arithmetic="higher")
        self._option_names = _option_names(self._factory)
        self._flat_grads: dict[int, Tensor | None] = {}  # per flat group, from _differentiate
        _check_options_supported(other, self._option_names)
        super().__init__(other, *args, **kwargs)

    def _import_state(self, other: torch.optim.Optimizer, reference: list[Tensor]) -> None:
        self._rules: list[Any] = []
        self._rule_options: list[dict[str, Any]] = []
        self._states: list[Any] = []
        for group, torch_group, indices in zip(
            self.param_groups, other.param_groups, self._group_to_param_list, strict=True
        ):
            options = self._options(group)
            rule = self._factory(**options)
            self._rules.append(rule)
            self._rule_options.append(options)
            # A state torch filled when built (Adagrad's) is imported for parity, unless an
            # option read at initialisation was overridden: then it must come from the override.
            keep = _stepped_state if _init_option_overridden(rule, torch_group) else dict
            torch_states = {
                k: keep(other.state.get(p, {}))
                for k, p in zip(indices, torch_group["params"], strict=True)
            }
            state = None  # a fresh optimizer's state is built at the first step, like torch's
            if any(torch_states.values()):
                state = import_state(rule, {k: reference[k] for k in indices}, torch_states)
                state = _positional(state, indices)
                state = _move_state(state, self._device)
            self._states.append(state)

    @property
    def state(self) -> list[dict[int, dict[str, Tensor]]]:  # type: ignore[override]
        """Per group, ``{position: {torch state key: tensor}}`` for the parameters updated so
        far (a read-only view of the rules' state, in ``torch.optim``'s keys)."""
        return [
            _torch_style_state(_unflattened(state)) if state is not None else {}
            for state in self._states
        ]

    def _check_override_key(self, key: str) -> None:
        if key not in self._option_names:
            raise ValueError(
                f"override has key {key!r}, which is not a hyperparameter of "
                f"{type(self).__name__}; valid keys are {sorted(self._option_names)}."
            )

    def _options(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k in self._option_names}

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(
                f"{type(self).__name__}.step() got unexpected keyword argument(s) "
                f"{sorted(kwargs)}; it takes loss, params, override and grad_callback."
            )
        for i, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            if all(g is None for g in grads):
                continue
            rule, state = self._current_rule(i, group)
            if self._track_higher_grads and _flat_step_applies(rule, group["params"], grads):
                flat = _as_flat_state(state, group["params"])
                if flat is not None or state is None:
                    group["params"] = self._flat_step(i, rule, flat, group["params"], grads)
                    continue
            params = list(group["params"])
            state = _unflattened(state)
            if state is None:
                state = rule.init(params)
            group["params"], self._states[i] = rule.step(params, list(grads), state)

    def _differentiate(
        self, loss: Tensor, params: list[Tensor], exact: bool
    ) -> tuple[Tensor | None, ...]:
        """Also the gradient of every flat group's weights whose views are still the fast
        weights: autograd assembles it, so the step needs no concatenation."""
        self._flat_grads = {}
        bases: dict[int, Tensor] = {}
        if exact and self._track_higher_grads:
            for i, (state, indices) in enumerate(
                zip(self._states, self._group_to_param_list, strict=True)
            ):
                if not isinstance(state, _FlatState) or state.params is None:
                    continue
                if _reusable(state, [params[k] for k in indices]):
                    bases[i] = state.params
        grads, base_grads = _gradients(loss, params, self._track_higher_grads, list(bases.values()))
        self._flat_grads = dict(zip(bases, base_grads, strict=True))
        return grads

    def _flat_step(
        self,
        i: int,
        rule: Any,
        state: _FlatState | None,
        params: list[Tensor],
        grads: list[Tensor | None],
    ) -> list[Tensor]:
        """Group ``i``'s step on one flat tensor (see :class:`_FlatState`)."""
        flat: Tensor | None = None
        flat_grad: Tensor | None = None
        if _reusable(state, params):
            flat = state.params  # the fast weights are still the views cut at the last step
            flat_grad = self._flat_grads.pop(i, None)  # autograd assembled it
        if flat is None:
            flat = torch.cat([_flattened(p) for p in params])
        if flat_grad is None:
            flat_grad = torch.cat([_flattened(g) for g in grads if g is not None])  # none is None
        rule_state = state.state if state is not None else rule.init({"flat": flat})
        new, new_state = rule.step({"flat": flat}, {"flat": flat_grad}, rule_state)
        new_flat = new["flat"]
        chunks = new_flat.split([p.numel() for p in params])
        views = tuple(_shaped(c, p.shape) for c, p in zip(chunks, params, strict=True))
        self._states[i] = _FlatState(new_state, new_flat, views)
        return list(views)

    def _current_rule(self, i: int, group: Mapping[str, Any]) -> Any:
        """Group ``i``'s rule and state, rebuilt if its hyperparameters changed."""
        built, state = self._rule_options[i], self._states[i]
        if all(group.get(k) is v for k, v in built.items()):
            return self._rules[i], state
        options = self._options(group)
        rule = self._factory(**options)
        if state is not None and _fields(rule) != _fields(self._rules[i]):
            state = _refit_state(_unflattened(state), rule.init(list(group["params"])))
        self._rules[i], self._rule_options[i], self._states[i] = rule, options, state
        return rule, state

    def _detach_state(self) -> None:
        self._states = [_detached_state(s) for s in self._states]


class DifferentiableSGD(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.SGD``, computed by the rule ``optim.sgd``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableSGD(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.SGD


class DifferentiableAdam(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.Adam``, computed by the rule ``optim.adam``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableAdam(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.Adam


class DifferentiableAdamW(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.AdamW``, computed by the rule ``optim.adamw``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableAdamW(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.AdamW


class DifferentiableAdagrad(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.Adagrad``, computed by the rule ``optim.adagrad``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableAdagrad(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.Adagrad


class DifferentiableAdadelta(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.Adadelta``, computed by the rule ``optim.adadelta``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adadelta(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableAdadelta(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.Adadelta


class DifferentiableAdamax(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.Adamax``, computed by the rule ``optim.adamax``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adamax(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableAdamax(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.Adamax


class DifferentiableASGD(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.ASGD``, computed by the rule ``optim.asgd``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.ASGD(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableASGD(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.ASGD


class DifferentiableRMSprop(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.RMSprop``, computed by the rule ``optim.rmsprop``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.RMSprop(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableRMSprop(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.RMSprop


class DifferentiableRprop(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.Rprop``, computed by the rule ``optim.rprop``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Rprop(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableRprop(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.Rprop


class DifferentiableNAdam(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.NAdam``, computed by the rule ``optim.nadam``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.NAdam(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableNAdam(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.NAdam


class DifferentiableRAdam(DifferentiableRuleOptimizer):
    """Differentiable ``torch.optim.RAdam``, computed by the rule ``optim.radam``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.RAdam(model.parameters(), lr=0.1)
        >>> fmodel = hf.monkeypatch(model)
        >>> diffopt = hf.optim.DifferentiableRAdam(opt, model.parameters(), fmodel=fmodel)
        >>> [tuple(p.shape) for p in diffopt.step(fmodel(torch.ones(1, 2)).sum())]
        [(1, 2), (1,)]
    """

    torch_class = torch.optim.RAdam


#: ``torch.optim`` class -> differentiable class (extended by :func:`register_optim`).
_BUILT_IN: tuple[type[DifferentiableRuleOptimizer], ...] = (
    DifferentiableSGD,
    DifferentiableAdam,
    DifferentiableAdamW,
    DifferentiableAdagrad,
    DifferentiableAdadelta,
    DifferentiableAdamax,
    DifferentiableASGD,
    DifferentiableRMSprop,
    DifferentiableRprop,
    DifferentiableNAdam,
    DifferentiableRAdam,
)
_DIFF_OPTIMIZERS: dict[type, type[DifferentiableOptimizer]] = {
    cls.torch_class: cls for cls in _BUILT_IN if cls.torch_class is not None
}


# --------------------------------------------------------------------------- constructors


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable twin of a live ``torch.optim`` optimizer.

    Args:
        opt: the optimizer (it may have stepped: its state is imported, detached).
        reference_params: the parameters of the module ``opt`` optimizes, in
            ``module.parameters()`` order.
        fmodel, device, override, track_higher_grads: see
            :class:`DifferentiableOptimizer`.
        **kwargs: passed to the constructor (``grad_callback=``, ``schedule=``).

    Returns:
        An instance of the class registered for ``type(opt)``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> diffopt = hf.get_diff_optim(opt, model.parameters())
        >>> params = diffopt.step(model(torch.ones(1, 2)).sum(), params=model.parameters())
        >>> [tuple(p.shape) for p in params]
        [(1, 2), (1,)]
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"opt must be a torch.optim.Optimizer instance, got {type(opt).__name__}. To build "
            f"one from a class and its options, use create_diff_optim(opt_type, opt_kwargs, ...)."
        )
    cls = _diff_class(type(opt))
    return cls(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[Tensor] | Iterable[Mapping[str, Any]] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer built from a ``torch.optim`` class and its options.

    Args:
        opt_type: the ``torch.optim`` class (``torch.optim.Adam``).
        opt_kwargs: its constructor options (``{"lr": 0.1}``).
        params: the fast weights to optimize, or a list of parameter-group dicts
            (``[{"params": [...], "lr": 0.1}, ...]``) over them.  With ``fmodel``, the
            tensors may be any subset of ``fmodel.fast_params`` (matched by identity) or, in
            order, stand-ins of the same shapes for all of them.  Default: all of
            ``fmodel``'s fast weights in one group.
        fmodel, device, override, track_higher_grads, **kwargs: as in
            :func:`get_diff_optim`.

    Returns:
        The differentiable optimizer; its state is initialised at the first step.  No
        parameter is copied: the torch optimizer used to fill in the defaults is built over
        empty stand-ins.

    Example:
        >>> import torch, higher_func as hf
        >>> w, b = torch.ones(2, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> diffopt = hf.create_diff_optim(
        ...     torch.optim.SGD, {"lr": 0.5}, params=[{"params": [w]}, {"params": [b], "lr": 1.0}]
        ... )
        >>> diffopt.step((w.sum() + b.sum()) ** 2, params=[w, b])
        [tensor([-1., -1.], grad_fn=<SubBackward0>), tensor([-4.], grad_fn=<SubBackward0>)]
    """
    if not (isinstance(opt_type, type) and issubclass(opt_type, torch.optim.Optimizer)):
        raise TypeError(
            f"opt_type must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), got "
            f"{opt_type!r}. For an optimizer instance, use get_diff_optim(opt, ...)."
        )
    cls = _diff_class(opt_type)
    groups = _param_groups("params", params, fmodel)
    reference = _reference_for_groups(groups, fmodel)
    position = {id(t): k for k, t in enumerate(reference)}
    stand_ins = [t.new_empty(0) for t in reference]
    stand_in_groups = [
        {**group, "params": [stand_ins[position[id(t)]] for t in group["params"]]}
        for group in groups
    ]
    opt = opt_type(stand_in_groups, **dict(opt_kwargs or {}))
    return cls(
        opt,
        stand_ins,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Use ``diff_optim_type`` for optimizers of class ``optim_type`` (``higher``'s hook).

    Args:
        optim_type: the ``torch.optim.Optimizer`` subclass (the torch class).
        diff_optim_type: a :class:`DifferentiableOptimizer` subclass implementing its math,
            e.g. a ``higher``-style class with ``_update(self, grouped_grads, **kwargs)``.

    Example:
        >>> import torch, higher_func as hf
        >>> class MySGD(torch.optim.SGD):
        ...     pass
        >>> hf.register_optim(MySGD, hf.optim.DifferentiableSGD)
        >>> model = torch.nn.Linear(2, 1)
        >>> type(hf.get_diff_optim(MySGD(model.parameters(), lr=0.1), model.parameters())).__name__
        'DifferentiableSGD'
    """
    if isinstance(optim_type, type) and issubclass(optim_type, DifferentiableOptimizer):
        raise TypeError(
            f"register_optim takes the torch optimizer class first, then the differentiable "
            f"one: register_optim(TorchOptimizerClass, {optim_type.__name__})."
        )
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}.")
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"diff_optim_type must be a subclass of higher_func.optim.DifferentiableOptimizer "
            f"(implementing _update(self, grouped_grads, **kwargs)), got {diff_optim_type!r}."
        )
    _DIFF_OPTIMIZERS[optim_type] = diff_optim_type


def _diff_class(optimizer_class: type) -> type[DifferentiableOptimizer]:
    """The class registered for exactly ``optimizer_class`` (a subclass may change the math)."""
    if optimizer_class in _DIFF_OPTIMIZERS:
        return _DIFF_OPTIMIZERS[optimizer_class]
    if optimizer_class in supported_optimizers():
        return DifferentiableRuleOptimizer
    names = ", ".join(sorted({k.__name__ for k in (*_DIFF_OPTIMIZERS, *supported_optimizers())}))
    raise ValueError(
        f"Optimizer type {optimizer_class.__name__} is not supported. Supported: {names}. "
        f"Register a differentiable class with higher_func.register_optim("
        f"{optimizer_class.__name__}, MyDifferentiableClass), or a pure rule with "
        f"higher_func.optim.register_rule({optimizer_class.__name__}, factory)."
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
        per_group = _override_values(key, values, len(opt.param_groups))
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


# --------------------------------------------------------------------------- helpers


def _checked_tensors(argument: str, values: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(values, Tensor) or not isinstance(values, Iterable):
        raise TypeError(
            f"{argument} must be an iterable of tensors (e.g. model.parameters()), got "
            f"{type(values).__name__}."
        )
    result = list(values)
    for index, value in enumerate(result):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{argument}[{index}] must be a torch.Tensor, got {type(value).__name__}."
            )
    return result


def _check_optimizer(other: Any) -> None:
    if not isinstance(other, torch.optim.Optimizer):
        raise TypeError(
            f"other must be a torch.optim.Optimizer, got {type(other).__name__}. Build the "
            f"differentiable optimizer from the torch optimizer of your model."
        )


def _check_fmodel(fmodel: Any, count: int) -> None:
    names = getattr(fmodel, "param_names", None)
    if names is not None and len(names) != count:
        raise ValueError(
            f"fmodel has {len(names)} parameters but reference_params has {count}. Pass the "
            f"parameters of the module fmodel was made from (model.parameters())."
        )


def _snapshot_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's options; tensors not requiring grad are cloned, so that a scheduler
    updating the torch optimizer in place cannot corrupt the graph of earlier steps."""

    def leaf(x: Any) -> Any:
        return x.detach().clone() if isinstance(x, Tensor) and not x.requires_grad else x

    return {
        k: v if type(v) in _PLAIN_VALUES else optree.tree_map(leaf, v)
        for k, v in group.items()
        if k != "params"
    }


#: Hyperparameter values that hold no tensor (kept as they are, without a tree walk).
_PLAIN_VALUES = frozenset({type(None), bool, int, float, str})

#: Option names of each rule factory (building a rule to read them costs a validation).
_OPTION_NAMES: weakref.WeakKeyDictionary[Callable[..., Any], frozenset[str]] = (
    weakref.WeakKeyDictionary()
)


def _option_names(factory: Callable[..., Any]) -> frozenset[str]:
    names = _OPTION_NAMES.get(factory)
    if names is None:
        names = _OPTION_NAMES[factory] = frozenset(factory().hyperparameters)
    return names


def _override_values(key: str, values: Any, num_groups: int) -> list[Any]:
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


def _checked_schedule(schedule: Schedule | None, num_groups: int) -> dict[str, list[Callable]]:
    if schedule is None:
        return {}
    if not isinstance(schedule, Mapping):
        raise TypeError(
            f"schedule must be a dict {{name: fn}} or {{name: [fn per group]}}, got "
            f"{type(schedule).__name__}."
        )
    result = {}
    for key, fns in schedule.items():
        fn_list = _override_values(key, [fns] if callable(fns) else fns, num_groups)
        for fn in fn_list:
            if not callable(fn):
                raise TypeError(
                    f"schedule[{key!r}] must be a callable of the step count (or a list of "
                    f"them, one per group), got {type(fn).__name__}."
                )
        result[key] = fn_list
    return result


def _gradients(
    loss: Tensor, params: list[Tensor], create_graph: bool, extra: Sequence[Tensor] = ()
) -> tuple[tuple[Tensor | None, ...], list[Tensor | None]]:
    """``d loss / d p`` for every ``p`` requiring grad (``None`` for the others and unused
    ones) and, in the same backward pass, for each of ``extra`` (flat weights that the
    trainable ``params`` are views of)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a scalar torch.Tensor, got {type(loss).__name__}.")
    trainable = [k for k, p in enumerate(params) if p.requires_grad]
    grads: list[Tensor | None] = [None] * len(params)
    if not trainable:
        return tuple(grads), [None] * len(extra)
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad: it was not computed from the trainable fast weights "
            "(was it computed under torch.no_grad(), or from detached parameters?)."
        )
    found = torch.autograd.grad(
        loss,
        [*(params[k] for k in trainable), *extra],
        create_graph=create_graph,
        allow_unused=True,
    )
    for k, g in zip(trainable, found, strict=False):
        grads[k] = g
    return tuple(grads), list(found[len(trainable) :])


def _checked_callback_grads(grads: Any, count: int) -> list[Tensor | None]:
    if isinstance(grads, Tensor) or not isinstance(grads, Iterable):
        raise TypeError(
            f"grad_callback must return a sequence of gradients (tensors or None), got "
            f"{type(grads).__name__}."
        )
    result = list(grads)
    if len(result) != count:
        raise ValueError(
            f"grad_callback returned {len(result)} gradients for {count} parameters; return "
            f"one per parameter (None to leave a parameter unchanged)."
        )
    return result


def _check_options_supported(other: torch.optim.Optimizer, supported: frozenset[str]) -> None:
    unsupported = set(other.defaults) - supported - IMPLEMENTATION_FLAGS
    if unsupported:
        raise ValueError(
            f"{type(other).__name__} option(s) {sorted(unsupported)} have no differentiable "
            f"implementation here (supported: {sorted(supported)}); they would be ignored. "
            f"Register a rule that implements them with higher_func.optim.register_rule."
        )


def _init_option_overridden(rule: Any, torch_group: Mapping[str, Any]) -> bool:
    """Whether the rule's value of an option read only by ``init`` differs from torch's."""
    spec = getattr(rule, "spec", None)
    init_only = spec.init_only if spec is not None else frozenset()
    return any(rule.hyperparameters[k] is not torch_group.get(k) for k in init_only)


def _stepped_state(torch_state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A torch state entry, or ``{}`` if it was never stepped."""
    step = torch_state.get("step")
    if isinstance(step, Tensor | numbers.Real) and float(step) == 0:
        return {}
    return torch_state


def _fields(rule: Any) -> tuple[str, ...] | None:
    spec = getattr(rule, "spec", None)
    return None if spec is None else spec.fields(rule.hyperparameters)


def _positional(state: Any, indices: list[int]) -> Any:
    """A state keyed by parameter index as one in group order (a list per field)."""
    return state._replace(
        **{
            f: [getattr(state, f)[k] for k in indices]
            for f in state._fields
            if getattr(state, f) is not None
        }
    )


def _refit_state(state: Any, fresh: Any) -> Any:
    """``state`` with the fields it lacks (e.g. a momentum buffer after momentum became
    non-zero) taken from ``fresh``.  Fields it has keep their values, used or not: like
    ``torch.optim``, a momentum buffer survives a stretch of zero momentum and resumes."""
    return state._replace(
        **{
            f: getattr(fresh, f)
            for f in fresh._fields
            if getattr(state, f) is None and getattr(fresh, f) is not None
        }
    )


# --------------------------------------------------------------------------- flat groups


class _FlatState(NamedTuple):
    """A group's optimizer state kept over one flat tensor, with the fast weights it made.

    While autograd records the steps, a group of same-dtype, same-device dense parameters
    whose rule is elementwise is stepped as one flat tensor: one autograd node per line of
    the rule instead of one per line and parameter, so both the step and the outer
    ``backward`` through it run a few large kernels rather than many tiny ones.  The
    values are those of the per-parameter step: every element sees the same arithmetic.
    The group's new fast weights are views (``views``) of the new flat weights
    (``params``); a later step that finds them unchanged in the fmodel steps ``params``
    directly, with the gradient autograd assembles for it in the same backward pass, so
    nothing is concatenated again.  A state imported from ``torch.optim`` (or
    kept per parameter by an earlier step) is flattened at its first flat step, without
    weights to reuse (``params`` and ``views`` are ``None``).
    """

    state: Any
    params: Tensor | None
    views: tuple[Tensor, ...] | None


def _as_flat_state(state: Any, params: list[Tensor]) -> _FlatState | None:
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
        column = getattr(state, field)
        if column is None:
            continue
        tensors = column
        first = tensors[0]
        if all(
            t.shape == p.shape and t.dtype == first.dtype and t.device == first.device
            for t, p in zip(tensors, params, strict=True)
        ):
            fields[field] = {"flat": torch.cat([_flattened(t) for t in tensors])}
        elif all(t.dim() == 0 for t in tensors):
            if first.device.type != "cpu" or not all(torch.equal(t, first) for t in tensors):
                return None
            fields[field] = {"flat": first}
        else:
            return None
    return _FlatState(state._replace(**fields), None, None)


def _flat_step_applies(rule: Any, params: list[Tensor], grads: Sequence[Any]) -> bool:
    """Whether a recorded step of this group may run on one flat tensor."""
    spec = getattr(rule, "spec", None)
    if spec is None or not spec.elementwise or len(params) < 2:
        return False
    if not spec.fields(rule.hyperparameters):
        return False  # a stateless rule (plain SGD) is one op per parameter: nothing to gain
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False  # nothing to record (the batched foreach path serves), or compiled
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    first = params[0]
    if not first.dtype.is_floating_point:
        return False
    if not all(p.is_contiguous() for p in params):
        return False  # e.g. channels_last weights: the views would be contiguous instead
    for t in (*params, *grads):
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            return False
        if t.dtype != first.dtype or t.device != first.device:
            return False
    if any(g.shape != p.shape for p, g in zip(params, grads, strict=True)):
        return False  # the per-parameter step names the gradient of the wrong shape
    return all(
        not isinstance(v, Mapping) and (not isinstance(v, Tensor) or v.dim() == 0)
        for v in optree.tree_leaves(rule.hyperparameters, none_is_leaf=True)
    )


def _reusable(state: Any, params: list[Tensor]) -> TypeGuard[_FlatState]:
    """Whether ``params`` are still the views a flat group's last step cut."""
    return (
        isinstance(state, _FlatState)
        and state.views is not None
        and len(state.views) == len(params)
        and all(p is v for p, v in zip(params, state.views, strict=True))
    )


def _flattened(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.reshape(-1)  # a 1-d tensor as is: no autograd node


def _shaped(chunk: Tensor, shape: torch.Size) -> Tensor:
    return chunk if chunk.shape == shape else chunk.view(shape)


def _unflattened(state: Any) -> Any:
    """A group's state per parameter (a list per field, in group order), from a flat one."""
    if not isinstance(state, _FlatState):
        return state
    views = state.views
    assert views is not None, "a stored flat state always has its views"
    sizes = [v.numel() for v in views]

    def column(field: dict[str, Tensor] | None) -> list[Tensor] | None:
        if field is None:
            return None
        flat = field["flat"]
        if flat.dim() == 0:  # a per-parameter scalar (the step count): the same for all
            return [flat] * len(views)
        chunks = flat.split(sizes)
        return [_shaped(c, v.shape) for c, v in zip(chunks, views, strict=True)]

    rule_state = state.state
    return rule_state._replace(**{f: column(getattr(rule_state, f)) for f in rule_state._fields})


def _detached_state(state: Any) -> Any:
    if isinstance(state, _FlatState):
        # The views stay: while the fmodel still holds them, a later step reuses their
        # flat weights (only the optimizer state is cut, as for a per-parameter state).
        return state._replace(state=_detached(state.state))
    return _detached(state) if state is not None else None


def _torch_style_state(state: Any) -> dict[int, dict[str, Tensor]]:
    hidden = _RULE_ONLY_FIELDS.get(type(state), frozenset())
    columns = {f: getattr(state, f) for f in state._fields if getattr(state, f) is not None}
    steps = columns.get("step")
    view = {}
    for position in range(len(next(iter(columns.values()), []))):
        if steps is not None and not bool(steps[position] != 0):
            continue  # never updated: torch would have no state for it
        view[position] = {f: c[position] for f, c in columns.items() if f not in hidden}
    return view


def _move_state(state: Any, device: Any) -> Any:
    if device is None:
        return state
    return optree.tree_map(lambda t: t.to(device), state)


def _detach_tensor(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _detached(tree: Any) -> Any:
    """``tree`` with every tensor detached (no graph is kept through it)."""
    return optree.tree_map(_detach_tensor, tree)


def _copy_to(value: Any, device: Any) -> Any:
    def leaf(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        x = x.detach().clone()
        return x if device is None else x.to(device)

    return optree.tree_map(leaf, value)


def _param_groups(argument: str, params: Any, fmodel: Any) -> list[dict[str, Any]]:
    """``params`` as a list of group dicts with a list of tensors each."""
    if params is None:
        if fmodel is None:
            raise ValueError(
                "create_diff_optim needs params= (the fast weights, or a list of parameter-group "
                "dicts) or fmodel= (whose fast weights it then optimizes)."
            )
        return [{"params": list(fmodel.fast_params)}]
    if isinstance(params, Tensor):
        raise TypeError(f"{argument} must be a list of tensors or of group dicts, got a Tensor.")
    items = list(params)
    if items and all(isinstance(item, Mapping) for item in items):
        groups = []
        for g, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"{argument}[{g}] is a parameter group without a 'params' key.")
            group_params = group["params"]
            tensors = [group_params] if isinstance(group_params, Tensor) else group_params
            groups.append(
                {**group, "params": _checked_tensors(f"{argument}[{g}]['params']", tensors)}
            )
        return groups
    return [{"params": _checked_tensors(argument, items)}]


def _reference_for_groups(groups: list[dict[str, Any]], fmodel: Any) -> list[Tensor]:
    """The reference order: fmodel's fast weights if the groups hold them (a subset is fine),
    else the groups' tensors in order (with fmodel, they must then stand for all of them)."""
    listed = [t for group in groups for t in group["params"]]
    if fmodel is None:
        return listed
    fast = list(fmodel.fast_params)
    fast_ids = {id(t) for t in fast}
    if all(id(t) in fast_ids for t in listed):
        return fast
    shapes_match = len(listed) == len(fast) and all(
        a.shape == b.shape for a, b in zip(listed, fast, strict=True)
    )
    if not shapes_match:
        raise ValueError(
            f"params holds {len(listed)} tensors that are not fmodel's fast weights and do not "
            f"match them one for one in order and shape ({len(fast)} fast weights). Pass "
            f"fmodel.fast_params (or groups over a subset of them)."
        )
    return listed
