"""The stateless wrapper: an fmodel (:class:`FunctionalModule`) and its submodule views.

Both wrap a (sub)module of the fmodel's private copy whose parameter slots hold the latest
fast weights; a :class:`_Core` shared by the fmodel and its views holds the copy, its
:class:`_Layout` and the history of fast weights.  No class is created or patched at run
time.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from ._attention import second_order_attention
from ._layout import _call_with, _check_tensor, _Layout, _values_from
from ._module_copy import _seed_hooks, _snapshot

__all__ = ["FunctionalModule", "FunctionalSubmodule"]

DeviceLike = torch.device | str | int | None


class _Core:
    """State shared by an fmodel and its submodule views: the copy, layout and history."""

    def __init__(self, module: nn.Module, track: bool, layout: _Layout, attends: bool) -> None:
        self.module = module
        self.layout = layout
        initial: dict[int, Tensor] = {}
        for params, key, index in self.layout.slots:
            initial.setdefault(index, params[key])
        self.history: list[list[Tensor]] = [[initial[i] for i in range(len(initial))]]
        self.track = track
        # Tracking forwards need attention with a double backward (see _attention.py).
        self.attends = attends
        # Weak, so that views (which hold the core) form no reference cycle with it: an
        # fmodel is then freed as soon as it is dropped, without waiting for the collector.
        # Made on the first view: most inner loops never ask for one.
        self.views: weakref.WeakValueDictionary[str, FunctionalSubmodule] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Views are rebuilt on demand, so copies and pickles leave them out.
        return {key: value for key, value in self.__dict__.items() if key != "views"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.views = None

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
        if core.views is None:
            core.views = weakref.WeakValueDictionary()
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

    Not to be confused with :class:`higher_func.func.FunctionalModel`: this is higher's
    drop-in object (called like the model, it keeps the fast weights and their history, for
    ``innerloop_ctx`` code); ``FunctionalModel`` keeps nothing and takes the weights on every
    call, ``f(params, buffers, *inputs)``, for the pure, ``vmap``-able and compiled loops.

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
        from ._patch import monkeypatch  # the constructor builds the fmodel (a cycle at import)

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
