"""Adam and AdamW, with AMSGrad, maximize and decoupled weight decay (``torch.optim.Adam``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._versions import ADAM_DECOUPLED_WEIGHT_DECAY, require_torch
from ._checks import check_betas, check_nonnegative, check_type
from ._core import Hyperparameters, RuleSpec
from ._math import arithmetic, is_zero, new_step, safe_sqrt, step_value


class AdamState(NamedTuple):
    """State of :func:`adam` and :func:`adamw`; ``max_exp_avg_sq`` only with AMSGrad.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.adam().init({"w": torch.zeros(2)})
        >>> state._fields, state.max_exp_avg_sq
        (('step', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'), None)
        >>> hf.optim.adam(amsgrad=True).init({"w": torch.zeros(2)}).max_exp_avg_sq
        {'w': tensor([0., 0.])}
    """

    step: Any
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any = None


def _fields(hp: Hyperparameters) -> tuple[str, ...]:
    extra = ("max_exp_avg_sq",) if hp["amsgrad"] else ()
    return ("step", "exp_avg", "exp_avg_sq", *extra)


def _init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    state = {
        "step": new_step(param),
        "exp_avg": torch.zeros_like(param),
        "exp_avg_sq": torch.zeros_like(param),
    }
    if hp["amsgrad"]:
        state["max_exp_avg_sq"] = torch.zeros_like(param)
    return state


def apply_weight_decay(param: Tensor, grad: Tensor, hp: Hyperparameters) -> tuple[Tensor, Tensor]:
    """Adam-family weight decay: shrink the parameter (decoupled) or add to the gradient."""
    weight_decay = hp["weight_decay"]
    if is_zero(weight_decay):
        return param, grad
    if hp["decoupled_weight_decay"]:
        return param * (1 - hp["lr"] * weight_decay), grad
    return param, arithmetic(hp).add_scaled(grad, param, weight_decay)


def second_moment(exp_avg_sq: Tensor, grad: Tensor, beta2: Any, hp: Hyperparameters) -> Tensor:
    """``beta2 * v + (1 - beta2) * g * g``, as torch.optim's ``v.mul_(beta2).addcmul_(...)``."""
    return arithmetic(hp).add_product(exp_avg_sq * beta2, grad, grad, 1 - beta2)


def _update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    ops, lr, (beta1, beta2) = arithmetic(hp), hp["lr"], hp["betas"]
    if hp["maximize"]:
        grad = -grad
    param, grad = apply_weight_decay(param, grad, hp)
    step = state["step"] + 1
    exp_avg = ops.average(state["exp_avg"], grad, beta1)
    exp_avg_sq = second_moment(state["exp_avg_sq"], grad, beta2, hp)
    new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    normalizer = exp_avg_sq
    if hp["amsgrad"]:
        normalizer = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        new_state["max_exp_avg_sq"] = normalizer
    t = step_value(step)
    step_size = lr / (1 - beta1**t)
    denom = safe_sqrt(normalizer) / (1 - beta2**t) ** 0.5 + hp["eps"]
    return ops.sub_ratio(param, exp_avg, denom, step_size), new_state


def validate_adam_family(hp: Hyperparameters) -> None:
    """torch.optim's checks shared by Adam, AdamW, Adamax, NAdam and RAdam."""
    check_nonnegative(hp, "lr", "learning rate")
    check_nonnegative(hp, "eps", "epsilon value")
    check_betas(hp)
    check_nonnegative(hp, "weight_decay", "weight_decay value")
    check_type(hp, "maximize", bool)


def _validate_options(hp: Hyperparameters) -> None:
    validate_adam_family(hp)
    check_type(hp, "amsgrad", bool)
    check_type(hp, "decoupled_weight_decay", bool)


def _validate(hp: Hyperparameters) -> None:
    _validate_options(hp)
    if hp["decoupled_weight_decay"]:
        # An older torch.optim.Adam ignores the key in a parameter group: refuse rather than
        # differ from it.
        require_torch(
            ADAM_DECOUPLED_WEIGHT_DECAY,
            "Adam's decoupled_weight_decay=True",
            instead="use AdamW (torch.optim.AdamW / higher_func.optim.adamw), the same update",
        )


def _validate_adamw(hp: Hyperparameters) -> None:
    _validate_options(hp)
    if hp["decoupled_weight_decay"] is not True:
        raise ValueError(
            "adamw() always decouples weight decay (decoupled_weight_decay=True), as "
            "torch.optim.AdamW does; for L2 weight decay use adam(weight_decay=...)."
        )


ADAM = RuleSpec(
    name="adam",
    torch_class=torch.optim.Adam,
    state_type=AdamState,
    fields=_fields,
    init=_init,
    update=_update,
    validate=_validate,
    static=frozenset({"amsgrad"}),
    elementwise=True,
)

ADAMW = RuleSpec(
    name="adamw",
    torch_class=torch.optim.AdamW,
    state_type=AdamState,
    defaults={"decoupled_weight_decay": True},  # fixed: adamw() has no such option
    fields=_fields,
    init=_init,
    update=_update,
    validate=_validate_adamw,
    static=frozenset({"amsgrad"}),
    elementwise=True,
)
