"""Adamax, NAdam and RAdam (``torch.optim.Adamax``, ``NAdam``, ``RAdam``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._adagrad import prepare_grad
from ._adam import apply_weight_decay, second_moment, validate_adam_family
from ._checks import check_nonnegative, check_type
from ._core import Hyperparameters, RuleSpec
from ._math import (
    arithmetic,
    in_dtype_of,
    new_scalar,
    new_step,
    safe_sqrt,
    step_value,
    where,
)


def _moments_init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    return {
        "step": new_step(param),
        "exp_avg": torch.zeros_like(param),
        "exp_avg_sq": torch.zeros_like(param),
    }


def _moments(grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters) -> tuple[Tensor, Tensor]:
    beta1, beta2 = hp["betas"]
    exp_avg = arithmetic(hp).average(state["exp_avg"], grad, beta1)
    return exp_avg, second_moment(state["exp_avg_sq"], grad, beta2, hp)


def _maximized(grad: Tensor, hp: Hyperparameters) -> Tensor:
    return -grad if hp["maximize"] else grad


# --------------------------------------------------------------------------- Adamax


class AdamaxState(NamedTuple):
    """State of :func:`adamax`: first moment and exponentially weighted infinity norm.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.adamax().init({"w": torch.zeros(2)})
        >>> state._fields
        ('step', 'exp_avg', 'exp_inf')
    """

    step: Any
    exp_avg: Any
    exp_inf: Any


def _adamax_init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    zeros = torch.zeros_like(param)
    return {"step": new_step(param), "exp_avg": zeros, "exp_inf": zeros}


def _adamax_update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    ops, (beta1, beta2) = arithmetic(hp), hp["betas"]
    grad = prepare_grad(param, grad, hp)
    step = state["step"] + 1
    exp_avg = ops.average(state["exp_avg"], grad, beta1)
    exp_inf = torch.maximum(state["exp_inf"] * beta2, torch.abs(grad) + hp["eps"])
    step_size = hp["lr"] / (1 - beta1 ** step_value(step))
    new_state = {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}
    return ops.sub_ratio(param, exp_avg, exp_inf, step_size), new_state


ADAMAX = RuleSpec(
    name="adamax",
    torch_class=torch.optim.Adamax,
    state_type=AdamaxState,
    fields=lambda hp: ("step", "exp_avg", "exp_inf"),
    init=_adamax_init,
    update=_adamax_update,
    validate=validate_adam_family,
    elementwise=True,
)


# --------------------------------------------------------------------------- NAdam


class NAdamState(NamedTuple):
    """State of :func:`nadam`: moments, step and the running product of momentum factors.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.nadam().init({"w": torch.zeros(2)})
        >>> state._fields, state.mu_product["w"]
        (('step', 'mu_product', 'exp_avg', 'exp_avg_sq'), tensor(1.))
    """

    step: Any
    mu_product: Any
    exp_avg: Any
    exp_avg_sq: Any


def _nadam_init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    state = _moments_init(param, hp)
    state["mu_product"] = new_scalar(param, 1.0)
    return state


def _nadam_update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    ops, lr, (beta1, beta2), decay = arithmetic(hp), hp["lr"], hp["betas"], hp["momentum_decay"]
    step = state["step"] + 1
    t = step_value(step)
    param, grad = apply_weight_decay(param, _maximized(grad, hp), hp)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * decay))
    mu_product = state["mu_product"] * in_dtype_of(mu, state["mu_product"])
    product = step_value(mu_product)
    exp_avg, exp_avg_sq = _moments(grad, state, hp)
    denom = safe_sqrt(exp_avg_sq / (1 - beta2**t)) + hp["eps"]
    param = ops.sub_ratio(param, grad, denom, lr * (1.0 - mu) / (1.0 - product))
    param = ops.sub_ratio(param, exp_avg, denom, lr * mu_next / (1.0 - product * mu_next))
    new_state = {
        "step": step,
        "mu_product": mu_product,
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }
    return param, new_state


def _nadam_validate(hp: Hyperparameters) -> None:
    validate_adam_family(hp)
    check_nonnegative(hp, "momentum_decay", "momentum_decay value")
    check_type(hp, "decoupled_weight_decay", bool)


NADAM = RuleSpec(
    name="nadam",
    torch_class=torch.optim.NAdam,
    state_type=NAdamState,
    fields=lambda hp: ("step", "mu_product", "exp_avg", "exp_avg_sq"),
    init=_nadam_init,
    update=_nadam_update,
    validate=_nadam_validate,
    elementwise=True,
)


# --------------------------------------------------------------------------- RAdam


class RAdamState(NamedTuple):
    """State of :func:`radam`: moments and step.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.radam().init({"w": torch.zeros(2)})
        >>> state._fields
        ('step', 'exp_avg', 'exp_avg_sq')
    """

    step: Any
    exp_avg: Any
    exp_avg_sq: Any


def _radam_update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    lr, (beta1, beta2) = hp["lr"], hp["betas"]
    step = state["step"] + 1
    t = step_value(step)
    param, grad = apply_weight_decay(param, _maximized(grad, hp), hp)
    exp_avg, exp_avg_sq = _moments(grad, state, hp)
    new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    bias_correction2 = 1 - beta2**t
    momentum_step = exp_avg / (1 - beta1**t) * lr
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2**t) / bias_correction2
    rectify = rho_t > 5.0
    if rectify is False:  # a read step count: Python decides, as in torch
        return param - momentum_step, new_state
    # The variance is tractable only when rho_t > 5; elsewhere the square root's argument
    # may be negative, so it is replaced by 1 before (not after) the root: no nan gradient.
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    rect = ratio**0.5 if rectify is True else torch.sqrt(where(rectify, ratio, 1.0))
    adaptive_lr = bias_correction2**0.5 / (safe_sqrt(exp_avg_sq) + hp["eps"])
    update = where(rectify, momentum_step * adaptive_lr * rect, momentum_step)
    return param - update, new_state


def _radam_validate(hp: Hyperparameters) -> None:
    validate_adam_family(hp)
    check_type(hp, "decoupled_weight_decay", bool)


RADAM = RuleSpec(
    name="radam",
    torch_class=torch.optim.RAdam,
    state_type=RAdamState,
    fields=lambda hp: ("step", "exp_avg", "exp_avg_sq"),
    init=_moments_init,
    update=_radam_update,
    validate=_radam_validate,
    elementwise=True,
)
