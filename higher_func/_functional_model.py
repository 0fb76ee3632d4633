"""An ``nn.Module`` as a pure function ``f(params, buffers, *inputs)``: :class:`FunctionalModel`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from ._inner_loop import Params
from ._norm import exact_norms, may_normalize

__all__ = ["FunctionalModel"]


class FunctionalModel:
    """An ``nn.Module`` as a pure function ``f(params, buffers, *inputs)``.

    Not to be confused with :class:`higher_func.patch.FunctionalModule` (what
    ``monkeypatch``/``innerloop_ctx`` give): that one keeps fast weights and their history
    and is called like the model; this one keeps no state and takes the weights on every
    call, for :func:`inner_loop`, :func:`batched_meta_loss` and ``torch.compile``.

    The module runs through ``torch.func.functional_call`` with the given tensors in place
    of its parameters and buffers; the module itself is never modified.  Parameters or
    buffers left out of the dicts are taken from the module (frozen).  Batch, layer and
    group norms run as decomposed tensor math (:func:`exact_norms`), which keeps
    second-order gradients exact under ``vmap`` and lets running statistics
    (``track_running_stats=True``) be returned instead of written in place; models built
    only from torch's other layers skip that rerouting (it costs a Python call per op).

    ``f(params, buffers, *inputs)`` returns the module's output and discards buffer
    updates; ``f.with_buffers(params, buffers, *inputs)`` returns ``(output, new_buffers)``
    (new running statistics, ``num_batches_tracked`` incremented), for training-mode
    forwards whose statistics must carry on to the next step.

    Args:
        module: the model.  Its ``training`` flag decides batch norm's behaviour.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> f = FunctionalModel(model)
        >>> out, buffers = f.with_buffers(f.params, f.buffers, torch.randn(4, 2))
        >>> out.shape, int(buffers["1.num_batches_tracked"]), int(model[1].num_batches_tracked)
        (torch.Size([4, 3]), 1, 0)
    """

    __slots__ = ("module", "names", "reroute_norms")

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"FunctionalModel(module): expected a torch.nn.Module, got "
                f"{type(module).__name__}. Pass the model itself, e.g. FunctionalModel(net)."
            )
        self.module = module
        self.names = _names(module)
        # The rerouting costs a Python call per op: skip it for models that cannot normalise.
        self.reroute_norms = may_normalize(module)

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__})"

    @property
    def params(self) -> dict[str, Tensor]:
        """The module's own parameters by name (the live ``nn.Parameter`` objects)."""
        return dict(self.module.named_parameters())

    @property
    def buffers(self) -> dict[str, Tensor]:
        """The module's own buffers by name (the live tensors; never written by this class)."""
        return dict(self.module.named_buffers())

    def __call__(self, params: Params, buffers: Params | None, *inputs: Any, **kwargs: Any) -> Any:
        """The module's output with ``params`` and ``buffers``; buffer updates are dropped."""
        return self.with_buffers(params, buffers, *inputs, **kwargs)[0]

    def with_buffers(
        self, params: Params, buffers: Params | None, *inputs: Any, **kwargs: Any
    ) -> tuple[Any, dict[str, Tensor]]:
        """``(output, new_buffers)``: the forward pass and the buffers it leaves behind."""
        _check_names(self.module, params, buffers, self.names)
        given = dict(buffers) if buffers is not None else {}
        own = self.buffers if self.names[1] else {}
        # Private copies: modules update num_batches_tracked in place.
        private = {name: t.clone() for name, t in {**own, **given}.items()}
        if not self.reroute_norms:
            return functional_call(self.module, (dict(params), private), inputs, kwargs), private
        with exact_norms() as updates:
            output = functional_call(self.module, (dict(params), private), inputs, kwargs)
        return output, updates.apply(private)


def _names(module: nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    """The names of ``module``'s parameters and buffers (tied ones under every name)."""
    return (
        frozenset(name for name, _ in module.named_parameters(remove_duplicate=False)),
        frozenset(name for name, _ in module.named_buffers(remove_duplicate=False)),
    )


def _check_names(
    module: nn.Module,
    params: Any,
    buffers: Any,
    cached: tuple[frozenset[str], frozenset[str]],
) -> None:
    arguments = (("params", params, "parameters"), ("buffers", buffers, "buffers"))
    for argument, value, method in arguments:
        if not isinstance(value, Mapping) and not (argument == "buffers" and value is None):
            raise TypeError(
                f"{argument} must be a dict name -> tensor (like dict(model.named_{method}())), "
                f"got {type(value).__name__}."
            )
    names = cached
    if not (params.keys() <= names[0] and (buffers or {}).keys() <= names[1]):
        names = _names(module)  # the module may have changed since it was wrapped
    for (argument, value, _), known in zip(arguments, names, strict=True):
        unknown = sorted(set(value or ()) - known)
        if unknown:
            raise KeyError(
                f"{argument} has key(s) {unknown} that are not {argument} of "
                f"{type(module).__name__}; expected names among {sorted(known)}."
            )
