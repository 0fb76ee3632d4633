"""Averaged SGD (``torch.optim.ASGD``), including the averaged iterate ``ax``."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._adagrad import prepare_grad
from ._core import Hyperparameters, RuleSpec, check_nonnegative, check_type, new_step


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
    step = new_step(param)
    return {
        "step": step,
        "eta": torch.ones_like(step) * hp["lr"],
        "mu": torch.ones_like(step),
        "ax": torch.zeros_like(param),
    }


def _update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    lr, lambd, eta, mu = hp["lr"], hp["lambd"], state["eta"], state["mu"]
    step = state["step"] + 1
    grad = prepare_grad(param, grad, hp)
    param = param * (1 - lambd * eta) - eta * grad
    # The average is taken of the *updated* parameter (higher averaged the old one).
    ax = state["ax"]
    ax = torch.where(mu == 1, param, ax + (param - ax) * mu)
    new_state = {
        "step": step,
        "eta": lr / ((1 + lambd * lr * step) ** hp["alpha"]),
        "mu": 1 / torch.clamp(step - hp["t0"], min=1),
        "ax": ax,
    }
    return param, new_state


def _validate(hp: Hyperparameters) -> None:
    check_nonnegative(hp, "lr", "learning rate")
    check_nonnegative(hp, "weight_decay", "weight_decay value")
    check_type(hp, "maximize", bool)


ASGD = RuleSpec(
    name="asgd",
    torch_class=torch.optim.ASGD,
    state_type=ASGDState,
    defaults={
        "lr": 1e-2,
        "lambd": 1e-4,
        "alpha": 0.75,
        "t0": 1e6,
        "weight_decay": 0.0,
        "maximize": False,
    },
    fields=lambda hp: ("step", "eta", "mu", "ax"),
    init=_init,
    update=_update,
    validate=_validate,
    elementwise=True,
)
