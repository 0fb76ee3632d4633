"""``torch.compile`` for inner loops: the functional path, and ``innerloop_ctx`` code.

Two ways to compile a meta-gradient:

* :func:`compiled`: the functional path (:func:`~higher_func.func.batched_meta_loss`,
  :meth:`~higher_func.func.MetaObjective.value_and_grad`), whose inner gradients come
  from ``torch.func.grad``.  The whole meta-gradient compiles with ``fullgraph=True``.
* :func:`compiled_innerloop`: ``higher``-style code whose ``diffopt.step`` calls
  ``torch.autograd.grad(create_graph=True)``.  ``torch.compile`` refuses to differentiate
  such a graph ("aot_autograd does not currently support double backward") unless
  ``torch._dynamo.config.trace_autograd_ops`` is on; this wrapper switches it on only for
  the duration of each call (``torch._dynamo.config.patch``), never globally.
  ``innerloop_ctx`` itself cannot be entered inside a full graph (it copies the module's
  structure, which dynamo does not trace): enter it outside and compile the steps.

Both translate the usual compile failures into a :class:`CompileError` that says why and
what to do instead.  Both need torch >= 2.12 (older dynamo cannot trace optree's C
functions, which every rule step calls) and raise :class:`~higher_func.TorchVersionError`
on an older torch.  Compilation is slow (tens of seconds for a small MLP on a laptop CPU,
minutes on a loaded one); it pays off over many meta-iterations with fixed shapes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

from ._versions import COMPILED_INNER_LOOPS, require_torch

__all__ = ["CompileError", "compiled", "compiled_innerloop"]


class CompileError(RuntimeError):
    """``torch.compile`` could not compile an inner loop; the message says what to do.

    Example (Python branching on a tensor's value cannot be captured as one graph):
        >>> import torch
        >>> from higher_func.func import CompileError, compiled
        >>> branchy = compiled(lambda x: x if x.sum() > 0 else -x, backend="eager")
        >>> try:
        ...     branchy(torch.ones(2))
        ... except CompileError as error:
        ...     print(isinstance(error, RuntimeError), str(error).split(":")[0])
        True the function cannot be captured as one graph
    """


def compiled(
    fn: Callable[..., Any],
    *,
    fullgraph: bool = True,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True)`` with failures explained.

    Compile the whole meta-gradient, e.g. ``compiled(objective.value_and_grad)`` or a
    function returning ``torch.func.grad(batched_meta_loss ...)``.  Pass learning rates and
    other changing values as tensor arguments: a Python float is baked into the graph and
    a new value recompiles.

    Args:
        fn: the function to compile.
        fullgraph: capture ``fn`` as one graph (default), or allow graph breaks.
        backend, mode, dynamic, options: passed to ``torch.compile``.

    Returns:
        The compiled function; on failure it raises :class:`CompileError`.

    Example:
        >>> import torch
        >>> double = compiled(lambda x: 2 * x, backend="eager")
        >>> double(torch.ones(2))
        tensor([2., 2.])
    """
    return _wrap(fn, _compile(fn, fullgraph, backend, mode, dynamic, options), trace_autograd=False)


def compiled_innerloop(
    fn: Callable[..., Any],
    *,
    fullgraph: bool = True,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile ``innerloop_ctx`` code (``autograd.grad(create_graph=True)`` inside).

    ``fn`` takes the ``(fmodel, diffopt)`` of an ``innerloop_ctx`` entered *outside* it,
    runs the inner steps and returns the query loss; ``.backward()`` on that loss gives the
    meta-gradient, as in eager mode.  Each call runs with
    ``torch._dynamo.config.trace_autograd_ops = True`` (restored afterwards), the setting
    that lets dynamo trace the inner ``autograd.grad`` calls.  The compiled graph is
    reused across tasks and meta-iterations (a new ``fmodel`` per task does not
    recompile).  The functional path (:class:`~higher_func.func.MetaObjective`) batches
    tasks with ``vmap`` as well and is faster still.

    Args:
        fn: ``fn(fmodel, diffopt, *data) -> loss``.
        fullgraph, backend, mode, dynamic, options: passed to ``torch.compile``.

    Returns:
        The compiled function; on failure it raises :class:`CompileError`.

    Example:
        >>> import torch, higher_func as higher
        >>> model = torch.nn.Linear(1, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def adapt(fmodel, diffopt, x, y):
        ...     diffopt.step(((fmodel(x) - y) ** 2).mean())
        ...     return ((fmodel(x) - y) ** 2).mean()
        >>> fast_adapt = compiled_innerloop(adapt, backend="eager")
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     fast_adapt(fmodel, diffopt, torch.ones(3, 1), torch.zeros(3, 1)).backward()
        >>> model.weight.grad is not None
        True
    """
    return _wrap(fn, _compile(fn, fullgraph, backend, mode, dynamic, options), trace_autograd=True)


def _compile(
    fn: Callable[..., Any],
    fullgraph: bool,
    backend: str | Callable[..., Any],
    mode: str | None,
    dynamic: bool | None,
    options: dict[str, Any] | None,
) -> Callable[..., Any]:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    require_torch(
        COMPILED_INNER_LOOPS,
        "compiling inner loops (higher_func.func.compiled / compiled_innerloop)",
        instead="run them eagerly: batched_meta_loss and MetaObjective batch tasks with vmap "
        "without compiling",
    )
    try:
        return torch.compile(
            fn, fullgraph=fullgraph, backend=backend, mode=mode, dynamic=dynamic, options=options
        )
    except RuntimeError as error:  # e.g. a Python version dynamo does not support yet
        raise CompileError(_unavailable(error)) from error


def _wrap(fn: Callable[..., Any], compiled_fn: Callable[..., Any], trace_autograd: bool) -> Any:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            if trace_autograd:
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    return compiled_fn(*args, **kwargs)
            return compiled_fn(*args, **kwargs)
        except Exception as error:
            advice = explain_compile_error(error, trace_autograd)
            if advice is None:
                raise
            raise CompileError(advice) from error

    return run


def explain_compile_error(error: BaseException, trace_autograd: bool = False) -> str | None:
    """A message saying why ``torch.compile`` failed on an inner loop and what to do.

    Returns ``None`` for errors that are not compile failures (they are re-raised as is).
    """
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if "does not currently support double backward" in text or "trace_autograd_ops" in text:
        return (
            "torch.compile cannot differentiate through autograd.grad(create_graph=True) (as "
            "innerloop_ctx's diffopt.step calls it) unless dynamo traces autograd ops. Compile "
            "the inner steps with higher_func.func.compiled_innerloop(fn), which enables that "
            "setting only during each call, or use the functional path "
            "(higher_func.func.MetaObjective / batched_meta_loss), whose inner gradients "
            f"come from torch.func.grad. Original error: {first}"
        )
    if "patched_setstate" in text or "patched_init" in text or _INSIDE_CONTEXT.search(text):
        return (
            "innerloop_ctx / monkeypatch cannot run inside a fullgraph-compiled function: they "
            "copy the module's structure, which dynamo does not trace. Enter innerloop_ctx "
            "outside and compile a function of (fmodel, diffopt, *data) with "
            f"higher_func.func.compiled_innerloop. Original error: {first}"
        )
    if "external grad_fn" in text:
        return (
            "autograd.grad inside the compiled function depends on a tensor built outside it "
            "with a grad_fn, and dynamo cannot trace that part of the graph. Compute the inner "
            "loss inside the compiled function (pass fmodel, diffopt and the data in)"
            f"{'' if trace_autograd else ' and use compiled_innerloop'}. Original error: {first}"
        )
    if _is_missing_compiler(text):
        return (
            "the inductor backend needs a working C++ compiler, which this machine lacks. "
            "Install one (gcc/clang), or pass backend='aot_eager' (compiles the graph without "
            f"code generation), or run eagerly. Original error: {first}"
        )
    if isinstance(error, torch._dynamo.exc.Unsupported):
        return (
            f"the function cannot be captured as one graph: {first} Common causes in inner "
            "loops: .item() or float() of a tensor (e.g. BatchNorm with momentum=None), "
            "print/logging, data-dependent Python control flow, or a Python float "
            "hyperparameter that changes (pass a tensor). Remove the cause, or pass "
            "fullgraph=False to allow graph breaks (slower)."
        )
    return None


# dynamo's trace of user code names the function it could not trace through.
_INSIDE_CONTEXT = re.compile(r"\b(?:in|function) (?:innerloop_ctx|monkeypatch)\b")


def _is_missing_compiler(text: str) -> bool:
    return "InvalidCxxCompiler" in text or "No working C++ compiler" in text


def _unavailable(error: BaseException) -> str:
    return (
        f"torch.compile is not available here: {error}. Run the functional path eagerly "
        "(batched_meta_loss and MetaObjective already batch tasks with vmap) or upgrade "
        "torch / use a supported Python."
    )
