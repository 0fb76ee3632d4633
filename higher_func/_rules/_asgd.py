"""Averaged SGD (``torch.optim.ASGD``), including the averaged iterate ``ax``."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._adagrad import prepare_grad
from ._checks import check_nonnegative, check_type
from ._core import Hyperparameters, RuleSpec
from ._math import arithmetic, in_dtype_of, new_scalar, new_step, step_value, where


class ASGDState(NamedTuple):
    """State of :func:`asgd`: step, learning rate ``eta``, averaging rate ``mu``, average ``ax``.

    Example:
        >>> import torch, higher_func as hf
        >>> state = hf.optim.asgd(lr=0.01).init({"w": torch.zeros(2)})
        >>> state._fields, state.eta["w"], state.ax["w"]
        (('step', 'eta', 'mu', 'ax'), tensor(0.0100), tensor([0., 0.]))
    """

    step: Any
    eta: Any
    mu: Any
    ax: Any


def _init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    return {
        "step": new_step(param),
        "eta": new_scalar(param, hp["lr"]),
        "mu": new_scalar(param, 1.0),
        "ax": torch.zeros_like(param),
    }


def _update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    lr, lambd, mu = hp["lr"], hp["lambd"], state["mu"]
    step = state["step"] + 1
    grad = prepare_grad(param, grad, hp)
    eta = step_value(state["eta"])
    param = arithmetic(hp).sub_scaled(param * (1 - lambd * eta), grad, eta)
    # The average is taken of the *updated* parameter (higher averaged the old one).
    ax = state["ax"]
    ax = where(step_value(mu) == 1, param, ax + (param - ax) * mu)
    # eta and mu are kept in torch's scalar dtype (float32 under a float32 default dtype).
    t = step_value(step)
    new_mu = (
        1 / max(1.0, t - hp["t0"])
        if isinstance(t, float)
        else 1 / torch.clamp(step - hp["t0"], min=1)
    )
    new_state = {
        "step": step,
        "eta": _like(state["eta"], lr / ((1 + lambd * lr * t) ** hp["alpha"])),
        "mu": _like(mu, new_mu),
        "ax": ax,
    }
    return param, new_state


def _like(scalar_state: Any, value: Any) -> Any:
    """``value`` as a tensor of ``scalar_state``'s dtype (a tensor keeps its graph)."""
    if isinstance(value, float):
        return torch.full_like(scalar_state, value)
    return in_dtype_of(value, scalar_state)


def _validate(hp: Hyperparameters) -> None:
    check_nonnegative(hp, "lr", "learning rate")
    check_nonnegative(hp, "weight_decay", "weight_decay value")
    check_type(hp, "maximize", bool)


ASGD = RuleSpec(
    name="asgd",
    torch_class=torch.optim.ASGD,
    state_type=ASGDState,
    fields=lambda hp: ("step", "eta", "mu", "ax"),
    init=_init,
    update=_update,
    validate=_validate,
    elementwise=True,
)
