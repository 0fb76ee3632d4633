"""RMSprop (centered, with momentum) and Rprop (``torch.optim.RMSprop``, ``torch.optim.Rprop``)."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._adagrad import prepare_grad
from ._checks import check, check_nonnegative, check_type, numbers_in
from ._core import Hyperparameters, RuleSpec
from ._math import arithmetic, is_zero, new_step, safe_sqrt


class RMSpropState(NamedTuple):
    """State of :func:`rmsprop`; ``momentum_buffer`` with momentum, ``grad_avg`` if centered.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.rmsprop(centered=True).init({"w": torch.zeros(2)})
        >>> state._fields, state.momentum_buffer, state.grad_avg
        (('step', 'square_avg', 'momentum_buffer', 'grad_avg'), None, {'w': tensor([0., 0.])})
    """

    step: Any
    square_avg: Any
    momentum_buffer: Any = None
    grad_avg: Any = None


def _rmsprop_fields(hp: Hyperparameters) -> tuple[str, ...]:
    momentum = () if is_zero(hp["momentum"]) else ("momentum_buffer",)
    centered = ("grad_avg",) if hp["centered"] else ()
    return ("step", "square_avg", *momentum, *centered)


def _rmsprop_init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    state = {"step": new_step(param)}
    for field in _rmsprop_fields(hp)[1:]:
        state[field] = torch.zeros_like(param)
    return state


def _rmsprop_update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    ops, alpha = arithmetic(hp), hp["alpha"]
    grad = prepare_grad(param, grad, hp)
    square_avg = ops.add_product(state["square_avg"] * alpha, grad, grad, 1 - alpha)
    new_state = {"step": state["step"] + 1, "square_avg": square_avg}
    if "grad_avg" in state:
        grad_avg = ops.average(state["grad_avg"], grad, alpha)
        new_state["grad_avg"] = grad_avg
        avg = safe_sqrt(ops.add_product(square_avg, grad_avg, grad_avg, -1)) + hp["eps"]
    else:
        avg = safe_sqrt(square_avg) + hp["eps"]
    if "momentum_buffer" in state:
        buffer = ops.sub_ratio(state["momentum_buffer"] * hp["momentum"], grad, avg, -1)
        new_state["momentum_buffer"] = buffer
        return ops.sub_scaled(param, buffer, hp["lr"]), new_state
    return ops.sub_ratio(param, grad, avg, hp["lr"]), new_state


def _rmsprop_validate(hp: Hyperparameters) -> None:
    check_nonnegative(hp, "lr", "learning rate")
    check_nonnegative(hp, "eps", "epsilon value")
    check_nonnegative(hp, "momentum", "momentum value")
    check_nonnegative(hp, "weight_decay", "weight_decay value")
    check_nonnegative(hp, "alpha", "alpha value")
    check_type(hp, "centered", bool)
    check_type(hp, "maximize", bool)


RMSPROP = RuleSpec(
    name="rmsprop",
    torch_class=torch.optim.RMSprop,
    state_type=RMSpropState,
    fields=_rmsprop_fields,
    init=_rmsprop_init,
    update=_rmsprop_update,
    validate=_rmsprop_validate,
    static=frozenset({"centered"}),
    elementwise=True,
)


class RpropState(NamedTuple):
    """State of :func:`rprop`: the previous gradient and the per-element step sizes.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.rprop(lr=0.01).init({"w": torch.zeros(2)})
        >>> state._fields, state.step_size["w"]
        (('step', 'prev', 'step_size'), tensor([0.0100, 0.0100]))
    """

    step: Any
    prev: Any
    step_size: Any


def _rprop_init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    return {
        "step": new_step(param),
        "prev": torch.zeros_like(param),
        "step_size": torch.zeros_like(param) + hp["lr"],
    }


def _clamp(x: Tensor, low: Any, high: Any) -> Tensor:
    if isinstance(low, numbers.Number) and isinstance(high, numbers.Number):
        return torch.clamp(x, float(low), float(high))  # type: ignore[arg-type]
    return torch.minimum(torch.maximum(x, torch.as_tensor(low)), torch.as_tensor(high))


def _rprop_update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    (eta_minus, eta_plus), (size_min, size_max) = hp["etas"], hp["step_sizes"]
    if hp["maximize"]:
        grad = -grad
    sign = torch.sign(grad * state["prev"])
    one = torch.ones_like(sign)
    factor = torch.where(sign > 0, eta_plus, torch.where(sign < 0, eta_minus, one))
    step_size = _clamp(state["step_size"] * factor, size_min, size_max)
    # Like torch: where the gradient changed sign, skip this update and forget the gradient.
    grad = torch.where(factor == eta_minus, torch.zeros_like(grad), grad)
    new_state = {"step": state["step"] + 1, "prev": grad, "step_size": step_size}
    return param - torch.sign(grad) * step_size, new_state


def _rprop_validate(hp: Hyperparameters) -> None:
    check_nonnegative(hp, "lr", "learning rate")
    etas = hp["etas"]
    if not (isinstance(etas, tuple | list) and len(etas) == 2):
        raise ValueError(f"etas must be a pair (etaminus, etaplus), got {etas!r}.")
    minus, plus = (list(numbers_in(e)) for e in etas)
    if minus and plus:
        check(0.0 < minus[0] < 1.0 < plus[0], f"Invalid eta values: {minus[0]}, {plus[0]}")
    sizes = hp["step_sizes"]
    if not (isinstance(sizes, tuple | list) and len(sizes) == 2):
        raise ValueError(f"step_sizes must be a pair (min, max), got {sizes!r}.")
    check_type(hp, "maximize", bool)


RPROP = RuleSpec(
    name="rprop",
    torch_class=torch.optim.Rprop,
    state_type=RpropState,
    fields=lambda hp: ("step", "prev", "step_size"),
    init=_rprop_init,
    update=_rprop_update,
    validate=_rprop_validate,
    init_only=frozenset({"lr"}),
    elementwise=True,
)
