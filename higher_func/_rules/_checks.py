"""Checks of what a rule is given: hyperparameter values and types, and gradients.

Values are checked with ``torch.optim``'s own wording (``Invalid learning rate: -1.0``);
wrong types and wrong gradients get a message naming the argument, what was expected, what
was given and the fix.  Each check runs where the rule uses the value (``build_rule`` for
hyperparameters, ``Rule.step`` for gradients), so the pure rules and the differentiable
optimizers built on them raise the same error for the same mistake.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._errors import grad_shape
from .._execution import traced
from ._tensor_list import is_number

Hyperparameters = Mapping[str, Any]


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def numbers_in(value: Any) -> Iterable[float]:
    """The numbers in a hyperparameter value that torch.optim would check.

    Python numbers are always checked.  One-element CPU tensors are checked when a rule is
    built (as torch checks a tensor ``lr``), not in per-step overrides: a learned value may
    cross a bound during meta-training, and reading it every step costs a device sync on
    an accelerator.  Larger tensors (per-element values), accelerator tensors and tensors
    inside ``vmap``/``torch.compile`` are the caller's responsibility.
    """
    values = value.values() if isinstance(value, Mapping) else [value]
    for item in values:
        if is_number(item):
            yield float(item)
        elif (
            isinstance(item, Tensor)
            and item.device.type == "cpu"  # reading a GPU value would synchronise
            and not traced(item)
            and item.numel() == 1
        ):
            yield float(item.detach())


def check_nonnegative(hp: Hyperparameters, key: str, label: str) -> None:
    """torch.optim's ``Invalid <label>: <value>`` check for ``0 <= value``."""
    for v in numbers_in(hp[key]):
        check(v >= 0.0 and not math.isnan(v), f"Invalid {label}: {v}")


def check_betas(hp: Hyperparameters, key: str = "betas") -> None:
    """torch.optim's check that both betas lie in ``[0, 1)``."""
    values = hp[key].values() if isinstance(hp[key], Mapping) else [hp[key]]
    for pair in values:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"{key} must be a pair (beta1, beta2), got {pair!r}.")
        for index, beta in enumerate(pair):
            for v in numbers_in(beta):
                check(0.0 <= v < 1.0, f"Invalid beta parameter at index {index}: {v}")


def check_type(hp: Hyperparameters, key: str, kind: type) -> None:
    """A static option must be a plain value of ``kind`` (e.g. ``amsgrad`` a bool)."""
    if not isinstance(hp[key], kind):
        raise TypeError(f"{key} must be a {kind.__name__}, got {type(hp[key]).__name__}.")


# --------------------------------------------------------------------------- types


def check_hyperparameter_types(name: str, defaults: Hyperparameters, hp: Hyperparameters) -> None:
    """Every numeric option holds numbers or real tensors, shaped like its default.

    An option whose default is a number takes a number, a real floating-point tensor or a
    dict of them (per parameter); one whose default is a pair (``betas``) takes a pair of
    those.  Boolean options are checked by each rule's validator.
    """
    for key, default in defaults.items():
        value = hp[key]
        if value is default or isinstance(default, bool) or not _is_numeric_default(default):
            continue
        per_parameter = value.values() if isinstance(value, Mapping) else [value]
        for item in per_parameter:
            if isinstance(default, tuple):
                _check_pair(name, key, default, item)
            else:
                _check_number(name, key, default, item)


def _is_numeric_default(default: Any) -> bool:
    if isinstance(default, tuple):
        return all(is_number(v) for v in default)
    return is_number(default)


def _check_pair(name: str, key: str, default: tuple[Any, ...], value: Any) -> None:
    if not (isinstance(value, tuple | list) and len(value) == len(default)):
        return  # not a pair at all: the rule's validator says so, with torch's wording
    for index, item in enumerate(value):
        _check_number(name, f"{key}[{index}]", default[index], item)


def _check_number(name: str, key: str, default: Any, value: Any) -> None:
    if is_number(value):
        return
    if isinstance(value, Tensor) and value.dtype.is_floating_point:
        return
    hint = ""
    if isinstance(value, str):
        hint = " (a string: convert it with float())"
    elif isinstance(value, Tensor):
        hint = f" (a {value.dtype} tensor: use a floating-point tensor)"
    raise TypeError(
        f"{name}(): {key} must be a number or a floating-point tensor, got "
        f"{_describe(value)}{hint}. Pass e.g. {key.split('[')[0]}={default!r}."
    )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} ({value!r})"


# --------------------------------------------------------------------------- gradients


def check_grad(name: str, path: str, param: Tensor, grad: Tensor, accepts_sparse: bool) -> Tensor:
    """``grad`` checked against ``param``: same shape, same dtype, dense (or densified).

    torch.optim never broadcasts a gradient (its update is in place) and refuses one of
    another dtype; a sparse gradient is accepted by the optimizers whose torch.optim
    counterpart accepts it (SGD, Adagrad), which then step it as the equal dense gradient.
    """
    if grad.layout != torch.strided:
        if not accepts_sparse:
            raise RuntimeError(
                f"{name} does not support sparse gradients, as torch.optim's does not; "
                f"grads{path} is {grad.layout}. Pass grad.to_dense(), use an optimizer that "
                f"accepts them (sgd, adagrad), or build the embedding with sparse=False."
            )
        grad = grad.to_dense()
    if grad.shape != param.shape:
        raise grad_shape(f"grads{path}", tuple(grad.shape), f"params{path}", tuple(param.shape))
    if grad.dtype != param.dtype:
        raise TypeError(
            f"grads{path} is {grad.dtype} but params{path} is {param.dtype}; torch.optim "
            f"refuses mixed dtypes too. Cast the gradient: grad.to({param.dtype})."
        )
    return grad
