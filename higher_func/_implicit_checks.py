"""The checks of :mod:`higher_func.implicit`: each mistake gets an error naming its fix.

A silently wrong hypergradient is the failure mode of implicit differentiation: a tensor the
optimality function reads from its closure gets no gradient, a mis-shaped residual or solver
output breaks the linear system, and a compiled ``torch.func.grad`` drops the custom backward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import optree
import torch
from torch import Tensor

CAPTURED_TENSOR = (
    "{where} captures a tensor that requires grad ({name}, shape {shape}): implicit "
    "differentiation gives gradients only to the tensors passed in args, so this one would "
    "silently get none. Pass it as an argument instead: write optimality_fn(solution, {arg}, "
    "...) and call solver(init, {arg}, ...); or .detach() it if it is a constant."
)

COMPILED_TRANSFORM = (
    "custom_root/custom_fixed_point under torch.compile inside a torch.func transform "
    "(torch.compile(torch.func.grad(f)), vjp, jacrev, ...): on this torch, compiling a "
    "torch.func transform drops an autograd.Function's custom backward (pytorch#193279), so "
    "the hypergradient would be wrong. Compile the function and differentiate it with "
    "autograd instead: loss = torch.compile(f)(theta); loss.backward() (or "
    "torch.autograd.grad(loss, theta)); or run torch.func.grad(f) without torch.compile."
)


def is_grad_tracking(tensor: Tensor) -> bool:
    """Whether ``tensor`` is tracked by autograd or by a ``torch.func`` gradient transform."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_gradtrackingtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return tensor.requires_grad


def _tensors(value: Any, name: str, seen: dict[int, Any]) -> Iterator[tuple[str, Tensor]]:
    """Tensors in ``value``: itself, its containers' items and the closures of its functions."""
    if id(value) in seen:
        return
    seen[id(value)] = value  # kept alive, so that no later object reuses its id
    if isinstance(value, Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}[{i}]", seen)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}[{key!r}]", seen)
    elif isinstance(value, functools.partial):
        yield from _tensors(list(value.args), f"{name}.args", seen)
        yield from _tensors(value.keywords, f"{name}.keywords", seen)
        yield from _tensors(value.func, name, seen)
    elif inspect.ismethod(value):
        yield from _tensors(value.__func__, name, seen)
    elif inspect.isfunction(value) and not (value.__module__ or "").startswith(_LIBRARIES):
        yield from _function_tensors(value, seen)


# Functions of these packages are not the user's: their globals hold no user tensor.
_LIBRARIES = ("torch", "optree", "functools", "numpy")


def _function_tensors(fn: Any, seen: dict[int, Any]) -> Iterator[tuple[str, Tensor]]:
    code = fn.__code__
    for var, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
        try:
            contents = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        yield from _tensors(contents, var, seen)
    for var in code.co_names:
        if var in fn.__globals__:
            yield from _tensors(fn.__globals__[var], var, seen)
    yield from _tensors(list(fn.__defaults__ or ()), f"{fn.__name__}.__defaults__", seen)
    yield from _tensors(fn.__kwdefaults__ or {}, f"{fn.__name__}.__kwdefaults__", seen)


def check_captured(fn: Callable, where: str) -> None:
    """Raise if ``fn``'s closure, defaults or globals hold a tensor that requires grad."""
    for name, tensor in _tensors(fn, where, {}):
        if is_grad_tracking(tensor):
            arg = name.split("[")[0].split(".")[-1]
            raise ValueError(
                CAPTURED_TENSOR.format(where=where, name=name, shape=tuple(tensor.shape), arg=arg)
            )


def check_requires_no_grad(fn: Callable, solution: Any, args: tuple) -> None:
    """Raise if ``fn`` on detached inputs still needs a gradient: it reads a tensor from
    somewhere else (a module's parameter, an object's attribute) that requires grad."""
    detached: Any = optree.tree_map(
        lambda t: t.detach() if isinstance(t, Tensor) else t,
        (solution, args),  # type: ignore[arg-type]
        none_is_leaf=True,
    )
    with torch.enable_grad():
        residual = fn(detached[0], *detached[1])
    for leaf in optree.tree_leaves(residual, none_is_leaf=True):
        if isinstance(leaf, Tensor) and leaf.requires_grad:
            raise ValueError(
                "optimality_fn reads a tensor that requires grad from outside its arguments "
                "(a module parameter or an attribute used directly): implicit differentiation "
                "gives gradients only to the tensors passed in args, so it would silently get "
                "none. Pass it in args (e.g. the parameters through torch.func.functional_call), "
                "or .detach() it if it is a constant."
            )


def _describe(tree: Any) -> str:
    structure = optree.tree_structure(tree, none_is_leaf=True)
    shapes = [
        tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
        for leaf in optree.tree_leaves(tree, none_is_leaf=True)
    ]
    return f"{structure} with leaf shapes {shapes}"


def check_same_structure(name: str, tree: Any, other_name: str, other: Any, shapes: bool) -> None:
    """Raise if ``tree`` is not a pytree like ``other`` (and, with ``shapes``, of its shapes)."""
    same = optree.tree_structure(tree, none_is_leaf=True) == optree.tree_structure(
        other, none_is_leaf=True
    )
    if same and shapes:
        pairs = zip(
            optree.tree_leaves(tree, none_is_leaf=True),
            optree.tree_leaves(other, none_is_leaf=True),
            strict=True,
        )
        same = all(
            isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape for a, b in pairs
        )
    if not same:
        raise ValueError(
            f"{name}: expected a pytree of tensors like {other_name}, "
            f"{_describe(other)}; got {_describe(tree)}. Return the same structure and shapes."
        )


def check_optimality_fn(optimality_fn: Callable, init: Any, args: tuple) -> None:
    """The checks of the optimality function at each call, eager or compiled."""
    if torch.compiler.is_compiling():
        _checks_under_compile(optimality_fn, init, args)  # the graph breaks here (see why there)
    else:
        _checks(optimality_fn, init, args)


def _checks(optimality_fn: Callable, init: Any, args: tuple) -> None:
    check_captured(optimality_fn, "optimality_fn")
    leaves: list[Any] = optree.tree_leaves(args, none_is_leaf=True)  # type: ignore[arg-type]
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if torch.is_grad_enabled() and not any(is_grad_tracking(t) for t in tensors):
        # No backward will run to check it, so check here that nothing else wanted a gradient.
        check_requires_no_grad(optimality_fn, init, args)


@torch.compiler.disable
def _checks_under_compile(optimality_fn: Callable, init: Any, args: tuple) -> None:
    """The checks, run outside the graph: Dynamo breaks the graph here, on purpose.

    On torch 2.13 a ``torch.func`` transform compiled with Dynamo drops an
    ``autograd.Function``'s custom backward (pytorch#193279). This graph break inside the
    transform makes Dynamo run the transform eagerly, where the backward is right
    (``tests/test_implicit.py::test_compiled_grad_keeps_the_custom_backward`` shows the wrong
    number without it). Should a graph be compiled and resumed inside a differentiating
    transform anyway, the transform is on the interpreter stack here, and this raises.
    """
    _checks(optimality_fn, init, args)
    transforms = torch._C._functorch.TransformType
    stack = torch._C._functorch.get_interpreter_stack() or []
    if any(level.key() in (transforms.Grad, transforms.Jvp) for level in stack):
        raise RuntimeError(COMPILED_TRANSFORM)
