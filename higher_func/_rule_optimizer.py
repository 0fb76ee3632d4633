"""The built-in differentiable optimizers: one pure rule per parameter group.

:class:`DifferentiableRuleOptimizer` runs the rule registered for its ``torch.optim`` class
(``higher``'s arithmetic, so a migrated program's numbers do not move); the named classes
(:class:`DifferentiableSGD`, ...) only fix that class.  Where the planner says so, a group
is stepped as one flat tensor (``_flat_groups.py``); the state is converted to and from
``torch.optim``'s by ``_torch_state.py``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _flat_groups as flat
from ._diffopt import DifferentiableOptimizer, GradCallback, check_optimizer
from ._errors import unknown_override
from ._execution import Plan, group_plan
from ._hyperparams import Override, Schedule, check_options_supported, option_names
from ._rules._core import Rule
from ._rules._protocol import UpdateRule, spec_of
from ._rules._registry import recent_rule, register_differentiable_class, rule_factory
from ._torch_state import DeferredImport, imported_group_state, torch_style_state

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableRuleOptimizer",
    "DifferentiableSGD",
]


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
        """Mirror ``other`` (an instance of :attr:`torch_class`), as
        :class:`DifferentiableOptimizer` does; the arguments are the same."""
        check_optimizer(other)
        torch_class = self.torch_class or type(other)
        if not isinstance(other, torch_class):
            raise TypeError(
                f"{type(self).__name__} mirrors a {torch_class.__name__}, got a "
                f"{type(other).__name__}. Use higher_func.get_diff_optim(opt, ...), which "
                f"picks the right class."
            )
        self._factory = rule_factory(torch_class, arithmetic="higher")
        self._option_names = option_names(self._factory)
        self._overridden: set[str] = set()  # keys an override has set
        check_options_supported(other, self._option_names)
        super().__init__(
            other,
            reference_params,
            fmodel,
            device,
            override,
            grad_callback,
            track_higher_grads,
            schedule=schedule,
        )

    # ------------------------------------------------------------------ the step

    def _updated(
        self,
        params: list[Tensor],
        grads: Sequence[Tensor | None],
        also_grads: Mapping[int, Tensor | None],
        **kwargs: Any,
    ) -> list[Tensor]:
        """Each group's rule step (flat where the planner says so) on ``params``."""
        if type(self)._update is not DifferentiableRuleOptimizer._update:
            return super()._updated(params, grads, also_grads, **kwargs)  # a subclass's own
        if kwargs:
            _check_no_kwargs(self, kwargs)
        new_params = list(params)
        for i, indices in enumerate(self._group_to_param_list):
            group_grads = [grads[k] for k in indices]
            if not any(map(_is_tensor, group_grads)):
                continue
            group_params = [params[k] for k in indices]
            new = self._group_step(i, group_params, group_grads, also_grads.get(i))
            for k, p in zip(indices, new, strict=True):
                new_params[k] = p
        return new_params

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """``higher``'s protocol (for subclasses that extend it): each group's rule step on
        ``param_groups[i]['params']``, written back there."""
        _check_no_kwargs(self, kwargs)
        for i, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            if any(g is not None for g in grads):
                group["params"] = self._group_step(i, list(group["params"]), grads, None)

    def _group_step(
        self, i: int, params: list[Tensor], grads: list[Tensor | None], flat_grad: Tensor | None
    ) -> list[Tensor]:
        """Group ``i``'s new fast weights; its new state goes to ``self._states[i]``."""
        previous = self._rules[i]
        rule, state = self._current_rule(i, params)
        flat_before = rule is previous and flat.reusable(state, params)
        how = group_plan(
            params, grads, rule, flat=self._track_higher_grads, flat_before=flat_before
        )
        if how is Plan.FLAT:
            flat_state = flat.as_flat_state(state, params)
            if flat_state is not None or state is None:
                new, self._states[i] = flat.flat_step(rule, flat_state, params, grads, flat_grad)
                return new
            how = group_plan(params, grads, rule, flat=False)  # a state that stays per tensor
        state = flat.unflattened(state)
        if state is None:
            state = rule.init(params)
        if isinstance(rule, Rule):
            new_params, self._states[i] = rule.step_list(params, list(grads), state, how)
        else:  # a rule of one's own (the UpdateRule protocol)
            new_params, self._states[i] = rule.step(params, list(grads), state)
        return list(new_params)

    def _also_differentiated(self, params: list[Tensor]) -> dict[int, Tensor]:
        """The flat weights of every flat group whose views are still the fast weights:
        autograd assembles their gradient, so the step needs no concatenation."""
        if not self._track_higher_grads:
            return {}
        return flat.reusable_weights(self._states, params, self._group_to_param_list)

    # ------------------------------------------------------------------ rules and state

    def _import_state(self, other: torch.optim.Optimizer, reference: list[Tensor]) -> None:
        self._rules: list[UpdateRule | None] = []
        self._built_from: list[dict[str, Any]] = []  # the options each rule was built from
        self._states: list[Any] = []
        #: Per group whose rule is not built yet: what its torch state import needs.
        self._deferred: dict[int, DeferredImport] = {}
        stepped = bool(other.state)  # else no group has torch state to import (the usual case)
        for i, (group, indices) in enumerate(
            zip(self.param_groups, self._group_to_param_list, strict=True)
        ):
            options = self._options(group)
            try:
                rule = recent_rule(self._factory, options)
            except (TypeError, ValueError) as error:
                # torch.optim validates constructor arguments only: programs keep values in
                # param_groups that they replace before every step (a log-scale weight
                # decay of -16.0).  The step validates the values it uses, when it uses them;
                # an override is asked for now, so a bad one fails now.
                self._raise_if_override_is_bad(options, error)
                rule = None
                self._deferred[i] = _deferred_import(other, i, indices, reference).copied()
            self._rules.append(rule)
            self._built_from.append(options)
            self._states.append(
                None
                if rule is None or not stepped
                else imported_group_state(
                    rule, _deferred_import(other, i, indices, reference), self._device
                )
            )

    def _current_rule(self, i: int, params: list[Tensor]) -> tuple[UpdateRule, Any]:
        """Group ``i``'s rule and state (for its fast weights ``params``), rebuilt (and
        validated) if its hyperparameters changed or its rule could not be built from the
        torch optimizer's values."""
        group = self.param_groups[i]
        built, state, previous = self._built_from[i], self._states[i], self._rules[i]
        unchanged = all(map(operator.is_, map(group.get, built), built.values()))
        if previous is not None and unchanged:
            return previous, state
        options = self._options(group)
        rule = self._factory(**options)
        if previous is None:
            state = imported_group_state(rule, self._deferred.pop(i), self._device)
        elif state is not None and _fields(rule) != _fields(previous):
            state = _refit_state(flat.unflattened(state), rule.init(params))
        self._rules[i], self._built_from[i], self._states[i] = rule, options, state
        return rule, state

    @property
    def state(self) -> list[dict[int, dict[str, Tensor]]]:  # type: ignore[override]
        """Per group, ``{position: {torch state key: tensor}}`` for the parameters updated so
        far (a read-only view of the rules' state, in ``torch.optim``'s keys)."""
        return [
            torch_style_state(flat.unflattened(state)) if state is not None else {}
            for state in self._states
        ]

    def detach_state(self) -> None:
        self._states = [flat.detached_state(s) for s in self._states]

    # ------------------------------------------------------------------ hyperparameters

    def _raise_if_override_is_bad(self, options: dict[str, Any], error: Exception) -> None:
        overridden = {k: v for k, v in options.items() if k in self._overridden}
        if overridden:
            try:
                self._factory(**overridden)
            except (TypeError, ValueError):
                raise error from None

    def _apply_override(self, override: Override) -> None:
        super()._apply_override(override)
        self._overridden.update(override)

    def _check_override_key(self, key: str) -> None:
        if key not in self._option_names:
            raise unknown_override(type(self).__name__, key, self._option_names)

    def _options(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k in self._option_names}


def _deferred_import(
    other: torch.optim.Optimizer, i: int, indices: list[int], reference: list[Tensor]
) -> DeferredImport:
    """What importing group ``i`` of ``other``'s state needs (its torch state per index)."""
    torch_group = other.param_groups[i]
    torch_states = {
        k: other.state.get(p, {}) for k, p in zip(indices, torch_group["params"], strict=True)
    }
    return DeferredImport(torch_group, torch_states, {k: reference[k] for k in indices})


def _is_tensor(value: Any) -> bool:
    return value is not None


def _check_no_kwargs(diffopt: DifferentiableOptimizer, kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        raise TypeError(
            f"{type(diffopt).__name__}.step() got unexpected keyword argument(s) "
            f"{sorted(kwargs)}; it takes loss, params, override and grad_callback."
        )


def _fields(rule: UpdateRule) -> tuple[str, ...] | None:
    spec = spec_of(rule)
    return None if spec is None else spec.fields(rule.hyperparameters)


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


# --------------------------------------------------------------------------- named classes
# One per built-in rule: each fixes ``torch_class`` (the docstrings are alike on purpose,
# so that each public class documents itself).


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


for _named in (
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
):
    assert _named.torch_class is not None
    register_differentiable_class(_named.torch_class, _named)
