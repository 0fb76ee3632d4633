"""Adagrad and Adadelta (``torch.optim.Adagrad``, ``torch.optim.Adadelta``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import check, check_nonnegative, check_type, numbers_in
from ._core import Hyperparameters, RuleSpec
from ._math import arithmetic, is_zero, new_step, safe_sqrt, step_value


def prepare_grad(param: Tensor, grad: Tensor, hp: Hyperparameters) -> Tensor:
    """The gradient after ``maximize`` and coupled (L2) weight decay, as torch.optim does."""
    if hp["maximize"]:
        grad = -grad
    if not is_zero(hp["weight_decay"]):
        grad = arithmetic(hp).add_scaled(grad, param, hp["weight_decay"])
    return grad


class AdagradState(NamedTuple):
    """State of :func:`adagrad`: the sum of squared gradients and the step count.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.adagrad(initial_accumulator_value=0.5).init({"w": torch.zeros(2)})
        >>> state._fields, state.sum["w"]
        (('step', 'sum'), tensor([0.5000, 0.5000]))
    """

    step: Any
    sum: Any


def _adagrad_init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    return {
        "step": new_step(param),
        "sum": torch.zeros_like(param) + hp["initial_accumulator_value"],
    }


def _adagrad_update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    ops, step = arithmetic(hp), state["step"] + 1
    grad = prepare_grad(param, grad, hp)
    lr = hp["lr"] / (1 + (step_value(step) - 1) * hp["lr_decay"])
    total = ops.add_product(state["sum"], grad, grad, 1)
    std = safe_sqrt(total) + hp["eps"]
    return ops.sub_ratio(param, grad, std, lr), {"step": step, "sum": total}


def _adagrad_validate(hp: Hyperparameters) -> None:
    check_nonnegative(hp, "lr", "learning rate")
    check_nonnegative(hp, "lr_decay", "lr_decay value")
    check_nonnegative(hp, "weight_decay", "weight_decay value")
    check_nonnegative(hp, "initial_accumulator_value", "initial_accumulator_value value")
    check_nonnegative(hp, "eps", "epsilon value")
    check_type(hp, "maximize", bool)


ADAGRAD = RuleSpec(
    name="adagrad",
    torch_class=torch.optim.Adagrad,
    state_type=AdagradState,
    fields=lambda hp: ("step", "sum"),
    init=_adagrad_init,
    update=_adagrad_update,
    validate=_adagrad_validate,
    init_only=frozenset({"initial_accumulator_value"}),
    elementwise=True,
    sparse_grads=True,
)


class AdadeltaState(NamedTuple):
    """State of :func:`adadelta`: running averages of squared gradients and updates.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.adadelta().init({"w": torch.zeros(2)})
        >>> state._fields
        ('step', 'square_avg', 'acc_delta')
    """

    step: Any
    square_avg: Any
    acc_delta: Any


def _adadelta_init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    zeros = torch.zeros_like(param)
    return {"step": new_step(param), "square_avg": zeros, "acc_delta": zeros}


def _adadelta_update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    ops, rho, eps = arithmetic(hp), hp["rho"], hp["eps"]
    grad = prepare_grad(param, grad, hp)
    square_avg = ops.add_product(state["square_avg"] * rho, grad, grad, 1 - rho)
    std = safe_sqrt(square_avg + eps)
    delta = safe_sqrt(state["acc_delta"] + eps) / std * grad
    acc_delta = ops.add_product(state["acc_delta"] * rho, delta, delta, 1 - rho)
    new_state = {"step": state["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}
    return ops.sub_scaled(param, delta, hp["lr"]), new_state


def _adadelta_validate(hp: Hyperparameters) -> None:
    check_nonnegative(hp, "lr", "learning rate")
    for rho in numbers_in(hp["rho"]):
        check(0.0 <= rho <= 1.0, f"Invalid rho value: {rho}")
    check_nonnegative(hp, "eps", "epsilon value")
    check_nonnegative(hp, "weight_decay", "weight_decay value")
    check_type(hp, "maximize", bool)


ADADELTA = RuleSpec(
    name="adadelta",
    torch_class=torch.optim.Adadelta,
    state_type=AdadeltaState,
    fields=lambda hp: ("step", "square_avg", "acc_delta"),
    init=_adadelta_init,
    update=_adadelta_update,
    validate=_adadelta_validate,
    elementwise=True,
)
