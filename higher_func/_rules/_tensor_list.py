"""Run a per-tensor kernel over many tensors at once with ``torch._foreach_*`` ops.

Each rule is written once, as a kernel over single tensors.  :class:`TensorList` lets the
same kernel run over all parameters of a step: arithmetic and the few torch functions the
kernels use dispatch to PyTorch's multi-tensor (``_foreach``) kernels, which launch one op
per list instead of one per tensor and record one autograd node per list.  Anything else
falls back to applying the torch function tensor by tensor, so a kernel never needs to
know which way it runs.  The values are those of the per-tensor kernel up to rounding
(the foreach ops compute the same elementwise expressions; a few differ in the last bit).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["TensorList", "is_number"]


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real Python number (not a bool): a scalar operand of the ops."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, without the slower ABC check
        return True
    return kind is not bool and isinstance(value, numbers.Real)


class TensorList:
    """A list of tensors with elementwise arithmetic (see the module docstring)."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    # Arithmetic: foreach ops where they exist for the operand kinds, else tensor by tensor.
    def __add__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_add, torch.add, self, other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_sub, torch.sub, self, other)

    def __rsub__(self, other: Any) -> TensorList:
        return -self + other  # exact: y - x and (-x) + y round the same in IEEE arithmetic

    def __mul__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_mul, torch.mul, self, other)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_div, torch.div, self, other)

    def __rtruediv__(self, other: Any) -> TensorList:
        if _operand(other, len(self)) is NotImplemented or not self.items:
            return _elementwise(lambda x, y: y / x, self, other)
        first = self.items[0]
        numerator = torch.as_tensor(other, dtype=first.dtype, device=first.device)
        return TensorList(torch._foreach_div([numerator] * len(self), self.items))

    def __pow__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_pow, torch.pow, self, other)

    def __rpow__(self, other: Any) -> TensorList:
        if isinstance(other, numbers.Real):
            return TensorList(torch._foreach_pow(float(other), self.items))
        return _elementwise(lambda x, y: y**x, self, other)

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.items))

    def __eq__(self, other: Any) -> TensorList:  # type: ignore[override]
        return _elementwise(torch.eq, self, other)

    def __gt__(self, other: Any) -> TensorList:
        return _elementwise(torch.gt, self, other)

    def __lt__(self, other: Any) -> TensorList:
        return _elementwise(torch.lt, self, other)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        batched = _FOREACH_FUNCTIONS.get(func)
        if batched is not None:
            result = batched(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return _elementwise(func, *args, **kwargs)


def _elementwise(func: Callable[..., Any], *args: Any, **kwargs: Any) -> TensorList:
    """Apply ``func`` tensor by tensor, indexing every TensorList argument."""
    count = next(len(a) for a in (*args, *kwargs.values()) if isinstance(a, TensorList))

    def pick(value: Any, index: int) -> Any:
        return value.items[index] if isinstance(value, TensorList) else value

    return TensorList(
        func(*(pick(a, i) for a in args), **{k: pick(v, i) for k, v in kwargs.items()})
        for i in range(count)
    )


def _operand(value: Any, count: int) -> Any:
    """The foreach form of an operand: a list, a Python scalar, or NotImplemented."""
    if isinstance(value, TensorList):
        return value.items
    if is_number(value):
        return value
    if isinstance(value, Tensor) and value.dim() == 0:
        # A shared (possibly learned) 0-d tensor: the list overload differentiates to it.
        return [value] * count
    return NotImplemented


def _binary(
    foreach_op: Callable[..., Any], op: Callable[..., Any], left: TensorList, right: Any
) -> TensorList:
    operand = _operand(right, len(left))
    if operand is NotImplemented:
        return _elementwise(op, left, right)
    return TensorList(foreach_op(left.items, operand))


def _lerp(start: Any, end: Any, weight: Any, **kwargs: Any) -> Any:
    if kwargs or not (isinstance(start, TensorList) and isinstance(end, TensorList)):
        return NotImplemented
    operand = _operand(weight, len(start))
    if operand is NotImplemented:
        return NotImplemented
    return TensorList(torch._foreach_lerp(start.items, end.items, operand))


def _unary(foreach_op: Callable[..., Any]) -> Callable[..., Any]:
    def apply(value: Any, **kwargs: Any) -> Any:
        if kwargs or not isinstance(value, TensorList):
            return NotImplemented
        return TensorList(foreach_op(value.items))

    return apply


def _maximum(left: Any, right: Any, **kwargs: Any) -> Any:
    if kwargs or not (isinstance(left, TensorList) and isinstance(right, TensorList)):
        return NotImplemented
    return TensorList(torch._foreach_maximum(left.items, right.items))


def _scaled(foreach_op: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.add``/``torch.sub`` of two lists with a number ``alpha``."""

    def apply(left: Any, right: Any, *, alpha: Any = 1) -> Any:
        if not (isinstance(left, TensorList) and isinstance(right, TensorList)):
            return NotImplemented
        if not is_number(alpha):
            return NotImplemented
        return TensorList(foreach_op(left.items, right.items, alpha=alpha))

    return apply


def _pointwise(foreach_op: Callable[..., Any]) -> Callable[..., Any]:
    """``addcmul``/``addcdiv`` over three lists with a number ``value``."""

    def apply(start: Any, first: Any, second: Any, *, value: Any = 1) -> Any:
        lists = (start, first, second)
        if not all(isinstance(t, TensorList) for t in lists):
            return NotImplemented
        if not is_number(value):
            return NotImplemented
        return TensorList(foreach_op(start.items, first.items, second.items, value=value))

    return apply


_FOREACH_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.lerp: _lerp,
    torch.add: _scaled(torch._foreach_add),
    torch.sub: _scaled(torch._foreach_sub),
    torch.addcmul: _pointwise(torch._foreach_addcmul),
    torch.addcdiv: _pointwise(torch._foreach_addcdiv),
    torch.maximum: _maximum,
    torch.sqrt: _unary(torch._foreach_sqrt),
    torch.abs: _unary(torch._foreach_abs),
    torch.sign: _unary(torch._foreach_sign),
}
