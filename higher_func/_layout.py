"""Where each fast weight lives in an fmodel's private copy, and the user's weights read into it.

A :class:`_Layout` is the table of parameter slots (``submodule._parameters[name]``) of one
(sub)module, built once per fmodel: writing fast weights is one assignment per slot, and a
call with ``params=`` swaps them in and restores them in ``finally`` (:func:`_call_with`, the
mechanism of ``torch.func.functional_call`` without rebuilding the name-to-module mapping on
every call).  :func:`_values_from` turns what a user passes as fast weights (a list or a dict
name -> tensor) into one checked tensor per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ._module_copy import Occurrence, _occurrences, _walk

__all__: list[str] = []  # private helpers of the fmodel

Slot = tuple[dict[str, Any], str, int]


class _Layout:
    """The parameter slots of one (sub)module of the private copy, computed once.

    Attributes:
        names: one name per distinct parameter, in ``module.parameters()`` order (a tied
            parameter appears once, under its first name).
        slots: ``(owner._parameters, key, index)`` for every occurrence, tied ones included.
        index_of: every occurrence's name -> index into ``names``.
        global_index: index into the root's ``names`` of each entry of ``names``.
    """

    __slots__ = ("global_index", "index_of", "names", "slots")

    def __init__(
        self,
        module: nn.Module,
        root: _Layout | None = None,
        prefix: str = "",
        copies: Mapping[int, Any] | None = None,
        occurrences: Iterable[Occurrence] | None = None,
    ) -> None:
        """The layout of ``module``, or of its copy: with ``copies``, each submodule ``m``
        (the owners in ``occurrences``, ``_occurrences(_walk(module))``) stands for
        ``copies[id(m)]``."""
        names: list[str] = []
        slots: list[Slot] = []
        index_of: dict[str, int] = {}
        index_by_id: dict[int, int] = {}
        if occurrences is None:
            occurrences = _occurrences(_walk(module))
        for name, owner, key, tensor in occurrences:
            index = index_by_id.setdefault(id(tensor), len(names))
            if index == len(names):
                names.append(name)
            if copies is not None:
                owner = copies[id(owner)]
            slots.append((owner._parameters, key, index))
            index_of[name] = index
        self.names = tuple(names)
        self.slots = tuple(slots)
        self.index_of = index_of
        if root is None:
            self.global_index = tuple(range(len(names)))
        else:
            self.global_index = tuple(root.index_of[prefix + name] for name in names)

    def write(self, values: Sequence[Tensor]) -> None:
        """Put ``values`` (one per distinct parameter) into every slot."""
        for params, key, index in self.slots:
            params[key] = values[index]


def _call_with(module: nn.Module, layout: _Layout, values: Sequence[Tensor], args, kwargs):
    """Call ``module`` with ``values`` in its parameter slots, restoring them afterwards."""
    saved = [params[key] for params, key, _ in layout.slots]
    try:
        layout.write(values)
        return module(*args, **kwargs)
    finally:
        for (params, key, _), old in zip(layout.slots, saved, strict=True):
            params[key] = old


# ---------------------------------------------------------------------------------------------
# Validation of user input.
# ---------------------------------------------------------------------------------------------


def _check_tensor(value: Any, name: str, reference: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{what}: the fast weight for parameter '{name}' must be a torch.Tensor, got "
            f"{type(value).__name__}. Pass tensors (e.g. the list returned by a "
            "differentiable optimizer's step)."
        )
    if value.device != reference.device:
        raise ValueError(
            f"{what}: the fast weight for parameter '{name}' is on {value.device} but the "
            f"fmodel's weights are on {reference.device}. Move it with .to('{reference.device}') "
            "or build the fmodel with monkeypatch(model, device=...)."
        )
    if value.shape != reference.shape:
        raise ValueError(
            f"{what}: the fast weight for parameter '{name}' has shape {tuple(value.shape)} but "
            f"the parameter has shape {tuple(reference.shape)}. Pass one tensor shaped like "
            "each parameter, in fmodel.param_names order (fmodel.fast_params shows them)."
        )
    return value


def _values_from(
    params: Any, layout: _Layout, latest: Sequence[Tensor], what: str, root_size: int
) -> list[Tensor]:
    """Turn a list (or dict name -> tensor) of fast weights into one tensor per parameter.

    Args:
        params: a sequence in ``parameters()`` order, or a mapping from parameter names (any
            name of a tied parameter) to tensors; names left out keep their latest value.
        layout: the layout of the (sub)module the weights are for.
        latest: the latest weights of that (sub)module, used for names a mapping leaves out.
        what: how to call ``params`` in error messages.
        root_size: for a submodule, a sequence of this length is read as weights for the
            whole fmodel (``higher``'s convention for direct submodule calls).

    Returns:
        A new list with one validated tensor per entry of ``layout.names``.
    """
    names = layout.names
    if isinstance(params, Mapping):
        values = list(latest)
        given: dict[int, Tensor] = {}
        unknown = [key for key in params if key not in layout.index_of]
        if unknown:
            raise KeyError(
                f"{what} has unknown parameter name(s) {unknown}; expected names among "
                f"{list(layout.index_of)}."
            )
        for key, value in params.items():
            index = layout.index_of[key]
            if index in given and given[index] is not value:
                raise ValueError(
                    f"{what} gives two different tensors for the tied parameter '{names[index]}'"
                    f" (also named '{key}'); give it once."
                )
            given[index] = values[index] = _check_tensor(value, key, latest[index], what)
        return values
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        raise TypeError(
            f"{what} must be a list of tensors in parameters() order or a dict name -> tensor, "
            f"got {type(params).__name__}."
        )
    values = list(params)
    if len(values) == root_size and root_size != len(names):
        values = [values[index] for index in layout.global_index]
    if len(values) != len(names):
        raise ValueError(
            f"{what} has {len(values)} tensors but the module has {len(names)} parameters "
            f"({list(names)}); pass one tensor per name in fmodel.param_names (tied parameters "
            "once), or a dict name -> tensor."
        )
    for index, (value, name) in enumerate(zip(values, names, strict=True)):
        _check_tensor(value, name, latest[index], what)
    return values
