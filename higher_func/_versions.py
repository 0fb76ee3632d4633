"""Which torch is installed, and the one error for a feature that needs a newer one.

higher_func supports torch 2.4 and newer.  A few features rest on torch APIs that came
later; each has its minimum here, once, and is refused on an older torch by
:func:`require_torch` with a :class:`TorchVersionError` naming the version it needs
(never run with a silently different result).
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "ADAM_DECOUPLED_WEIGHT_DECAY",
    "COMPILED_INNER_LOOPS",
    "RECOMPUTE_UNDER_VMAP",
    "TORCH_VERSION",
    "TorchVersionError",
    "require_torch",
    "torch_at_least",
]

#: torch.optim.Adam's ``decoupled_weight_decay`` option (older Adams ignore it in a group).
ADAM_DECOUPLED_WEIGHT_DECAY = "2.7"
#: ``torch.compile`` of rule steps and inner loops (``higher_func.func.compiled`` and
#: ``compiled_innerloop``): dynamo before 2.7 graph-breaks on optree's C functions, 2.7 to
#: 2.10 cannot trace them either and lack ``torch._dynamo.config.trace_autograd_ops``, and
#: 2.11 compiles a rule step whose returned state is empty (tested: 2.4.1, 2.7.1, 2.9.1,
#: 2.11.0 fail; 2.12.0, 2.13.0 and 2.14.1 pass).
COMPILED_INNER_LOOPS = "2.12"
#: ``recompute=True`` under ``vmap`` (``batched_meta_loss``, ``MetaObjective``): before 2.7
#: the generated vmap rule of an ``autograd.Function`` fails on an unused output's ``None``
#: gradient (tested: 2.4.1, 2.5.1, 2.6.0 fail; 2.7.1, 2.9.1, 2.11.0 to 2.13.0 pass).
RECOMPUTE_UNDER_VMAP = "2.7"


def _parse(version: str) -> tuple[int, int]:
    """``"2.4.1+cu121"`` -> ``(2, 4)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}; expected e.g. '2.4'.")
    return int(match[1]), int(match[2])


#: ``(major, minor)`` of the installed torch.
TORCH_VERSION = _parse(torch.__version__)


class TorchVersionError(RuntimeError):
    """A feature needs a newer torch than the one installed; the message says which.

    Example:
        >>> from higher_func import TorchVersionError
        >>> from higher_func._versions import require_torch
        >>> try:
        ...     require_torch("99.0", "time travel", instead="stay in the present")
        ... except TorchVersionError as error:
        ...     print(str(error).split(";")[0])
        time travel needs torch >= 99.0
    """


def torch_at_least(minimum: str) -> bool:
    """Whether the installed torch is ``minimum`` (``"2.7"``) or newer.

    Example:
        >>> torch_at_least("2.4"), torch_at_least("99.0")
        (True, False)
    """
    return _parse(minimum) <= TORCH_VERSION


def require_torch(minimum: str, feature: str, instead: str = "") -> None:
    """Raise :class:`TorchVersionError` unless the installed torch is ``minimum`` or newer.

    Args:
        minimum: the oldest torch that has the feature, e.g. ``"2.7"``.
        feature: what the user asked for, as they would name it.
        instead: what works on the installed torch, if anything.
    """
    if torch_at_least(minimum):
        return
    alternative = f", or {instead}" if instead else ""
    raise TorchVersionError(
        f"{feature} needs torch >= {minimum}; this is torch {torch.__version__}. "
        f"Upgrade torch (pip install 'torch>={minimum}'){alternative}."
    )
