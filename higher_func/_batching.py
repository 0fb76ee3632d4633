"""Batching tasks: ``vmap`` where the model allows it, a per-task loop where it does not.

The batched paths (:func:`~higher_func.func.batched_meta_loss`,
:class:`~higher_func.func.MetaObjective`) run all tasks in one ``vmap``.  Some real models
cannot be vmapped:

* ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` have no batching rule (torch's fallback fails with
  ``output with shape [...] doesn't match the broadcast shape [...]``);
* ``spectral_norm`` in ``train()`` runs its power iteration with ``out=`` ops
  (``Batching rule not implemented for aten::div.out``);
* transformers' attention-mask code branches on the mask's values (``padding_mask.all()``),
  which ``vmap`` cannot do ("data-dependent control flow"), whenever a 0/1
  ``attention_mask`` is passed.

``batching=`` chooses what happens: ``"vmap"`` (raise, with a message naming the module and
the fix), ``"loop"`` (a Python loop over tasks, equal to ``vmap``'s result) or ``"auto"``
(the default: ``vmap``, falling back to the loop with a one-time warning naming the module
or op).  Under ``torch.compile`` ``"auto"`` only uses what it can see before running (the
model's RNNs and training-mode spectral norms); pass ``batching="loop"`` there for the rest.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

__all__ = [
    "BATCHING",
    "BatchingError",
    "batch_tasks",
    "choose_batching",
    "explain",
    "loop_over_tasks",
]

BATCHING = ("auto", "vmap", "loop")

#: Messages already warned about (each is shown once per process).
_warned: set[str] = set()

_LOOP = "pass batching='loop' (a per-task loop with the same result)"

#: (why vmap fails, how to make it batch, or "" where only the loop helps).
_RNN = ("torch has no vmap batching rule for recurrent layers", "")
_SPECTRAL = (
    "spectral_norm's power iteration in train() writes with out= (aten::div.out), which "
    "vmap cannot batch",
    "call model.eval() for the inner loop (the power iteration then stops and the current "
    "estimate of the norm is used)",
)
_MASK = (
    "transformers' mask code branches on the values of a 0/1 attention_mask",
    "pass a 4-D float mask of shape (batch, 1, query, key) per task instead, 0.0 where "
    "attended and torch.finfo(dtype).min where masked",
)
_DATA = (
    "the model branches on a tensor's value (Python control flow or .item())",
    "rewrite it with tensor ops such as torch.where",
)
_OTHER = ("vmap failed", "")


def _fix(cause: tuple[str, str]) -> str:
    return f"{cause[1]}, or {_LOOP}" if cause[1] else _LOOP


class BatchingError(RuntimeError):
    """``vmap`` cannot batch the tasks through this model; the message names the module and
    the fix.  Raised with ``batching="vmap"`` (``"auto"`` falls back to a loop instead).

    Example (an LSTM, which has no vmap batching rule):
        >>> import torch, torch.nn.functional as F, higher_func as hf
        >>> class Last(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.rnn = torch.nn.RNN(2, 3, batch_first=True)
        ...     def forward(self, x):
        ...         return self.rnn(x)[0][:, -1]
        >>> model = Last()
        >>> objective = hf.MetaObjective(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                              F.mse_loss, batching="vmap")
        >>> tasks = (torch.randn(2, 4, 5, 2), torch.randn(2, 4, 3))
        >>> try:
        ...     objective(tasks, tasks)
        ... except hf.func.BatchingError as error:
        ...     print(str(error).split(": ")[1])
        module 'rnn' (RNN)
    """


def choose_batching(batching: str, module: nn.Module) -> str:
    """``batching`` for ``module``: ``"loop"`` (warned once) when ``"auto"`` and the module
    has a part that ``vmap`` cannot batch, else ``batching`` unchanged."""
    if batching != "auto":
        return batching
    for name, sub in module.named_modules():
        known = _known_cause(sub)
        if known is not None:
            batched = f" Or, to batch them, {known[1]}." if known[1] else ""
            _warn_once(
                f"MetaObjective cannot batch the tasks with vmap: {_describe_module(name, sub)}: "
                f"{known[0]}. The tasks run in a loop instead, with the same result (pass "
                f"batching='loop' to silence this warning).{batched}"
            )
            return "loop"
    return batching


def batch_tasks(
    vmapped: Callable[[], Tensor], looped: Callable[[], Tensor], batching: str, where: str
) -> Tensor:
    """The per-task losses, by ``vmapped()`` or ``looped()`` as ``batching`` says.

    ``"auto"`` tries ``vmapped()`` and, if ``vmap`` cannot batch the model, returns
    ``looped()`` with a one-time warning; if the loop fails too, the loop's error (the
    model's own) is raised.  ``vmap``'s randomness errors are never hidden by the loop.
    """
    if batching == "loop":
        return looped()
    if torch.compiler.is_compiling():
        return vmapped()
    try:
        return vmapped()
    except Exception as error:
        if _is_randomness_error(error):
            raise
        culprit, cause = explain(error)
        if batching == "vmap":
            raise BatchingError(
                f"{where} cannot batch the tasks with vmap: {culprit}. Fix: {_fix(cause)}."
            ) from error
    result = looped()  # outside the except block: a failure here is the model's own error
    batched = f" Or, to batch them, {cause[1]}." if cause[1] else ""
    _warn_once(
        f"{where} could not batch the tasks with vmap: {culprit}. The tasks ran in a loop "
        f"instead, with the same result (pass batching='loop' to skip the vmap attempt)."
        f"{batched}"
    )
    return result


def loop_over_tasks(count: int, run_task: Callable[[int], Tensor], randomness: str) -> Tensor:
    """``torch.stack([run_task(0), ..., run_task(count - 1)])``.

    With ``randomness="same"`` every task starts from the same random state (one draw
    for all tasks, as under ``vmap``); otherwise random ops draw afresh for each task.
    """
    losses = []
    for task in range(count):
        with torch.random.fork_rng() if randomness == "same" else contextlib.nullcontext():
            losses.append(run_task(task))
    return torch.stack(losses)


def explain(error: BaseException) -> tuple[str, tuple[str, str]]:
    """Why ``vmap`` failed with ``error``: the module, line and cause, and the cause's
    ``(reason, how to batch)`` entry."""
    frames = list(traceback.walk_tb(error.__traceback__))
    name, module = _innermost_module(frames)
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    first = first if len(first) <= 200 else first[:200] + "..."
    cause = _known_cause(module) if module is not None else None
    if cause is None:
        in_masks = any("masking_utils" in frame.f_code.co_filename for frame, _ in frames)
        data_dependent = "data-dependent control flow" in text or ".item()" in text
        cause = _MASK if in_masks else _DATA if data_dependent else _OTHER
    subject = _describe_module(name, module) if module is not None else "the model"
    return f"{subject}{_model_site(frames)}: {cause[0]} ({first})", cause


def _known_cause(module: nn.Module) -> tuple[str, str] | None:
    if isinstance(module, nn.RNNBase):
        return _RNN
    if isinstance(module, _SpectralNorm) and module.training:
        return _SPECTRAL
    hooks = module._forward_pre_hooks.values()
    if module.training and any(isinstance(hook, SpectralNorm) for hook in hooks):
        return _SPECTRAL
    return None


def _innermost_module(
    frames: list[tuple[types.FrameType, int]],
) -> tuple[str, nn.Module | None]:
    """The innermost module whose code raised, named from the outermost one containing it."""
    modules = [
        owner for frame, _ in frames if isinstance(owner := frame.f_locals.get("self"), nn.Module)
    ]
    if not modules:
        return "", None
    culprit = modules[-1]
    for root in modules:
        for name, sub in root.named_modules(remove_duplicate=False):
            if sub is culprit:
                return name, culprit
    return "", culprit


def _model_site(frames: list[tuple[types.FrameType, int]]) -> str:
    """`` at file:line in function``: the innermost frame outside torch and higher_func."""
    for frame, line in reversed(frames):
        filename = frame.f_code.co_filename.replace("\\", "/")
        if not any(part in filename for part in ("/torch/", "/higher_func/", "<")):
            short = "/".join(filename.split("/")[-2:])
            return f" at {short}:{line} in {frame.f_code.co_name}"
    return ""


def _describe_module(name: str, module: nn.Module) -> str:
    where = f"module '{name}'" if name else "the model"
    return f"{where} ({type(module).__name__})"


def _is_randomness_error(error: BaseException) -> bool:
    return "randomness" in str(error) and "vmap" in str(error)


def _warn_once(message: str) -> None:
    if message in _warned or torch.compiler.is_compiling():
        return
    _warned.add(message)
    warnings.warn(message, UserWarning, stacklevel=_caller_level())


_LIBRARIES = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside higher_func and torch (the user's)."""
    frame, level = sys._getframe(2), 2  # the frame that called _warn_once
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level
