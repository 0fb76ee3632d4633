"""A ``torch.optim`` optimizer's parameter groups as one pure rule over a model's parameter dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._inner_loop import Params
from ._rules._registry import from_torch_optimizer

__all__ = ["OptimizerRule", "rule_from_optimizer"]


class OptimizerRule:
    """The rules of a ``torch.optim`` optimizer's parameter groups, as one rule.

    ``init``/``step`` work on the model's whole parameter dict: each group's rule updates
    its own parameters with its own hyperparameters; parameters in no group, and those
    that do not require grad, stay unchanged.  The state is a tuple (one entry per group).
    Built by :func:`rule_from_optimizer`.

    Example (one group per learning rate):
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(1, 1)
        >>> opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias]}])
        >>> rule, state = hf.func.rule_from_optimizer(opt, model)
        >>> ones = {"weight": torch.ones(1, 1), "bias": torch.ones(1)}
        >>> rule.step(ones, ones, state)[0]
        {'weight': tensor([[0.9000]]), 'bias': tensor([0.9990])}
    """

    __slots__ = ("frozen", "groups")

    def __init__(self, groups: Sequence[Any], frozen: frozenset[str]) -> None:
        self.groups = tuple(groups)
        self.frozen = frozen

    def __repr__(self) -> str:
        return f"OptimizerRule({', '.join(repr(g.rule) for g in self.groups)})"

    def init(self, params: Params) -> tuple[Any, ...]:
        """A fresh state: one rule state per group."""
        return tuple(g.rule.init({n: params[n] for n in g.names}) for g in self.groups)

    def step(
        self, params: Params, grads: Params, state: tuple[Any, ...], **overrides: Any
    ) -> tuple[dict[str, Tensor], tuple[Any, ...]]:
        """One step of every group; ``overrides`` apply to all groups."""
        new_params, new_state = dict(params), []
        for group, group_state in zip(self.groups, state, strict=True):
            own = {n: params[n] for n in group.names}
            own_grads = {n: None if n in self.frozen else grads[n] for n in group.names}
            updated, group_state = group.rule.step(own, own_grads, group_state, **overrides)
            new_params.update(updated)
            new_state.append(group_state)
        return new_params, tuple(new_state)


def rule_from_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[OptimizerRule, tuple[Any, ...]]:
    """The pure rule equal to ``optimizer`` over ``model``'s parameters, and its state.

    Not to be confused with :func:`higher_func.optim.from_torch_optimizer`, which gives one
    rule per parameter group (each over its own parameters) to combine yourself; this wraps
    all the groups into one :class:`OptimizerRule` over the model's whole parameter dict,
    ready for :func:`inner_loop` (it is built on ``from_torch_optimizer``).

    Args:
        optimizer: a ``torch.optim`` optimizer over (some of) ``model``'s parameters; any
            state it has (momentum buffers, moments, step counts) is imported, detached,
            as ``innerloop_ctx`` does.
        model: the module whose parameters it optimizes.

    Returns:
        ``(rule, state)``: an :class:`OptimizerRule` and its imported state.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> rule, state = rule_from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        >>> [(group.rule.name, group.names) for group in rule.groups]
        [('sgd', ('weight', 'bias'))]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    groups = from_torch_optimizer(optimizer, model)
    frozen = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
    return OptimizerRule(groups, frozen), tuple(g.state for g in groups)
