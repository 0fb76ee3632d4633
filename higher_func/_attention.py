"""Attention that supports double backward, for inner loops that need second-order gradients.

``F.scaled_dot_product_attention`` (used by transformers' default ``sdpa`` attention, timm's
fused attention and ``nn.MultiheadAttention``) picks a fused kernel when it can: flash
attention on CPU, flash, memory-efficient or cuDNN attention on CUDA.  None of those
kernels has a double backward, so a MAML meta-gradient through them fails at the outer
``backward`` with ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
is not implemented`` (or its CUDA twin).  The math backend is plain tensor math and is
differentiable to every order, on CPU and CUDA alike (slower, and it materialises the
attention matrix).

So every forward that needs second-order gradients runs with the fused backends off:

* the drop-in path: a tracking fmodel's forward (``innerloop_ctx`` with
  ``track_higher_grads=True`` and ``first_order=False``, or ``monkeypatch``);
* the functional and batched paths: the support forwards of :func:`~higher_func.func.inner_loop`
  when ``first_order=False`` (the query forward only needs first derivatives).

First-order and untracked loops, and everything under ``torch.no_grad()``, keep the fast
kernels, except under ``vmap`` on the CPU, where the math backend is the fast one (CPU
flash attention has no batching rule).  :func:`set_double_backward_attention` switches the
rerouting off (or on again), globally or for a ``with`` block: torch then chooses every
kernel.  Switch it off only where the attention backend in use has a double backward or
where no second derivative is taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import optree
import torch
from torch import nn

__all__ = [
    "any_may_attend",
    "is_double_backward_attention_enabled",
    "may_attend",
    "second_order_attention",
    "set_double_backward_attention",
    "vmap_attention",
]

_enabled = True

#: The sdpa backends other than math (flash, mem_efficient, cudnn, and on newer torch
#: overrideable, fa3, ...): each has a getter and a setter of torch's global flag.
_FUSED = tuple(
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
    for name in sorted(
        attr[len("_get_") : -len("_sdp_enabled")]
        for attr in dir(torch._C)
        if attr.startswith("_get_") and attr.endswith("_sdp_enabled")
    )
    if name != "math" and hasattr(torch._C, f"_set_sdp_use_{name}")
)
_NO_REROUTING = contextlib.nullcontext()


class set_double_backward_attention:
    """Whether forwards that need second-order gradients run attention on the math backend.

    On by default.  Like ``torch.set_grad_enabled``, it takes effect at once and, used as a
    context manager, restores the previous setting on exit.  Off, torch chooses the
    attention kernel as usual (a fused one where it can), which raises at the outer
    ``backward`` of a second-order meta-gradient unless the backend has a double backward.

    Args:
        enabled: ``True`` (reroute to math, the default) or ``False`` (torch's choice).

    Example:
        >>> import higher_func as hf
        >>> with hf.set_double_backward_attention(False):
        ...     print(hf.is_double_backward_attention_enabled())
        False
        >>> hf.is_double_backward_attention_enabled()
        True
    """

    def __init__(self, enabled: bool) -> None:
        global _enabled
        if not isinstance(enabled, bool):
            raise TypeError(
                f"set_double_backward_attention(enabled): expected a bool, got "
                f"{type(enabled).__name__}. Pass True (math attention in second-order loops) "
                f"or False (torch's fused kernels)."
            )
        self.previous = _enabled
        _enabled = enabled

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        global _enabled
        _enabled = self.previous


def is_double_backward_attention_enabled() -> bool:
    """Whether second-order forwards run attention on the math backend (the default).

    Example:
        >>> import higher_func as hf
        >>> hf.is_double_backward_attention_enabled()
        True
    """
    return _enabled


class _MathAttention:
    """Turns torch's fused sdpa backends off (math on) and restores the flags on exit.

    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` does the same at about ten times
    the cost, which matters once per forward of a small model.
    """

    __slots__ = ("saved",)

    def __enter__(self) -> None:
        self.saved = [get() for get, _ in _FUSED], torch._C._get_math_sdp_enabled()
        for _, set_flag in _FUSED:
            set_flag(False)
        torch._C._set_sdp_use_math(True)

    def __exit__(self, *exc: object) -> None:
        fused, math = self.saved
        for (_, set_flag), value in zip(_FUSED, fused, strict=True):
            set_flag(value)
        torch._C._set_sdp_use_math(math)


def second_order_attention(needed: bool) -> Any:
    """The context a forward runs in: math-only attention if it ``needed`` second order.

    A no-op when not ``needed``, when switched off (:func:`set_double_backward_attention`)
    or when gradients are disabled.  Under ``torch.compile`` it is
    ``sdpa_kernel(SDPBackend.MATH)``, which dynamo traces.
    """
    return _math_attention() if needed and torch.is_grad_enabled() else _NO_REROUTING


def vmap_attention(tensors: Any) -> Any:
    """The context tasks are vmapped in: math-only attention if ``tensors`` are on the CPU.

    torch's CPU flash attention has no ``vmap`` batching rule: torch runs it task by task
    (warning "There is a performance drop") and the math backend, which batches, is about
    twice as fast (BERT-tiny, 16 tasks).  CUDA's fused kernels have batching rules and
    are kept (first-order forwards; second-order ones run on math anyway).
    """
    on_cpu = all(t.device.type == "cpu" for t in optree.tree_leaves(tensors))
    return _math_attention() if on_cpu else _NO_REROUTING


def _math_attention() -> Any:
    if not _enabled:
        return _NO_REROUTING
    if torch.compiler.is_compiling():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return _MathAttention()


def may_attend(module: nn.Module) -> bool:
    """Whether ``module`` may call ``F.scaled_dot_product_attention``.

    True if any submodule is ``nn.MultiheadAttention`` (as in ``nn.Transformer*``) or a class
    defined outside ``torch.nn`` (whose forward may call it); False for models built only
    from torch's other layers, whose forwards then skip the rerouting.

    Example:
        >>> may_attend(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        False
        >>> may_attend(nn.TransformerEncoderLayer(4, 2))
        True
    """
    return any_may_attend(module.modules())


def any_may_attend(modules: Iterable[nn.Module]) -> bool:
    """:func:`may_attend` over submodules already listed (no second walk of the model)."""
    for sub in modules:
        if isinstance(sub, nn.MultiheadAttention) or not type(sub).__module__.startswith(
            "torch.nn."
        ):
            return True
    return False
