"""Pytree plumbing of the rules: a ``params`` tree as a list of tensor leaves, the
``grads`` and state trees flattened up to it, and readable accounts of a mismatch."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import optree
from torch import Tensor


def tensor_leaves(argument: str, tree: Any) -> tuple[list[Tensor], Any]:
    """``tree``'s leaves and structure; a ``TypeError`` naming the leaf unless each is a
    real tensor."""
    if type(tree) is list and all(type(t) is Tensor and not t.is_complex() for t in tree):
        return list(tree), list_spec(len(tree))  # a plain list of tensors: no tree walk
    leaves, treespec = optree.tree_flatten(tree, none_is_leaf=True)
    if all(isinstance(leaf, Tensor) and not leaf.is_complex() for leaf in leaves):
        return leaves, treespec
    if isinstance(tree, Iterator):
        raise TypeError(
            f"{argument} must be a dict name -> tensor (or a list or tuple of tensors), got a "
            f"{type(tree).__name__}, which can be read only once. Materialize it: "
            f"{argument} = dict(model.named_parameters()) or list(model.parameters())."
        )
    paths = optree.tree_paths(tree, none_is_leaf=True)  # only to name the bad leaf
    for path, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{argument}{format_path(path)} must be a torch.Tensor, got "
                f"{type(leaf).__name__}. Pass tensors (e.g. torch.tensor(value)) as {argument}."
            )
        if leaf.is_complex():
            raise TypeError(
                f"{argument}{format_path(path)} is complex ({leaf.dtype}); the rules support "
                f"real tensors. Optimize torch.view_as_real({argument}...) instead."
            )
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=256)
def list_spec(length: int) -> Any:
    return optree.tree_structure([0] * length, none_is_leaf=True)  # type: ignore[arg-type]


def grads_like(grads: Any, treespec: Any) -> list[Tensor | None]:
    try:
        leaves = treespec.flatten_up_to(grads)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"grads must have the same structure as params. {mismatch(treespec, grads)} "
            f"Pass one gradient (or None) per parameter, keyed like params."
        ) from error
    for leaf in leaves:
        if leaf is not None and not isinstance(leaf, Tensor):
            raise TypeError(f"grads must hold tensors or None, got {type(leaf).__name__}.")
    return leaves


def state_columns(
    state: Any, state_type: type, fields: tuple[str, ...], treespec: Any
) -> dict[str, list[Tensor]]:
    """Each state field needed by ``fields`` as a list of leaves in ``treespec`` order."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"state must be the {state_type.__name__} returned by init() or step(), got "
            f"{type(state).__name__}. Build it with rule.init(params)."
        )
    columns = {}
    for field in fields:
        tree = getattr(state, field)
        if type(tree) is list and treespec is list_spec(len(tree)):
            columns[field] = tree  # a list state of a list of params: no tree walk
            continue
        if tree is None:
            raise ValueError(
                f"state.{field} is None but these hyperparameters need it. Build the state "
                f"with init() from a rule with the same options."
            )
        try:
            columns[field] = treespec.flatten_up_to(tree)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"state.{field} must have the same structure as params. "
                f"{mismatch(treespec, tree)} Build the state with rule.init(params)."
            ) from error
    return columns


def path_of(treespec: Any, index: int) -> str:
    """``['name']`` for the ``index``-th leaf (for error messages only: it walks the tree)."""
    return format_path(treespec.paths()[index]) if treespec.num_leaves else ""


def format_path(path: tuple[Any, ...]) -> str:
    return "".join(f"[{key!r}]" for key in path)


def mismatch(treespec: Any, other: Any) -> str:
    if treespec.kind == optree.PyTreeKind.DICT and isinstance(other, Mapping):
        expected = set(optree.tree_unflatten(treespec, [0] * treespec.num_leaves))
        missing = sorted(map(str, expected - set(other)))
        unexpected = sorted(map(str, set(other) - expected))
        if missing or unexpected:
            return f"Missing key(s): {missing}. Unexpected key(s): {unexpected}."
    expected_tree = optree.tree_unflatten(treespec, [0] * treespec.num_leaves)
    return f"Expected {describe_tree(expected_tree)}, got {describe_tree(other)}."


def describe_tree(tree: Any) -> str:
    """A short, readable account of a pytree's top level (never a raw PyTreeSpec)."""
    if isinstance(tree, Mapping):
        keys = sorted(map(str, tree))
        shown = keys if len(keys) <= 8 else [*keys[:8], "..."]
        return f"a dict with {len(keys)} key(s) {shown}"
    if isinstance(tree, list | tuple):
        return f"a {type(tree).__name__} of {len(tree)} item(s)"
    if isinstance(tree, Tensor):
        return "a single tensor"
    return f"a {type(tree).__name__}"
