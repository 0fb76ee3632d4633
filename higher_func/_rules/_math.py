"""The arithmetic every rule kernel shares: op forms, step-derived scalars, ``safe_sqrt``.

**Which ops a step runs** is decided here, once, by the rule's ``arithmetic``:

* ``"torch"`` (the pure rules' default): ``torch.optim``'s own single-tensor ops, the fused
  ``add``/``sub`` with ``alpha``, ``addcmul``, ``addcdiv`` and ``lerp`` for first moments.
  Plain SGD then equals ``torch.optim.SGD`` bit for bit; every rule equals torch.optim in
  float64 to rounding.
* ``"higher"`` (what the drop-in :func:`higher_func.innerloop_ctx` and the
  ``Differentiable*`` optimizers use): the two-op forms of ``higher`` 0.2.1 (and of
  hand-written MAML, learn2learn and ``torch.func``'s MAML example): ``x + a * y``,
  ``x + v * a * b``, ``x + v * (a / b)`` and moving averages ``m * beta + (1 - beta) * g``
  (``x + 1 * y`` runs as ``x + y``: multiplying by 1 is exact; SGD-momentum without
  dampening ran 1.03-1.04x faster per iteration on the sinusoid and ResNet-18).
  A migrated program's float32 trace then does not move.  The formulas stay torch.optim's
  (float64 parity is unchanged): where higher 0.2.1 used another formula (Adam's ``eps``
  added before the bias correction, as torch < 1.5 did), torch.optim's is kept.

A fused op rounds once where the two-op form rounds twice; the two differ in the last bit of
some elements, which a ReLU or max-pool downstream can turn into a visible drift over an
unrolled inner loop.  When a factor is a tensor (a learned hyperparameter), both arithmetics
use the two-op form (torch's fused ops take numbers only).

**Scalars derived from the step count** (bias corrections, NAdam's momentum schedule,
RAdam's rectification) are computed as torch.optim computes them: in Python floats from the
step count when it can be read for free (a CPU tensor outside ``vmap``/``torch.compile``),
else from the step tensor, which is float32 or float64 (see :func:`scalar_dtype`), never
in a bfloat16 or float16 parameter's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .._execution import derivative_wanted, forward_ad_active, one_pass_sqrt_pays, traced
from ._tensor_list import TensorList, is_number

__all__ = ["TORCH", "HIGHER", "ARITHMETICS", "arithmetic", "safe_sqrt"]

TORCH = "torch"
HIGHER = "higher"
ARITHMETICS = (TORCH, HIGHER)
#: The key under which :meth:`Rule.step` hands a non-default arithmetic to the kernel.
ARITHMETIC_KEY = "arithmetic"


class TorchOps:
    """``torch.optim``'s single-tensor ops (fused where the factor is a number)."""

    @staticmethod
    def add_scaled(x: Any, y: Any, alpha: Any) -> Any:
        """``x + alpha * y`` (torch: ``x.add(y, alpha=alpha)``)."""
        return torch.add(x, y, alpha=alpha) if is_number(alpha) else x + alpha * y

    @staticmethod
    def sub_scaled(x: Any, y: Any, alpha: Any) -> Any:
        """``x - alpha * y`` (torch: ``x.add_(y, alpha=-alpha)``)."""
        return torch.sub(x, y, alpha=alpha) if is_number(alpha) else x - alpha * y

    @staticmethod
    def add_product(x: Any, a: Any, b: Any, value: Any) -> Any:
        """``x + value * a * b`` (torch: ``x.addcmul_(a, b, value=value)``)."""
        return torch.addcmul(x, a, b, value=value) if is_number(value) else x + value * a * b

    @staticmethod
    def sub_ratio(x: Any, a: Any, b: Any, value: Any) -> Any:
        """``x - value * (a / b)`` (torch: ``x.addcdiv_(a, b, value=-value)``)."""
        return torch.addcdiv(x, a, b, value=-value) if is_number(value) else x - value * (a / b)

    @staticmethod
    def average(avg: Any, x: Any, beta: Any) -> Any:
        """``beta * avg + (1 - beta) * x`` (torch: ``avg.lerp_(x, 1 - beta)``)."""
        return torch.lerp(avg, x, 1 - beta)


class HigherOps:
    """``higher`` 0.2.1's two-op forms (``_add``, ``_addcmul``, ``_addcdiv``)."""

    @staticmethod
    def add_scaled(x: Any, y: Any, alpha: Any) -> Any:
        return x + y if _is_one(alpha) else x + alpha * y

    @staticmethod
    def sub_scaled(x: Any, y: Any, alpha: Any) -> Any:
        # Bit for bit higher's x + (-alpha) * y: negation is exact.
        return x - y if _is_one(alpha) else x - alpha * y

    @staticmethod
    def add_product(x: Any, a: Any, b: Any, value: Any) -> Any:
        return x + value * a * b

    @staticmethod
    def sub_ratio(x: Any, a: Any, b: Any, value: Any) -> Any:
        return x - value * (a / b)

    @staticmethod
    def average(avg: Any, x: Any, beta: Any) -> Any:
        return avg * beta + (1 - beta) * x


def _is_one(alpha: Any) -> bool:
    """Whether a factor is the number 1: ``1 * y`` is ``y`` bit for bit (and so is its
    derivative), so higher's ``x + 1 * y`` (SGD-momentum without dampening) skips the
    multiplication, one op and one autograd node fewer per tensor."""
    kind = type(alpha)
    return (kind is float or kind is int) and alpha == 1


_OPS = {TORCH: TorchOps, HIGHER: HigherOps}


def arithmetic(hp: Any) -> type[TorchOps] | type[HigherOps]:
    """The op forms a kernel runs with: those the rule was built with (see the module doc)."""
    return HigherOps if hp.get(ARITHMETIC_KEY) == HIGHER else TorchOps


# --------------------------------------------------------------------------- scalars


def scalar_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a parameter's scalar state (step count, NAdam's ``mu_product``, ASGD's
    ``eta`` and ``mu``): torch.optim's (float32, or float64 under a float64 default dtype),
    or float64 for a float64 parameter.

    bfloat16 and float16 parameters thus count past 256 and 2048 steps, as in torch.  For
    float64 parameters under a float32 default dtype torch.optim keeps ``mu_product``,
    ``eta`` and ``mu`` in float32, which moves NAdam by about 2e-9 and ASGD by about 6e-7
    (relative) and would limit gradients through them (learned betas, ``lr``) to float32
    precision; the rules keep them in float64 there.  Under a float64 default dtype the two
    agree exactly.
    """
    if param.dtype == torch.float64 or torch.get_default_dtype() == torch.float64:
        return torch.float64
    return torch.float32


def new_step(param: Tensor) -> Tensor:
    """A fresh per-parameter step counter: a 0-d tensor of :func:`scalar_dtype`."""
    return torch.zeros((), dtype=scalar_dtype(param), device=param.device)


def new_scalar(param: Tensor, value: Any) -> Tensor:
    """A 0-d scalar state of :func:`scalar_dtype` holding ``value`` (a number or 0-d tensor)."""
    return torch.zeros((), dtype=scalar_dtype(param), device=param.device) + value


def in_dtype_of(value: Any, scalar_state: Any) -> Any:
    """A tensor ``value`` cast to ``scalar_state``'s dtype (numbers as they are): an update of
    scalar state keeps torch.optim's dtype, as its in-place update does."""
    if isinstance(scalar_state, TensorList):
        values = value.items if isinstance(value, TensorList) else [value] * len(scalar_state)
        return TensorList(
            in_dtype_of(v, s) for v, s in zip(values, scalar_state.items, strict=True)
        )
    return value.to(scalar_state.dtype) if isinstance(value, Tensor) else value


def step_value(step: Any) -> Any:
    """A 0-d state tensor as a Python float where reading it is free, else the tensor itself.

    Bias corrections such as ``1 - beta1 ** t`` then cost Python arithmetic instead of
    several tiny tensor ops per parameter, with the same double-precision result that
    ``torch.optim`` computes.  A :class:`TensorList` of equal CPU values reads as one float.
    Accelerator tensors (reading them would synchronise) and tensors inside
    ``vmap``/``torch.compile`` or forward-mode AD stay tensors.
    """
    if isinstance(step, TensorList):
        items = step.items
        if items and all(_readable(t) for t in items):
            values = {t.item() for t in items}
            if len(values) == 1:
                return values.pop()
        return step
    if isinstance(step, Tensor) and _readable(step):
        return step.item()
    return step


def _readable(t: Tensor) -> bool:
    """A CPU value that is no one's input to differentiate (reading it would cut a graph)."""
    if t.requires_grad or t.device.type != "cpu" or traced(t):
        return False
    return not _has_tangent(t)


def where(condition: Any, when_true: Any, when_false: Any) -> Any:
    """``torch.where`` that takes Python's branch for a Python condition (a read step)."""
    if isinstance(condition, bool):
        return when_true if condition else when_false
    return torch.where(condition, when_true, when_false)


def is_zero(value: Any) -> bool:
    """Whether a hyperparameter is the number 0 (tensors never count: they may be learned)."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, without the slower ABC check
        return value == 0
    return is_number(value) and value == 0


def _has_tangent(t: Tensor) -> bool:
    return forward_ad_active() and forward_ad.unpack_dual(t).tangent is not None


# --------------------------------------------------------------------------- safe_sqrt


def safe_sqrt(x: Any) -> Any:
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 instead of infinity.

    ``torch.sqrt`` has an infinite derivative at 0; through an optimizer step that
    becomes ``inf * 0 = nan`` for a parameter whose gradient (hence second moment) is
    exactly zero.  The value is unchanged everywhere, the derivative too for ``x > 0``,
    and negative inputs still give ``nan`` as in ``torch.sqrt``.  No hooks are involved,
    so it holds to every order, in reverse and forward mode (``forward_ad``, ``jvp``,
    ``jacfwd``), under ``vmap`` and under ``torch.compile``.

    Example:
        >>> import torch
        >>> from higher_func.optim import safe_sqrt
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> torch.autograd.grad(safe_sqrt(x).sum(), x)[0]
        tensor([0.0000, 0.2500])
    """
    if isinstance(x, TensorList):
        if not derivative_wanted(x.items):
            return TensorList(torch._foreach_sqrt(x.items))
        return TensorList([_safe_sqrt(t) for t in x.items])
    return _safe_sqrt(x)


def _safe_sqrt(x: Tensor) -> Tensor:
    if not derivative_wanted([x]):
        return torch.sqrt(x)
    if one_pass_sqrt_pays(x):
        return _RecordedSafeSqrt.apply(x)  # plain reverse mode, a large tensor: one pass
    zero = x == 0  # the form every transform knows (forward mode, vmap, grad, compile)
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, x)))


class _RecordedSafeSqrt(torch.autograd.Function):
    """``safe_sqrt`` of a large tensor while autograd records in reverse mode (see
    ``_execution.one_pass_sqrt_pays``): ``torch.sqrt`` forward, one pass where the ``where``
    form takes four (BERT-tiny's Adam step spent a quarter of its time there), and the
    ``where`` form's derivative bit for bit, ``torch.sqrt``'s
    ``grad / (2 * result)`` with 0 where the input is 0.  The backward is itself made of
    recorded ops, so it differentiates again to every order (the second derivative is 0
    at 0 as well)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        result = torch.sqrt(x)
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (result,) = ctx.saved_tensors
        return torch.where(result == 0, 0.0, grad / (2 * result))  # sqrt(x) == 0 iff x == 0
