"""What the adapters need from a rule, typed: the :class:`UpdateRule` protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ._core import Rule, RuleSpec


class UpdateRule(Protocol):
    """What the adapters need from a rule: a :class:`Rule`, or one of one's own design that a
    factory given to :func:`higher_func.optim.register_rule` returns.

    A rule built from a :class:`RuleSpec` (a :class:`Rule`) can do more: its torch state can
    be imported and its groups stepped flat; :func:`spec_of` tells which kind a rule is.
    """

    @property
    def hyperparameters(self) -> Mapping[str, Any]:
        """The rule's options by name (``torch.optim``'s names)."""
        ...

    def init(self, params: Any) -> Any:
        """The initial state for ``params``."""
        ...

    def step(self, params: Any, grads: Any, state: Any, **overrides: Any) -> tuple[Any, Any]:
        """``(new_params, new_state)``, the inputs untouched."""
        ...


def spec_of(rule: UpdateRule) -> RuleSpec | None:
    """The :class:`RuleSpec` a rule was built from (``None`` for a rule of one's own design)."""
    return rule.spec if isinstance(rule, Rule) else None
