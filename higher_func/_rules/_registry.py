"""The one registry of ``torch.optim`` classes, and importing a live optimizer as rules.

Each registered optimizer class has a :class:`Registration`: the factory of the pure rule
with its math (:func:`register_rule`) and, optionally, the differentiable class of the
drop-in API (:func:`higher_func.register_optim`; without one, the rule-backed class runs the
rule).  Lookups walk the class's method resolution order, so ``class MyAdam(torch.optim.Adam)``
is served by Adam's entry, and an unknown class gets the same error from every entry point.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._errors import unsupported_optimizer
from .._torch_state import import_state
from . import _factories as f
from ._core import Rule
from ._math import TORCH
from ._protocol import UpdateRule

RuleFactory = Callable[..., UpdateRule]


class Registration(NamedTuple):
    """What is registered for one ``torch.optim`` class (``None``: nothing of that kind)."""

    factory: RuleFactory | None
    differentiable_class: type | None = None


#: ``torch.optim`` class -> its registration; the differentiable classes of the built-in
#: rules are added where they are defined (``_rule_optimizer.py``).
_REGISTRY: dict[type, Registration] = {
    klass: Registration(factory) for klass, factory in f.BUILT_IN.items()
}

#: The factories of ``_factories.py`` (they take ``arithmetic=`` like any option).
_BUILT_IN_FACTORIES = frozenset(f.BUILT_IN.values())

#: Keys that torch's learning-rate schedulers and named parameters add to a group.
_BOOKKEEPING_KEYS = frozenset(
    {
        "params",
        "param_names",
        "initial_lr",
        "max_lr",
        "min_lr",
        "base_momentum",
        "max_momentum",
        "swa_lr",
        "base_lr",
    }
)


def supported_optimizers() -> tuple[type, ...]:
    """The ``torch.optim`` classes that have a registered rule.

    Example:
        >>> import torch, higher_func as hf
        >>> [k.__name__ for k in hf.optim.supported_optimizers()[:3]]
        ['SGD', 'Adam', 'AdamW']
        >>> torch.optim.RAdam in hf.optim.supported_optimizers()
        True
    """
    return tuple(k for k, r in _REGISTRY.items() if r.factory is not None)


def registration(optimizer_class: type, *, rule: bool = False) -> Registration:
    """The registration serving ``optimizer_class``: that of its nearest base (in method
    resolution order) with one; with ``rule=True``, the nearest with a rule factory.

    Raises the ``ValueError`` :data:`~higher_func._errors.UNSUPPORTED_OPTIMIZER` (listing
    what is registered) when there is none.
    """
    for klass in optimizer_class.__mro__:
        found = _REGISTRY.get(klass)
        if found is not None and (found.factory is not None or not rule):
            return found
    supported = supported_optimizers() if rule else tuple(_REGISTRY)
    raise unsupported_optimizer(optimizer_class, supported)


def differentiable_classes() -> dict[type, type]:
    """``{torch class: differentiable class}`` for every class registered with one."""
    return {k: r.differentiable_class for k, r in _REGISTRY.items() if r.differentiable_class}


def register_differentiable_class(optimizer_class: type, differentiable_class: type) -> None:
    """Record ``differentiable_class`` for ``optimizer_class`` (checked by the caller,
    :func:`higher_func.register_optim`); a rule registered for it stays."""
    factory = _REGISTRY.get(optimizer_class, Registration(None)).factory
    _REGISTRY[optimizer_class] = Registration(factory, differentiable_class)


def rule_factory(optimizer_class: type, arithmetic: str = TORCH) -> RuleFactory:
    """The factory registered for ``optimizer_class`` (or its nearest registered base).

    With ``arithmetic="higher"``, a factory whose rules run higher's two-op forms (what the
    drop-in optimizers use; see :mod:`higher_func.optim`) instead of torch.optim's fused ops.

    Example:
        >>> import torch, higher_func as hf
        >>> hf.optim.rule_factory(torch.optim.AdamW) is hf.optim.adamw
        True
        >>> class MyAdam(torch.optim.Adam):  # no rule of its own: Adam's is used
        ...     pass
        >>> hf.optim.rule_factory(MyAdam)(lr=0.1).name
        'adam'
    """
    factory = registration(optimizer_class, rule=True).factory
    assert factory is not None
    return factory if arithmetic == TORCH else _with_arithmetic(factory, arithmetic)


@functools.cache
def _with_arithmetic(factory: RuleFactory, arithmetic: str) -> RuleFactory:
    """``factory`` building its rules with ``arithmetic`` (one wrapper per pair, so callers
    may cache by factory)."""

    def build(**options: Any) -> UpdateRule:
        if factory in _BUILT_IN_FACTORIES:
            return factory(**options, arithmetic=arithmetic)
        rule = factory(**options)  # a registered factory of one's own
        return Rule(rule.spec, rule.hyperparameters, arithmetic) if type(rule) is Rule else rule

    build.__name__ = getattr(factory, "__name__", "factory")
    if factory in _BUILT_IN_FACTORIES:
        _PURE_FACTORIES.add(build)
    return build


#: Hyperparameter values a rule may be reused for: immutable, so the same object is the same
#: value (numbers, bools, strings, ``None``, and tuples of those such as Adam's ``betas``; a
#: tensor can change in place).
_IMMUTABLE_VALUES = frozenset({type(None), bool, int, float, str})


def is_immutable(value: Any) -> bool:
    """Whether ``value`` is immutable and holds no tensor (kept as it is, reused by identity)."""
    kind = type(value)
    return kind in _IMMUTABLE_VALUES or (
        kind is tuple and all(type(item) in _IMMUTABLE_VALUES for item in value)
    )


#: The factories known to be pure (the built-in ones, and their arithmetic variants): the
#: same options always give an equal :class:`Rule`, and a :class:`Rule` never changes.
_PURE_FACTORIES: set[RuleFactory] = set(_BUILT_IN_FACTORIES)

#: Per pure factory, the last rules a drop-in optimizer built from immutable options, with
#: those options (held, so their ids cannot be reused): an optimizer mirrored again for
#: every task of a meta-batch finds its rules here instead of validating them again.
_RECENT_RULES: dict[RuleFactory, list[tuple[dict[str, Any], UpdateRule]]] = {}
_RECENT_RULES_KEPT = 4


def recent_rule(factory: RuleFactory, options: dict[str, Any]) -> UpdateRule:
    """``factory(**options)``, or the rule a pure ``factory`` built before from the very same
    option objects when all of them are immutable (so they still have the same values).

    For the drop-in optimizers only, which keep their rules private: a rule handed to a user
    is always a new one.
    """
    if factory not in _PURE_FACTORIES or not all(map(is_immutable, options.values())):
        return factory(**options)
    recent = _RECENT_RULES.setdefault(factory, [])
    for built_from, rule in recent:
        if len(built_from) == len(options) and all(
            built_from.get(key, built_from) is value for key, value in options.items()
        ):
            return rule
    rule = factory(**options)
    recent.insert(0, (dict(options), rule))
    del recent[_RECENT_RULES_KEPT:]
    return rule


def register_rule(optimizer_class: type, factory: RuleFactory) -> None:
    """Map a ``torch.optim.Optimizer`` subclass to a rule factory.

    The factory is called with the optimizer's group hyperparameters as keyword arguments
    and must return a rule with ``init(params)`` and ``step(params, grads, state)``.  It is
    validated here by building a rule from its defaults and stepping a one-element
    parameter once, so a broken rule fails at registration, not in a training loop.
    A differentiable class registered for the same class (:func:`higher_func.register_optim`)
    stays the drop-in's choice.

    Example:
        >>> import torch, higher_func as hf
        >>> class PlainSGD(torch.optim.Optimizer):  # a torch optimizer of one's own
        ...     def __init__(self, params, lr=0.1):
        ...         super().__init__(params, {"lr": lr})
        >>> hf.optim.register_rule(PlainSGD, lambda lr=0.1: hf.optim.sgd(lr=lr))
        >>> model = torch.nn.Linear(2, 1)
        >>> [group] = hf.optim.from_torch_optimizer(PlainSGD(model.parameters(), lr=0.5), model)
        >>> group.rule.name, group.rule.hyperparameters["lr"]
        ('sgd', 0.5)
    """
    if not (
        isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
    ):
        raise TypeError(
            f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}."
        )
    if not callable(factory):
        raise TypeError(f"factory must be callable (hyperparameters -> rule), got {factory!r}.")
    try:
        rule = factory()
        params = {"x": torch.zeros(1)}
        new_params, _ = rule.step(params, {"x": torch.ones(1)}, rule.init(params))
    except Exception as error:
        raise TypeError(
            f"factory for {optimizer_class.__name__} must build a rule from its defaults whose "
            f"init(params) and step(params, grads, state) work on a dict of tensors; "
            f"trying it raised {type(error).__name__}: {error}"
        ) from error
    if not (isinstance(new_params, dict) and isinstance(new_params.get("x"), Tensor)):
        raise TypeError(
            f"factory for {optimizer_class.__name__}: step must return (params, state) with "
            f"params keyed like its input, got {type(new_params).__name__}."
        )
    kept = _REGISTRY.get(optimizer_class, Registration(None)).differentiable_class
    _REGISTRY[optimizer_class] = Registration(factory, kept)


class ImportedGroup(NamedTuple):
    """One parameter group of a live ``torch.optim`` optimizer, as a pure rule.

    Attributes:
        rule: the rule with the group's hyperparameters.
        names: the keys (in the ``params`` given to :func:`from_torch_optimizer`) of the
            group's parameters, in the group's order.
        state: the rule's state for ``{name: params[name] for name in names}``, imported
            (detached) from the optimizer's ``state``; fresh where torch has none yet.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias], "lr": 1}])
        >>> groups = hf.optim.from_torch_optimizer(opt, model)
        >>> [(g.rule.name, g.names, g.rule.hyperparameters["lr"]) for g in groups]
        [('adam', ('weight',), 0.001), ('adam', ('bias',), 1)]
        >>> groups[1].state.exp_avg["bias"]
        tensor([0.])
    """

    rule: UpdateRule
    names: tuple[Any, ...]
    state: Any


def group_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A torch parameter group's options, without its parameters and scheduler bookkeeping."""
    return {k: v for k, v in group.items() if k not in _BOOKKEEPING_KEYS}


def named_params(params: nn.Module | Mapping[Any, Tensor] | Iterable[Tensor]) -> dict[Any, Tensor]:
    """``params`` as a dict: a module's named parameters, a dict as is, a sequence by index."""
    if isinstance(params, nn.Module):
        return dict(params.named_parameters())
    if isinstance(params, Mapping):
        return dict(params)
    return dict(enumerate(params))


def from_torch_optimizer(
    optimizer: torch.optim.Optimizer,
    params: nn.Module | Mapping[Any, Tensor] | Iterable[Tensor],
) -> list[ImportedGroup]:
    """Turn a live ``torch.optim`` optimizer into one pure rule per parameter group.

    Args:
        optimizer: the optimizer (it may have stepped already: its momentum buffers,
            moments and step counts are imported, detached).
        params: the module whose parameters it optimizes, or a dict ``name -> tensor``, or
            a sequence of tensors (named by position).

    Returns:
        One :class:`ImportedGroup` per parameter group.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> [group] = hf.optim.from_torch_optimizer(opt, model)
        >>> group.rule.name, group.names
        ('sgd', ('weight', 'bias'))
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    named = named_params(params)
    factory = rule_factory(type(optimizer))
    groups = []
    keys = group_keys(optimizer, {id(t): name for name, t in named.items()}, "the given params")
    for group, names in zip(optimizer.param_groups, keys, strict=True):
        rule = factory(**group_hyperparameters(group))
        states = {
            n: optimizer.state.get(p, {}) for n, p in zip(names, group["params"], strict=True)
        }
        state = import_state(rule, dict(zip(names, group["params"], strict=True)), states)
        groups.append(ImportedGroup(rule, tuple(names), state))
    return groups


def group_keys(
    optimizer: torch.optim.Optimizer, key_by_id: Mapping[int, Any], where: str
) -> list[list[Any]]:
    """For each parameter group, the keys (``key_by_id[id(param)]``) of its parameters.

    Raises a ``ValueError`` naming the first parameter that ``key_by_id`` lacks: the
    optimizer was built over another module's parameters.
    """
    keys = []
    for index, group in enumerate(optimizer.param_groups):
        names = []
        for position, p in enumerate(group["params"]):
            if id(p) not in key_by_id:
                raise ValueError(
                    f"The optimizer's param_groups[{index}]['params'][{position}] (shape "
                    f"{tuple(p.shape)}) is not among {where}. Build the optimizer over the "
                    f"parameters of the same module (model.parameters()), or pass the tensors "
                    f"it optimizes."
                )
            names.append(key_by_id[id(p)])
        keys.append(names)
    return keys
