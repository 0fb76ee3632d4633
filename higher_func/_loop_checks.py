"""Argument checks of the functional inner loops: one error per mistake."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__: list[str] = []


_RANDOMNESS = ("error", "different", "same")
_REDUCTIONS = ("mean", "sum", "none")


def _check_rule(rule: Any) -> None:
    if not (callable(getattr(rule, "init", None)) and callable(getattr(rule, "step", None))):
        raise TypeError(
            f"rule must be an update rule with init(params) and step(params, grads, state), "
            f"e.g. higher_func.optim.sgd(lr=0.1), got {type(rule).__name__}."
        )


def _check_steps(steps: Any, truncate: Any) -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
    if truncate is None:
        return
    if not isinstance(truncate, numbers.Integral) or isinstance(truncate, bool) or truncate < 0:
        raise ValueError(
            f"truncate must be None (differentiate through every step) or an integer >= 0, "
            f"got {truncate!r}."
        )


def _check_callable(argument: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{argument} must be callable, got {type(value).__name__}.")


def _check_choice(argument: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}.")


def _check_scalar(value: Any) -> None:
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else (type(value).__name__)
        )
        raise TypeError(
            f"loss must return a scalar tensor, got {got}. Reduce it, e.g. with .mean()."
        )


def _check_task_batch(
    support: tuple[Any, ...], query: tuple[Any, ...], per_task: Mapping[str, Any]
) -> int:
    """The number of tasks (dimension 0 of every per-task tensor, checked equal)."""
    sizes = {}
    for argument, tree in (
        ("support", support),
        ("query", query),
        ("task_hyperparameters", per_task),
    ):
        for where, leaf in _leaves_with_paths(argument, tree):
            if not isinstance(leaf, Tensor) or leaf.dim() == 0:
                raise ValueError(
                    f"{where} must be a tensor whose first dimension indexes the tasks, got "
                    f"{_describe(leaf)}. Stack the tasks' data along dimension 0."
                )
            sizes[where] = leaf.shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{where}: {size}" for where, size in sizes.items())
        raise ValueError(
            f"Every per-task tensor needs the same number of tasks in dimension 0, got {listing}."
        )
    return next(iter(sizes.values()), 0)


def _leaves_with_paths(where: str, tree: Any) -> list[tuple[str, Any]]:
    """The leaves of nested tuples/lists/dicts with readable paths (cheap under dynamo)."""
    if isinstance(tree, Mapping):
        items: Any = tree.items()
    elif isinstance(tree, tuple | list):
        items = enumerate(tree)
    else:
        return [(where, tree)]
    return [pair for key, sub in items for pair in _leaves_with_paths(f"{where}[{key!r}]", sub)]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a 0-d tensor ({value.item() if value.numel() else value})"
    return f"{type(value).__name__} {value!r}"


def _check_has_examples(where: str, inputs: Any) -> None:
    """Floating inputs need (tasks, examples, features...): a (5, 1) tensor would silently
    be 5 tasks of one unbatched example each."""
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.dim() < 3:
        shape = tuple(inputs.shape)
        raise ValueError(
            f"{where} has shape {shape}, which MetaObjective reads as {shape[0]} task(s) "
            f"of one example of shape {shape[1:]} without a batch dimension. Give "
            f"(tasks, examples, features...): e.g. x.unsqueeze(0) for one task of "
            f"{shape[0]} examples, or x.unsqueeze(-1) for scalar features."
        )
