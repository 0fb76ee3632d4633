"""Normalisation layers written as plain tensor math, so they are exact under ``vmap``.

Under ``torch.func.vmap``, second-order gradients through PyTorch's fused normalisation
kernels (``native_batch_norm``, ``native_layer_norm``) come out wrong (pytorch/functorch#534):
a batched MAML meta-gradient through ``nn.BatchNorm1d`` differs from the per-task loop's
in the second decimal.  Written as means, variances and elementwise ops, the same layers
are exact to every order, and the running statistics can be returned as new values
instead of being written in place (which ``vmap`` forbids when the statistics are shared
by all tasks).

:func:`exact_norms` is a ``TorchFunctionMode`` that reroutes ``F.batch_norm``,
``F.layer_norm`` and ``F.group_norm`` (hence ``nn.BatchNorm1d/2d/3d``, ``nn.LayerNorm``,
``nn.GroupNorm`` and any module calling them) to the functions below while it is active.
:class:`higher_func.func.FunctionalModel` runs every forward inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "RunningStatUpdates",
    "batch_norm",
    "exact_norms",
    "group_norm",
    "hide_hook_frames",
    "layer_norm",
    "may_normalize",
]


def _channel_shape(input: Tensor) -> list[int]:
    return [1, input.shape[1]] + [1] * (input.dim() - 2)


def _normalize(input: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    return (input - mean) * torch.rsqrt(var + eps)


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    updates: RunningStatUpdates | None = None,
) -> Tensor:
    """``F.batch_norm`` as plain tensor math; running statistics are returned, not written.

    Same arguments and result as :func:`torch.nn.functional.batch_norm`.  In training mode
    with running statistics, the new ``running_mean``/``running_var`` (computed from the
    detached batch statistics, the variance unbiased, as torch does) are recorded in
    ``updates`` instead of being written into the tensors in place.

    Example:
        >>> import torch
        >>> x = torch.randn(8, 3, dtype=torch.float64)
        >>> reference = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> torch.allclose(batch_norm(x, None, None, training=True), reference)
        True
    """
    dims = [0, *range(2, input.dim())]
    shape = _channel_shape(input)
    if training or running_mean is None or running_var is None:
        count = input.numel() // input.shape[1]
        if training and count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(input.shape)}. Use a batch of at least 2 examples per task, or eval()."
            )
        mean = input.mean(dim=dims, keepdim=True)
        var = ((input - mean) ** 2).mean(dim=dims, keepdim=True)
        if training and running_mean is not None and running_var is not None:
            _record_running_stats(updates, running_mean, running_var, mean, var, count, momentum)
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _affine(_normalize(input, mean, var, eps), weight, bias, shape)


def _record_running_stats(
    updates: RunningStatUpdates | None,
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
) -> None:
    if updates is None:
        return
    if momentum is None:
        raise ValueError(
            "batch_norm got momentum=None (a cumulative moving average); pass the factor "
            "1 / num_batches_tracked as momentum, as nn.BatchNorm does."
        )
    batch_mean = mean.detach().flatten()
    batch_var = var.detach().flatten() * (count / (count - 1))
    updates.record(running_mean, (1 - momentum) * running_mean + momentum * batch_mean)
    updates.record(running_var, (1 - momentum) * running_var + momentum * batch_var)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` as plain tensor math (same arguments, same result).

    Example:
        >>> import torch
        >>> x = torch.randn(4, 5, dtype=torch.float64)
        >>> torch.allclose(layer_norm(x, [5]), torch.nn.functional.layer_norm(x, [5]))
        True
    """
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    mean = input.mean(dim=dims, keepdim=True)
    var = ((input - mean) ** 2).mean(dim=dims, keepdim=True)
    out = _normalize(input, mean, var, eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.group_norm`` as plain tensor math (same arguments, same result).

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 3, dtype=torch.float64)
        >>> torch.allclose(group_norm(x, 2), torch.nn.functional.group_norm(x, 2))
        True
    """
    channels = input.shape[1]
    if channels % num_groups != 0:
        raise ValueError(
            f"group_norm: num_channels ({channels}) must be divisible by num_groups ({num_groups})."
        )
    grouped = input.reshape(input.shape[0], num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=-1, keepdim=True)
    out = _normalize(grouped, mean, var, eps).reshape(input.shape)
    return _affine(out, weight, bias, _channel_shape(input))


class RunningStatUpdates:
    """The new values of running statistics computed during one forward pass.

    ``record(old, new)`` notes that the buffer tensor ``old`` should become ``new``;
    :meth:`apply` maps a dict of buffers to its updated copy (matching by identity, the
    buffers being the very tensors the layers received).
    """

    __slots__ = ("pairs",)

    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def record(self, old: Tensor, new: Tensor) -> None:
        """Note that buffer ``old`` takes the value ``new`` after this forward."""
        self.pairs.append((old, new))

    def apply(self, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """``buffers`` with every recorded update applied (a new dict)."""
        updated = dict(buffers)
        for old, new in self.pairs:
            for name, tensor in buffers.items():
                if tensor is old:
                    updated[name] = new
        return updated


_Handler = Callable[..., Tensor]


class _ExactNorms(TorchFunctionMode):
    """Reroutes the functional normalisation ops to the decomposed versions above."""

    def __init__(self, updates: RunningStatUpdates) -> None:
        super().__init__()
        self.updates = updates

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return batch_norm(*args, **kwargs, updates=self.updates)
        if func is F.layer_norm:
            return layer_norm(*args, **kwargs)
        if func is F.group_norm:
            return group_norm(*args, **kwargs)
        return func(*args, **kwargs)


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def may_normalize(module: nn.Module) -> bool:
    """Whether ``module`` may call a normalisation function that :func:`exact_norms` reroutes.

    True if any submodule is a torch norm layer or a class defined outside ``torch.nn`` (whose
    forward may call ``F.batch_norm`` and friends); False for models built only from torch's
    other layers (``Linear``, ``Conv2d``, ``ReLU``, ...), which need no rerouting.

    Example:
        >>> may_normalize(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        False
        >>> may_normalize(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
        True
    """
    for sub in module.modules():
        if isinstance(sub, _NORM_LAYERS) or not type(sub).__module__.startswith("torch.nn."):
            return True
    return False


@contextmanager
def exact_norms() -> Iterator[RunningStatUpdates]:
    """Run ``F.batch_norm``/``F.layer_norm``/``F.group_norm`` as decomposed tensor math.

    Yields the :class:`RunningStatUpdates` that collects the new running statistics of
    every batch norm run in training mode inside the block (the buffers themselves are
    left untouched).  ``F.instance_norm`` and ``F.rms_norm`` are not rerouted.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> with exact_norms() as updates:
        ...     _ = bn(torch.randn(8, 3))
        >>> len(updates.pairs), bool(bn.running_mean.eq(0).all())
        (2, True)
    """
    updates = RunningStatUpdates()
    with _ExactNorms(updates):
        try:
            yield updates
        except BaseException as error:
            hide_hook_frames(error)
            raise


def hide_hook_frames(error: BaseException) -> None:
    """Unlink the rerouting hook's frames from ``error``'s traceback (and its causes').

    Every torch call inside :func:`exact_norms` passes through the hook, so an error raised
    by any op would otherwise end in ``_norm.py __torch_function__``, as if the hook had
    caused it.  The traceback then ends at the model line that called the failing op.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None and tb.tb_frame.f_code is _HOOK_CODE:
            tb = tb.tb_next
        current.__traceback__ = tb
        while tb is not None:
            while tb.tb_next is not None and tb.tb_next.tb_frame.f_code is _HOOK_CODE:
                tb.tb_next = tb.tb_next.tb_next
            tb = tb.tb_next
        current = current.__cause__ or current.__context__


_HOOK_CODE = _ExactNorms.__torch_function__.__code__
