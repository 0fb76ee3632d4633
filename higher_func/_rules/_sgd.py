"""SGD with momentum, dampening, Nesterov, weight decay and maximize (``torch.optim.SGD``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import check, check_nonnegative, check_type, numbers_in
from ._core import Hyperparameters, RuleSpec
from ._math import arithmetic, is_zero, new_step, step_value


class SGDState(NamedTuple):
    """State of :func:`sgd`; ``None`` fields when ``momentum == 0``.

    ``step`` counts updates; it is what tells the first step (where torch seeds the
    buffer with the gradient itself, undamped) from the others.

    Example:
        >>> import torch, higher_func as hf
        >>> hf.optim.sgd().init({"w": torch.zeros(2)})
        SGDState(momentum_buffer=None, step=None)
        >>> hf.optim.sgd(momentum=0.9).init({"w": torch.zeros(2)}).momentum_buffer
        {'w': tensor([0., 0.])}
    """

    momentum_buffer: Any = None
    step: Any = None


def _fields(hp: Hyperparameters) -> tuple[str, ...]:
    return () if is_zero(hp["momentum"]) else ("momentum_buffer", "step")


def _init(param: Tensor, hp: Hyperparameters) -> dict[str, Tensor]:
    if is_zero(hp["momentum"]):
        return {}
    return {"momentum_buffer": torch.zeros_like(param), "step": new_step(param)}


def _update(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    ops = arithmetic(hp)
    if hp["maximize"]:
        grad = -grad
    if not is_zero(hp["weight_decay"]):
        grad = ops.add_scaled(grad, param, hp["weight_decay"])
    if state:
        momentum, dampening, step = hp["momentum"], hp["dampening"], state["step"]
        # torch seeds the buffer with the first gradient, undamped: 0 * m + 1 * g == g.
        undamped = 1.0 if is_zero(dampening) else 1 - dampening * _clamp_to_one(step_value(step))
        buffer = ops.add_scaled(state["momentum_buffer"] * momentum, grad, undamped)
        grad = ops.add_scaled(grad, buffer, momentum) if hp["nesterov"] else buffer
        state = {"momentum_buffer": buffer, "step": step + 1}
    return ops.sub_scaled(param, grad, hp["lr"]), state


def _clamp_to_one(t: Any) -> Any:
    return min(t, 1.0) if isinstance(t, float) else torch.clamp(t, max=1)


def _validate(hp: Hyperparameters) -> None:
    check_nonnegative(hp, "lr", "learning rate")
    check_nonnegative(hp, "momentum", "momentum value")
    check_nonnegative(hp, "weight_decay", "weight_decay value")
    check_type(hp, "nesterov", bool)
    check_type(hp, "maximize", bool)
    if hp["nesterov"]:
        no_momentum = is_zero(hp["momentum"])
        damped = any(v != 0 for v in numbers_in(hp["dampening"]))
        check(
            not no_momentum and not damped,
            "Nesterov momentum requires a momentum and zero dampening",
        )


def _import_state(torch_state: Any, fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    buffer = torch_state.get("momentum_buffer")
    if not fresh or buffer is None:
        return fresh
    return {"momentum_buffer": buffer, "step": fresh["step"] + 1}


SGD = RuleSpec(
    name="sgd",
    torch_class=torch.optim.SGD,
    state_type=SGDState,
    fields=_fields,
    init=_init,
    update=_update,
    validate=_validate,
    import_state=_import_state,
    elementwise=True,
    sparse_grads=True,
)
