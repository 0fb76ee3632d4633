"""Stateless ("functional") modules: the engine behind :func:`higher_func.patch.monkeypatch`.

How it works.  :func:`monkeypatch` copies the module's *structure* once (what
``copy.deepcopy`` would give, with every parameter and buffer pre-seeded in the memo, so no
weight is copied twice and the original module is not referenced afterwards).  In that
private copy every parameter slot (``submodule._parameters[name]``) holds a *fast weight*:
a plain tensor, which may carry an autograd graph.  Recording new fast weights rewrites
those slots through a table of ``(slots dict, key, index)`` built once per fmodel, so a call
without ``params`` is a plain module call, submodules and the module's own methods always
see the latest weights, and a call with ``params=`` swaps the slots in and restores them in
``finally`` (the mechanism of ``torch.func.functional_call``, without rebuilding the
name-to-module mapping on every call).  No class is created or patched: the fmodel is a
:class:`FunctionalModule` wrapping the private copy.
"""

from __future__ import annotations

import copy
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ._attention import may_attend, second_order_attention
from ._dropin_checks import warn_parameters_in_plain_containers

__all__ = [
    "FunctionalModule",
    "FunctionalSubmodule",
    "buffer_sync",
    "make_functional",
    "monkeypatch",
]

DeviceLike = torch.device | str | int | None
InitialFn = Callable[[Tensor], Tensor]
Slot = tuple[dict[str, Any], str, int]


# ---------------------------------------------------------------------------------------------
# The layout: where each fast weight lives in the private copy.
# ---------------------------------------------------------------------------------------------


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
        walk: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        """The layout of ``module``, or of its copy: with ``copies``, each submodule ``m``
        (listed by ``walk``, ``_walk(module)``) stands for ``copies[id(m)]``."""
        names: list[str] = []
        slots: list[Slot] = []
        index_of: dict[str, int] = {}
        index_by_id: dict[int, int] = {}
        for name, owner, key, tensor in _occurrences(walk or _walk(module)):
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


def _walk(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule occurrence with its name (shared ones under each name), in order."""
    return list(module.named_modules(remove_duplicate=False))


def _occurrences(walk: list[tuple[str, nn.Module]]) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(name, owner, key, tensor)`` for every parameter occurrence, in the order of
    ``module.named_parameters(remove_duplicate=False)`` (which walks the same way)."""
    for prefix, owner in walk:
        for key, tensor in owner._parameters.items():
            if tensor is not None:
                yield (f"{prefix}.{key}" if prefix else key), owner, key, tensor


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


def _check_module(module: Any) -> None:
    if isinstance(module, _StatelessBase):
        raise TypeError(
            "module is already a functional module; call it with params= or monkeypatch the "
            "original torch.nn.Module instead."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")


def _check_hook(hook: Any, name: str) -> None:
    if isinstance(hook, WeightNorm | SpectralNorm):
        kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
        raise TypeError(
            f"submodule '{name}' uses the hook-based torch.nn.utils.{kind}, which recomputes "
            "its weight outside the parameters and cannot see fast weights. Use "
            f"torch.nn.utils.parametrizations.{kind} instead."
        )


def _resolve_device(device: DeviceLike) -> torch.device | None:
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch.device, a string such as 'cuda:0' or None, got {device!r}."
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available; pass device=None to "
            "keep the fast weights on the model's device."
        )
    return resolved


def _check_has_data(name: str, tensor: Tensor, device: torch.device | None) -> None:
    if tensor.is_meta and (device is None or device.type != "meta"):
        implied = f"device={device}" if device else "device=None keeps the model's device"
        raise ValueError(
            f"'{name}' of the model is on the meta device (no data) but the fast weights "
            f"need data ({implied}); materialize the model first (module.to_empty(...) "
            "and load its weights)."
        )


# ---------------------------------------------------------------------------------------------
# Copying the structure.
# ---------------------------------------------------------------------------------------------


def _seed_hooks(
    module: nn.Module, memo: dict[int, Any], walk: list[tuple[str, nn.Module]] | None = None
) -> None:
    """Make a deep copy share the user's hook callables instead of copying them.

    A hook is usually a closure or a ``functools.partial`` that writes into the user's own
    objects; a copy of those would record into a copy nobody reads.  Bound methods of the
    module's own submodules are still copied, so they bind to the copied submodule.
    """
    named = walk or _walk(module)
    own: set[int] | None = None
    for name, submodule in named:
        for attribute, hooks in submodule.__dict__.items():
            if not hooks or "hook" not in attribute or not isinstance(hooks, dict):
                continue  # most modules have only empty hook dicts
            for hook in hooks.values():
                _check_hook(hook, name or type(module).__name__)
                if isinstance(hook, types.MethodType):
                    if own is None:
                        own = {id(m) for _, m in named}
                    if id(hook.__self__) in own:
                        continue  # bound to a copied submodule: copied with it
                memo.setdefault(id(hook), hook)


#: Values a deep copy shares (immutable).
_ATOMIC = frozenset(
    {type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, type}
)
_EMPTY_COPIES = frozenset({dict, OrderedDict, set, list})
_TENSOR_DICTS = frozenset({"_parameters", "_buffers"})


def _copies_like_deepcopy(cls: type) -> bool:
    """Whether ``copy.deepcopy`` would copy an instance of ``cls`` field by field."""
    return (
        cls.__getstate__ is nn.Module.__getstate__
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and not hasattr(cls, "__deepcopy__")
    )


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, faster for the fields every module has.

    The result equals a deep copy: parameters and buffers come from ``memo`` (pre-seeded),
    immutable values are shared, anything else is deep-copied. Hook dicts are rebuilt
    entry by entry so the hooks seeded in ``memo`` are shared. Classes that customise
    copying or pickling go through ``copy.deepcopy`` itself.
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _copies_like_deepcopy(cls):
        return copy.deepcopy(module, memo)
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC:
            if key != "_compiled_call_impl":
                state[key] = value
        elif key == "_modules":
            state[key] = kind(
                (name, None if child is None else _copy_module(child, memo))
                for name, child in value.items()
            )
        elif not value and kind in _EMPTY_COPIES:
            state[key] = kind()  # most hook dicts: an empty container, copied cheaply
        elif key == "_compiled_call_impl":
            continue
        elif isinstance(value, dict) and (key in _TENSOR_DICTS or "hook" in key):
            state[key] = kind((k, _copy_entry(v, memo)) for k, v in value.items())
        else:
            state[key] = copy.deepcopy(value, memo)
    if cls.__setstate__ is nn.Module.__setstate__:
        clone.__dict__.update(state)  # what Module.__setstate__ does for a complete state
    else:
        clone.__setstate__(state)
    return clone


def _copy_entry(value: Any, memo: dict[int, Any]) -> Any:
    """A parameter, buffer or hook: its pre-seeded copy, else a deep copy."""
    seeded = memo.get(id(value), memo)
    return copy.deepcopy(value, memo) if seeded is memo else seeded


def _copy_structure(
    module: nn.Module, memo: dict[int, Any], walk: list[tuple[str, nn.Module]]
) -> nn.Module:
    _seed_hooks(module, memo, walk)
    try:
        return _copy_module(module, memo)
    except Exception as error:
        raise TypeError(
            f"monkeypatch copies the structure of {type(module).__name__} with copy.deepcopy "
            f"(its parameters and buffers excepted) and that failed: {error}. Make the module's "
            "non-tensor attributes deep-copyable."
        ) from error


def _to(tensor: Tensor, device: torch.device | None) -> Tensor:
    return tensor.clone() if device is None else tensor.to(device, copy=True)


def _snapshot(tensor: Tensor) -> Tensor:
    copied = tensor.detach().clone()
    return copied.requires_grad_(tensor.requires_grad) if copied.is_floating_point() else copied


def _build(
    module: nn.Module, initial: InitialFn, device: torch.device | None, track: bool
) -> FunctionalModule:
    """Copy ``module``'s structure with ``initial(p)`` in every parameter slot."""
    _check_module(module)
    walk = _walk(module)
    warn_parameters_in_plain_containers(walk)
    memo: dict[int, Any] = {}
    for name, _, _, param in _occurrences(walk):
        if id(param) not in memo:
            _check_has_data(name, param, device)
            memo[id(param)] = initial(param)
    for prefix, owner in walk:
        for key, buffer in owner._buffers.items():
            if buffer is not None and id(buffer) not in memo:
                _check_has_data(f"{prefix}.{key}" if prefix else key, buffer, device)
                memo[id(buffer)] = _to(buffer.detach(), device)
    private = _copy_structure(module, memo, walk)
    try:
        layout = _Layout(module, copies=memo, walk=walk)  # the original's walk, on the copy
    except KeyError:  # a class whose own __deepcopy__ bypasses the memo: walk the copy
        layout = _Layout(private)
    return FunctionalModule._wrap(private, _Core(private, track, layout))


# ---------------------------------------------------------------------------------------------
# The history of fast weights, shared by an fmodel and its submodule views.
# ---------------------------------------------------------------------------------------------


class _Core:
    """State shared by an fmodel and its submodule views: the copy, layout and history."""

    def __init__(self, module: nn.Module, track: bool, layout: _Layout) -> None:
        self.module = module
        self.layout = layout
        initial: dict[int, Tensor] = {}
        for params, key, index in self.layout.slots:
            initial.setdefault(index, params[key])
        self.history: list[list[Tensor]] = [[initial[i] for i in range(len(initial))]]
        self.track = track
        # Tracking forwards need attention with a double backward (see _attention.py).
        self.attends = may_attend(module)
        # Weak, so that views (which hold the core) form no reference cycle with it: an
        # fmodel is then freed as soon as it is dropped, without waiting for the collector.
        self.views: weakref.WeakValueDictionary[str, FunctionalSubmodule] = (
            weakref.WeakValueDictionary()
        )

    def __getstate__(self) -> dict[str, Any]:
        # Views are rebuilt on demand, so copies and pickles leave them out.
        return {key: value for key, value in self.__dict__.items() if key != "views"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.views = weakref.WeakValueDictionary()

    def record(self, values: list[Tensor]) -> None:
        if self.track:
            self.history.append(values)
        else:
            self.history[-1] = values
        self.layout.write(values)

    def at(self, time: int | None) -> list[Tensor]:
        if time is None:
            return self.history[-1]
        if not isinstance(time, int) or isinstance(time, bool):
            raise TypeError(f"time must be an int or None, got {type(time).__name__}.")
        if not self.track and time not in (-1, 0):
            # higher's semantics: untracked, the history is one entry, both time 0 and -1.
            raise ValueError(
                f"time={time} was requested but the fmodel is not tracking higher gradients, "
                "so only the latest weights exist (time=0, -1 or None); pass one of those, "
                "or track_higher_grads=True."
            )
        if not -len(self.history) <= time < len(self.history):
            raise IndexError(
                f"time={time} is out of range: {len(self.history)} sets of weights are recorded "
                f"(times 0 to {len(self.history) - 1}, or negative from the end)."
            )
        return self.history[time]


# ---------------------------------------------------------------------------------------------
# The public classes.
# ---------------------------------------------------------------------------------------------

_STRUCTURE_ERROR = (
    "cannot assign {what} '{name}' to a functional module: its set of parameters is fixed "
    "when it is made. Change the original model and call monkeypatch again."
)


class _StatelessBase(nn.Module):
    """What an fmodel and its submodule views share: a (sub)module of the private copy whose
    parameter slots hold the latest fast weights."""

    _core: _Core
    _sub: nn.Module
    _lay: _Layout
    _prefix: str

    @classmethod
    def _wrap(cls, submodule: nn.Module, core: _Core, prefix: str = "") -> Any:
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        object.__setattr__(self, "_core", core)
        object.__setattr__(self, "_sub", submodule)
        layout = core.layout if not prefix else _Layout(submodule, core.layout, prefix)
        object.__setattr__(self, "_lay", layout)
        object.__setattr__(self, "_prefix", prefix)
        return self

    # -- calling ---------------------------------------------------------------------------

    def forward(self, *args: Any, params: Any = None, **kwargs: Any) -> Any:
        """Run the module with its latest fast weights, or with ``params`` for this call only.

        Args:
            *args, **kwargs: the module's own arguments.
            params: ``None`` (use the latest fast weights), a list of tensors in
                ``self.parameters()`` order (tied parameters once), or a dict name -> tensor
                (names left out keep their latest value). Passing ``params`` does **not**
                record anything in the history, so it is safe under ``torch.func.vmap``.
        """
        core = self._core
        with second_order_attention(core.track and core.attends):
            if params is None:
                return self._sub(*args, **kwargs)
            values = _values_from(
                params, self._lay, self._latest(), "params", len(core.layout.names)
            )
            return _call_with(self._sub, self._lay, values, args, kwargs)

    # -- reading weights -------------------------------------------------------------------

    def _latest(self, time: int | None = None) -> list[Tensor]:
        weights = self._core.at(time)
        if self._lay is self._core.layout:
            return weights
        return [weights[index] for index in self._lay.global_index]

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in ``model.parameters()`` order (a tied parameter once)."""
        return self._lay.names

    def parameters(  # type: ignore[override]
        self, recurse: bool = True, time: int | None = None
    ) -> Iterator[Tensor]:
        """Iterate over the fast weights at update number ``time``.

        Args:
            recurse: kept for ``torch.nn.Module`` compatibility; ``False`` yields only the
                parameters owned directly by this module.
            time: ``None`` (or ``-1``) for the latest weights, ``0`` for the initial ones,
                ``k`` for those after ``k`` recorded updates (``IndexError`` past the end).
                When not tracking higher gradients the history is the latest weights only,
                as in ``higher``: ``0``, ``-1`` and ``None`` all return them and any other
                time raises ``ValueError``.
        """
        return (value for _, value in self._named(recurse, time))

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """Iterate over ``(name, latest fast weight)`` with ``model.named_parameters()``'s names."""
        dot = prefix + "." if prefix else ""
        if remove_duplicate:
            yield from ((dot + name, value) for name, value in self._named(recurse, None))
            return
        latest = self._latest()
        for name, index in self._lay.index_of.items():
            if recurse or "." not in name:
                yield dot + name, latest[index]

    def _named(self, recurse: bool, time: int | None) -> Iterator[tuple[str, Tensor]]:
        for name, value in zip(self._lay.names, self._latest(time), strict=True):
            if recurse or "." not in name:
                yield name, value

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """The fmodel's private buffers (e.g. BatchNorm statistics), under the model's names."""
        return self._sub.named_buffers(prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        """The fmodel's private buffers."""
        return self._sub.buffers(recurse)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The module's state dict with the latest fast weights (detached unless
        ``keep_vars=True``) and the private buffers; loadable into the original model."""
        return self._sub.state_dict(*args, **kwargs)

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        """The modules of the private copy (real instances of the model's classes, holding
        the latest fast weights)."""
        return self._sub.named_modules(*args, **kwargs)

    def modules(self, *args: Any, **kwargs: Any) -> Iterator[nn.Module]:
        """The modules of the private copy; see :meth:`named_modules`."""
        return self._sub.modules(*args, **kwargs)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        """The direct children of the private copy."""
        return self._sub.named_children()

    def children(self) -> Iterator[nn.Module]:
        """The direct children of the private copy."""
        return self._sub.children()

    # -- mode and unsupported nn.Module operations -------------------------------------------

    @property
    def training(self) -> bool:
        """The training flag of the (sub)module in the private copy."""
        return self._sub.training

    @training.setter
    def training(self, mode: bool) -> None:
        submodule = self.__dict__.get("_sub")
        if submodule is not None:  # nn.Module.__init__ sets it before there is a copy
            submodule.training = mode

    def train(self, mode: bool = True) -> Any:
        """Set training mode of the (sub)module, as ``nn.Module.train``; returns ``self``."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}.")
        self._sub.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> NoReturn:
        raise TypeError(
            "a functional module cannot be moved or cast in place (.to, .cuda, .double, ...): "
            "its weights are a history of tensors. Pass device= to monkeypatch, or record "
            "converted weights with update_params."
        )

    # -- attribute access ------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if "_sub" not in state:
            raise AttributeError(name)
        submodule = state["_sub"]
        if name in submodule._modules and submodule._modules[name] is not None:
            return self._view(name)
        return getattr(submodule, name)

    def _view(self, name: str) -> FunctionalSubmodule:
        core = self._core
        prefix = self._prefix + name + "."
        view = core.views.get(prefix)
        if view is None:
            child = self._sub._modules[name]
            assert child is not None
            view = FunctionalSubmodule._wrap(child, core, prefix)
            core.views[prefix] = view
        return view

    def __setattr__(self, name: str, value: Any) -> None:
        state = self.__dict__
        if "_sub" not in state or name in state or hasattr(type(self), name):
            object.__setattr__(self, name, value)
            return
        local = self._lay.index_of.get(name)
        if local is not None:
            self._assign(local, name, value)
        elif isinstance(value, nn.Module):
            raise TypeError(_STRUCTURE_ERROR.format(what="a module", name=name))
        elif isinstance(value, nn.Parameter):
            raise TypeError(_STRUCTURE_ERROR.format(what="a new parameter", name=name))
        else:
            setattr(self._sub, name, value)

    def _assign(self, local: int, name: str, value: Any) -> None:
        """Record new fast weights in which parameter ``name`` of this module is ``value``."""
        index = self._lay.global_index[local]
        latest = self._core.history[-1]
        _check_tensor(value, self._prefix + name, latest[index], "assignment")
        values = list(latest)
        values[index] = value
        self._core.record(values)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._sub)))

    # -- containers (Sequential, ModuleList, ModuleDict) ------------------------------------

    def __getitem__(self, key: Any) -> Any:
        item = self._sub[key]  # type: ignore[index]
        if isinstance(item, nn.Module):
            for name, child in self._sub._modules.items():
                if child is item:
                    return self._view(name)
        return item

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._sub)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self._sub, nn.ModuleDict):
            return iter(self._sub)
        return (self._view(name) for name, child in self._sub._modules.items() if child)

    # -- copying -----------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A detached snapshot: every fast weight and buffer becomes a detached copy with the
        same ``requires_grad`` (torch cannot deep-copy tensors that carry a graph); tensors
        shared between history entries stay shared; hooks are shared, as in monkeypatch."""
        if id(self) in memo:
            return memo[id(self)]
        core = self._core
        for weights in core.history:
            for tensor in weights:
                if id(tensor) not in memo:
                    memo[id(tensor)] = _snapshot(tensor)
        for tensor in core.module.buffers():
            memo.setdefault(id(tensor), _snapshot(tensor))
        _seed_hooks(core.module, memo)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            object.__setattr__(clone, key, copy.deepcopy(value, memo))
        return clone

    def __getstate__(self) -> dict[str, Any]:
        return dict(copy.deepcopy(self).__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        inner = repr(self._sub).replace("\n", "\n  ")
        return f"{type(self).__name__}(\n  {inner}\n)"


class FunctionalSubmodule(_StatelessBase):
    """A submodule of an fmodel (``fmodel.encoder``, ``fmodel[0]``): a live view.

    Calling it runs the submodule with its slice of the fmodel's latest fast weights (or
    with ``params=``: a list in the submodule's ``parameters()`` order, a dict of names
    relative to the submodule, or, as in ``higher``, a list for the whole fmodel).
    Assigning a tensor to one of its parameter names (``fmodel.encoder.weight = w``) records
    new fast weights for the whole fmodel; a tied parameter changes everywhere it is used.
    Other attributes are read from and written to the private copy of the submodule.

    Example:
        >>> import torch, higher_func as hf
        >>> fmodel = hf.monkeypatch(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh()))
        >>> isinstance(fmodel[0], hf.patch.FunctionalSubmodule), fmodel[0](torch.ones(4, 2)).shape
        (True, torch.Size([4, 3]))
        >>> fmodel[0].bias = torch.zeros(3)  # records new fast weights for the whole fmodel
        >>> len(fmodel.fast_params), fmodel.fast_params[1]
        (2, tensor([0., 0., 0.]))
    """


class FunctionalModule(_StatelessBase):
    """A stateless version of an ``nn.Module`` holding a history of fast weights.

    Made by :func:`monkeypatch` (or :func:`make_functional`). It behaves like the model:
    ``fmodel(x)`` runs the model's ``forward`` with the latest fast weights, the model's own
    methods and attributes are reachable (``fmodel.encode(x)``, ``fmodel.hidden_size``),
    submodules are live views (:class:`FunctionalSubmodule`) and forward hooks run.

    History semantics: ``history[0]`` holds the initial weights; every call of
    :meth:`update_params` (or setting :attr:`fast_params`, or assigning a tensor to a
    parameter name such as ``fmodel.fc.weight = w``) records one new set. When tracking
    higher gradients each set is appended, so ``parameters(time=k)`` returns the weights
    after ``k`` updates; when not tracking, the single entry is replaced. Calling
    ``fmodel(x, params=...)`` never records anything.

    ``isinstance(fmodel, type(model))`` is ``False`` (``higher`` made it ``True`` by
    creating a subclass of the model's class at run time; higher_func creates no classes).
    ``isinstance(fmodel, torch.nn.Module)`` is ``True``, and :meth:`modules` yields real
    instances of the model's classes (the private copy, holding the latest fast weights).

    The fmodel owns a private copy of the module's structure and buffers; it holds no
    reference to the original module. ``copy.deepcopy(fmodel)`` gives a detached snapshot.
    Hooks registered on the model's submodules are shared with the copy and run.

    Limits: a call with ``params=`` swaps tensors into the shared private copy, so one
    fmodel must not be called from several threads at once; under ``torch.func.vmap``,
    BatchNorm in training mode cannot update its running statistics in place (a
    ``torch.func`` limitation: use ``eval()`` or ``track_running_stats=False``).

    Example:
        >>> import torch
        >>> from higher_func.patch import monkeypatch
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = monkeypatch(model)
        >>> fmodel.param_names
        ('weight', 'bias')
        >>> new = [p - 0.1 for p in fmodel.parameters()]
        >>> fmodel.update_params(new)
        >>> x = torch.ones(1, 2)
        >>> torch.equal(fmodel(x), torch.nn.functional.linear(x, new[0], new[1]))
        True
        >>> torch.equal(fmodel.parameters(time=0).__next__(), model.weight)
        True
    """

    def __init__(
        self,
        module: nn.Module,
        device: DeviceLike = None,
        copy_initial_weights: bool = True,
        track_higher_grads: bool = True,
    ) -> None:
        made = monkeypatch(module, device, copy_initial_weights, track_higher_grads)
        nn.Module.__init__(self)
        for key, value in made.__dict__.items():
            object.__setattr__(self, key, value)

    @property
    def fast_params(self) -> list[Tensor]:
        """The latest fast weights (a new list, in ``model.parameters()`` order).

        Setting it records new weights: appended to the history when tracking higher
        gradients, replacing the only entry when not. Same as :meth:`update_params`.
        """
        return list(self._core.history[-1])

    @fast_params.setter
    def fast_params(self, value: Any) -> None:
        self.update_params(value)

    def update_params(self, params: Any) -> None:
        """Record new fast weights (a list in ``model.parameters()`` order or a dict name ->
        tensor, names left out keeping their latest value); see the history semantics above.
        """
        core = self._core
        size = len(core.layout.names)
        core.record(_values_from(params, core.layout, core.history[-1], "params", size))

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The initial fast weights (time 0); an error when not tracking higher gradients."""
        if not self._core.track:
            raise ValueError(
                "init_fast_params is only kept when tracking higher gradients: this fmodel "
                "has track_higher_grads=False, so only the latest weights (fast_params) exist."
            )
        return list(self._core.history[0])

    @property
    def track_higher_grads(self) -> bool:
        """Whether every update is kept (``True``) or only the latest weights (``False``).

        Turning it off releases all but the latest weights; turning it on starts a new
        history whose time 0 is the current weights. ``fast_params`` is never stale.
        """
        return self._core.track

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"track_higher_grads must be a bool, got {type(value).__name__}.")
        core = self._core
        if value != core.track:
            core.history = [core.history[-1]]
            core.track = value


# ---------------------------------------------------------------------------------------------
# The functions higher's users call.
# ---------------------------------------------------------------------------------------------


def monkeypatch(
    module: nn.Module,
    device: DeviceLike = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """Make a stateless version of ``module`` whose initial fast weights are its parameters.

    Args:
        module: any ``torch.nn.Module``; it is neither modified nor kept alive by the result.
        device: where the fast weights and private buffers live (``None``: the model's).
        copy_initial_weights: ``True`` makes the initial fast weights detached leaf copies
            (no gradient reaches ``module``); ``False`` keeps them differentiable copies of
            ``module.parameters()``, so an outer ``backward`` fills the model's ``.grad``
            (the MAML setting).
        track_higher_grads: keep every update (``True``) or only the latest (``False``).

    Returns:
        A :class:`FunctionalModule`; its buffers are private detached copies.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> fmodel = monkeypatch(model, copy_initial_weights=False)
        >>> fmodel(torch.ones(2, 3)).sum().backward()
        >>> model.weight.grad
        tensor([[2., 2., 2.]])
    """
    if not isinstance(copy_initial_weights, bool):
        raise TypeError(
            f"copy_initial_weights must be a bool, got {type(copy_initial_weights).__name__}."
        )
    if not isinstance(track_higher_grads, bool):
        raise TypeError(
            f"track_higher_grads must be a bool, got {type(track_higher_grads).__name__}."
        )
    target = _resolve_device(device)

    def initial(param: Tensor) -> Tensor:
        if copy_initial_weights:
            return _to(param.detach(), target).requires_grad_(param.requires_grad)
        return _to(param, target)

    return _build(module, initial, target, track_higher_grads)


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
) -> FunctionalModule:
    """Make a stateless version of ``module`` without copying its weights.

    The initial fast weights are detached views of ``module``'s parameters (no copy, no
    gradient), so ``fmodel(x)`` runs the model's current weights; pass ``params=`` or call
    ``update_params`` to use others. (``higher`` left them empty and raised instead.)
    Buffers are private copies; :func:`buffer_sync` refreshes them.

    Args:
        module: any ``torch.nn.Module``.
        encapsulator: called as ``encapsulator(fmodel, module)`` before returning, as in
            ``higher`` (e.g. to set initial weights).

    Returns:
        A :class:`FunctionalModule` tracking higher gradients.

    Example:
        >>> import torch
        >>> from higher_func.patch import make_functional
        >>> model, x = torch.nn.Linear(2, 1), torch.ones(1, 2)
        >>> fmodel = make_functional(model)
        >>> weight = fmodel.fast_params[0]  # a detached view of model.weight: no copy
        >>> torch.equal(fmodel(x), model(x)), weight.data_ptr() == model.weight.data_ptr()
        (True, True)
    """
    fmodel = _build(module, Tensor.detach, None, True)
    if encapsulator is not None:
        encapsulator(fmodel, module)
    return fmodel


def buffer_sync(module: nn.Module, fmodule: _StatelessBase, device: DeviceLike = None) -> None:
    """Copy ``module``'s buffers (detached) into ``fmodule``'s private buffers, by name.

    Args:
        module: the model the fmodel was made from (or one with the same structure).
        fmodule: a :class:`FunctionalModule` (or a submodule view).
        device: where to put the copies (``None``: the device of ``module``'s buffers).

    Raises:
        KeyError: ``module`` has a buffer that ``fmodule`` does not.

    Example:
        >>> import torch
        >>> from higher_func.patch import buffer_sync, monkeypatch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fmodel = monkeypatch(bn)
        >>> _ = bn(torch.ones(4, 2))  # updates bn's running statistics, not fmodel's
        >>> buffer_sync(bn, fmodel)
        >>> fmodel.running_mean, fmodel.num_batches_tracked
        (tensor([0.1000, 0.1000]), tensor(1))
    """
    if not isinstance(fmodule, _StatelessBase):
        raise TypeError(
            f"fmodule must be a functional module made by monkeypatch, got "
            f"{type(fmodule).__name__}."
        )
    target = _resolve_device(device)
    owners = dict(fmodule._sub.named_modules(remove_duplicate=False))
    copies: dict[int, Any] = {}
    for name, buffer in module.named_buffers(remove_duplicate=False):
        owner_name, _, key = name.rpartition(".")
        owner = owners.get(owner_name)
        if owner is None or key not in owner._buffers:
            raise KeyError(
                f"buffer '{name}' of module has no counterpart in fmodule; buffer_sync needs "
                "the model fmodule was made from (same structure)."
            )
        if id(buffer) not in copies:
            copies[id(buffer)] = _to(buffer.detach(), target)
        owner._buffers[key] = copies[id(buffer)]
