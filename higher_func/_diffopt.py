"""``higher``'s differentiable optimizer: the base class and its ``step``.

A :class:`DifferentiableOptimizer` is the differentiable twin of a live ``torch.optim``
optimizer: ``diffopt.step(loss)`` differentiates ``loss`` with respect to the current fast
weights, updates them and records the new ones in the functional module.  A user class
written for ``higher`` (a subclass implementing ``_update(grouped_grads)``) keeps working
unchanged; the built-in classes (``_rule_optimizer.py``) run the pure rules of
:mod:`higher_func.optim` instead.

What differs from ``higher`` on purpose:

* set-up copies no parameter (``higher`` deep-copied ``param_groups``, parameters included);
* with ``track_higher_grads=False`` parameters *and optimizer state* are detached after every
  step, and frozen parameters stay frozen;
* every ``torch.optim`` option is honoured (``maximize``, ``decoupled_weight_decay``, ...),
  and an option that no rule implements raises instead of being ignored;
* ``create_diff_optim`` accepts a list of parameter-group dicts;
* Boolean options are never turned into trainable tensors by
  :func:`get_trainable_opt_params`.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._dropin_checks import (
    check_like_params,
    check_no_shared_parameter,
    check_scalar_loss,
    check_some_gradient,
    detached,
    detached_deepcopy,
)
from ._hyperparams import (
    Override,
    Schedule,
    checked_override,
    checked_schedule,
    override_values,
    snapshot_hyperparameters,
)
from ._rules._registry import group_keys
from ._torch_state import copied_torch_state, seeds_from_defaults

__all__ = ["DifferentiableOptimizer"]

GradCallback = Callable[[tuple[Tensor | None, ...]], Iterable[Tensor | None]]


class DifferentiableOptimizer(abc.ABC):
    """The differentiable twin of a ``torch.optim`` optimizer (``higher``'s interface).

    Build one with :func:`get_diff_optim` (from a live optimizer), :func:`create_diff_optim`
    (from a class and its options) or :func:`higher_func.innerloop_ctx`.  Subclasses
    implement ``_update(grouped_grads, **kwargs)``: for each group ``i``, read the current
    parameters from ``self.param_groups[i]['params']``, their gradients from
    ``grouped_grads[i]`` (``None`` = leave unchanged), per-parameter state from
    ``self.state[i][j]``, and write the new parameters back into
    ``self.param_groups[i]['params'][j]``.  Nothing may be modified in place.

    Attributes:
        param_groups: one dict per group of the torch optimizer: its hyperparameters (a
            shallow copy; tensors not requiring grad are cloned, so a scheduler updating the
            torch optimizer in place cannot reach them; overrides replace entries) and
            ``'params'``, which holds the group's current fast weights during and after a step.
        state: per group, ``{position in group: {torch state key: tensor}}`` (for the
            built-in classes a read-only view of the rules' state).
        _group_to_param_list: per group, the indices of its parameters in
            ``reference_params`` (the order of ``fmodel.fast_params``).
        _fmodel: the functional module whose fast weights ``step`` reads and records.
        _track_higher_grads: whether steps keep the graph (see :attr:`track_higher_grads`).
        _grad_callback: the default ``grad_callback``.

    History semantics: every :meth:`step` records exactly one new entry in ``fmodel`` (its
    ``update_params``); with ``track_higher_grads=False`` the fmodel keeps only the latest.

    Example (a custom optimizer written for ``higher``):
        >>> import torch, higher_func as hf
        >>> class PlainSGD(torch.optim.SGD):
        ...     pass
        >>> class DifferentiablePlainSGD(hf.optim.DifferentiableOptimizer):
        ...     def _update(self, grouped_grads, **kwargs):
        ...         for group, grads in zip(self.param_groups, grouped_grads):
        ...             for j, (p, g) in enumerate(zip(group["params"], grads)):
        ...                 if g is not None:
        ...                     group["params"][j] = p - group["lr"] * g
        >>> hf.register_optim(PlainSGD, DifferentiablePlainSGD)
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> with hf.innerloop_ctx(model, PlainSGD(model.parameters(), lr=0.5)) as (fm, diffopt):
        ...     new = diffopt.step(fm(torch.ones(1, 1)).sum())
        >>> new[0]
        tensor([[0.5000]], grad_fn=<SubBackward0>)
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: torch.device | str | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        *,
        schedule: Schedule | None = None,
    ) -> None:
        """Mirror ``other``'s parameter groups and state over ``reference_params``.

        Args:
            other: the ``torch.optim`` optimizer to mirror; its state (momentum buffers,
                moments, step counts) is imported detached, and nothing is written back.
            reference_params: the parameters of the module ``other`` optimizes, in
                ``module.parameters()`` order (the order of ``fmodel.fast_params``).
            fmodel: the functional module whose fast weights ``step`` updates; without it,
                pass ``params=`` to every ``step``.
            device: where to move the imported optimizer state (default: where it is).
            override: ``{name: [value]}`` (all groups) or ``{name: [v0, v1, ...]}`` (one per
                group) replacing hyperparameters; tensors requiring grad receive
                hypergradients.  Persists for every later step.
            grad_callback: ``grads -> grads`` applied to the tuple of gradients (in
                ``reference_params`` order, ``None`` included) before every update.
            track_higher_grads: keep the graph through the steps (``False``: first-order /
                test mode; parameters and state are detached after every step).
            schedule: ``{name: fn}`` or ``{name: [fn0, fn1, ...]}``: before step ``t``
                (counted from 0), the hyperparameter ``name`` is set to ``fn(t)``, like an
                override given to that step.
        """
        check_optimizer(other)
        reference = checked_tensors("reference_params", reference_params)
        position = {id(t): k for k, t in enumerate(reference)}
        self._group_to_param_list = group_keys(other, position, "reference_params")
        check_no_shared_parameter(self._group_to_param_list)
        seeds = seeds_from_defaults(other)
        self.param_groups: list[dict[str, Any]] = [
            {**snapshot_hyperparameters(group), **seeds, "params": [None] * len(group["params"])}
            for group in other.param_groups
        ]
        self._num_params = len(reference)
        self._fmodel = fmodel
        if fmodel is not None:
            _check_fmodel(fmodel, len(reference))
        self._device = device
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)
        self._step_count = 0
        self._first_order_anchor: list[Tensor] | None = None
        self._schedule = checked_schedule(schedule, len(self.param_groups))
        if override is not None:
            self._apply_override(override)
        self._import_state(other, reference)

    # ------------------------------------------------------------------ public interface

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep the graph for higher-order gradients (settable)."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        self._track_higher_grads = bool(value)

    @property
    def step_count(self) -> int:
        """How many steps this optimizer has taken (what schedules are called with)."""
        return self._step_count

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One differentiable optimizer step: ``diffopt.step(loss)`` replaces
        ``opt.zero_grad(); loss.backward(); opt.step()``.

        Args:
            loss: a scalar tensor computed from the current fast weights.
            params: the fast weights to update, in ``reference_params`` order (default: the
                fmodel's latest).  Needed when the optimizer has no fmodel.
            override: like the constructor's; applies from this step on (and persists).
            grad_callback: replaces the constructor's callback for this step.
            **kwargs: passed to ``_update`` (for custom optimizers).

        Returns:
            The new fast weights (all of them, in ``reference_params`` order).  Parameters
            that do not require grad, or that ``loss`` does not use, are returned unchanged.
            They are also recorded in the fmodel (one history entry).

        Raises:
            ValueError: ``loss`` is not a scalar, or depends on none of the fast weights (the
                classic ``model(x)`` for ``fmodel(x)``), or a hyperparameter this step uses is
                invalid (torch's wording; ``torch.optim`` checks only its constructor's
                arguments, so values in ``param_groups`` are checked when a step uses them).
        """
        if self._schedule:
            self._apply_override(self._scheduled_values())
        if override is not None:
            self._apply_override(override)
        params = self._params_for_step(params)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        # Weights a step may differentiate besides ``params`` (a flat group's), unless a
        # callback is to change the gradients.
        also = self._also_differentiated(params) if callback is None else {}
        found, also_grads = gradients(loss, params, self._track_higher_grads, also)
        grads: Sequence[Tensor | None] = found
        if callback is not None:
            grads = checked_callback_grads(callback(found), params)
        new_params = self._updated(params, grads, also_grads, **kwargs)
        if not self._track_higher_grads:
            new_params = [self._untracked(params, new, k) for k, new in enumerate(new_params)]
            self.detach_state()
        self._publish(new_params)
        self._step_count += 1
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def detach_state(self) -> None:
        """Cut the optimizer state's graph here (what :func:`higher_func.truncate` and the
        untracked steps do): later steps are differentiated back to this point only."""
        for group_state in self.state:
            for position, entry in group_state.items():
                group_state[position] = detached(entry)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A detached snapshot (state and hyperparameter tensors detached, same
        ``requires_grad``), with a detached copy of its fmodel, as ``copy.deepcopy(fmodel)``
        gives; copied together with its fmodel, the copies stay linked."""
        return detached_deepcopy(self, memo)

    # ------------------------------------------------------------------ higher's protocol

    @abc.abstractmethod
    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Write each group's new parameters into ``self.param_groups[i]['params']``."""

    def _updated(
        self,
        params: list[Tensor],
        grads: Sequence[Tensor | None],
        also_grads: Mapping[int, Tensor | None],
        **kwargs: Any,
    ) -> list[Tensor]:
        """The new fast weights (``higher``'s protocol: through ``_update``)."""
        del also_grads
        grouped_grads = []
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            group["params"] = [params[k] for k in indices]
            grouped_grads.append([grads[k] for k in indices])
        self._update(grouped_grads, **kwargs)
        new_params = list(params)
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            for k, new in zip(indices, group["params"], strict=True):
                new_params[k] = new
        return new_params

    def _also_differentiated(self, params: list[Tensor]) -> dict[int, Tensor]:
        """``{key: tensor}`` to differentiate together with ``params`` (none here)."""
        del params
        return {}

    def _import_state(self, other: torch.optim.Optimizer, reference: list[Tensor]) -> None:
        """``self.state[i][j]``: ``other``'s state of group ``i``'s ``j``-th parameter."""
        del reference
        self.state: list[collections.defaultdict[int, dict[str, Any]]] = copied_torch_state(
            other, self._device
        )

    def _check_override_key(self, key: str) -> None:
        """Raise if ``key`` cannot be overridden (any key is accepted for custom classes)."""
        del key

    # ------------------------------------------------------------------ internals

    def _connect_first_order(self, initial_params: list[Tensor]) -> None:
        """First-order MAML (``innerloop_ctx(first_order=True)``): the untracked steps'
        results stay connected to ``initial_params`` with an identity Jacobian."""
        self._first_order_anchor = initial_params

    def _apply_override(self, override: Override) -> None:
        per_group = {}
        for key, values in checked_override(override).items():
            self._check_override_key(key)
            per_group[key] = override_values(key, values, len(self.param_groups))
        for key, values in per_group.items():
            for group, value in zip(self.param_groups, values, strict=True):
                group[key] = value

    def _scheduled_values(self) -> dict[str, list[Any]]:
        return {k: [fn(self._step_count) for fn in fns] for k, fns in self._schedule.items()}

    def _params_for_step(self, params: Iterable[Tensor] | None) -> list[Tensor]:
        if params is None:
            if self._fmodel is None:
                raise ValueError(
                    "step() needs params= (the current fast weights, in reference_params "
                    "order) because this optimizer was built without an fmodel."
                )
            return list(self._fmodel.fast_params)  # checked by the fmodel when recorded
        result = checked_tensors("params", params)
        if len(result) != self._num_params:
            raise ValueError(
                f"params has {len(result)} tensors but the optimizer was built over "
                f"{self._num_params} reference parameters. Pass every fast weight, in "
                f"model.parameters() order (fmodel.fast_params)."
            )
        return result

    def _publish(self, new_params: list[Tensor]) -> None:
        """``param_groups[i]['params']``: the group's new fast weights (``higher``'s)."""
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            group["params"] = [new_params[k] for k in indices]

    def _untracked(self, params: list[Tensor], new: Tensor, index: int) -> Tensor:
        """The ``index``-th parameter recorded after an untracked step from ``params``
        (detached, or first-order MAML's)."""
        old = params[index]
        if new is old:
            return new
        anchor = self._first_order_anchor
        if anchor is not None and old.requires_grad and anchor[index].requires_grad:
            # Value of ``new``, Jacobian of the identity w.r.t. the initial weights: the
            # outer gradient reaching them is first-order MAML's.
            return anchor[index] + (new - anchor[index]).detach()
        return new.detach().requires_grad_(old.requires_grad)


# --------------------------------------------------------------------------- helpers


def gradients(
    loss: Tensor, params: list[Tensor], create_graph: bool, also: Mapping[int, Tensor]
) -> tuple[tuple[Tensor | None, ...], dict[int, Tensor | None]]:
    """``d loss / d p`` for every ``p`` requiring grad (``None`` for the others and unused
    ones) and, in the same backward pass, for each tensor of ``also`` (flat weights that
    the trainable ``params`` are views of)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a scalar torch.Tensor, got {type(loss).__name__}.")
    check_scalar_loss(loss)
    trainable = [k for k, p in enumerate(params) if p.requires_grad]
    if not trainable:
        return (None,) * len(params), dict.fromkeys(also)
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad: it was not computed from the trainable fast weights "
            "(was it computed under torch.no_grad(), or from detached parameters?)."
        )
    every = len(trainable) == len(params)  # the common case: no list to gather or scatter
    inputs = params if every else [params[k] for k in trainable]
    found = torch.autograd.grad(
        loss,
        [*inputs, *also.values()] if also else inputs,
        create_graph=create_graph,
        allow_unused=True,
    )
    if every:
        grads: tuple[Tensor | None, ...] = found[: len(params)] if also else found
    else:
        scattered: list[Tensor | None] = [None] * len(params)
        for k, g in zip(trainable, found, strict=False):
            scattered[k] = g
        grads = tuple(scattered)
    check_some_gradient(grads)
    return grads, dict(zip(also, found[len(trainable) :], strict=True))


def checked_callback_grads(grads: Any, params: list[Tensor]) -> list[Tensor | None]:
    """A ``grad_callback``'s result as a list, checked: one gradient (or ``None``) per
    parameter, each shaped like it."""
    if isinstance(grads, Tensor) or not isinstance(grads, Iterable):
        raise TypeError(
            f"grad_callback must return a sequence of gradients (tensors or None), got "
            f"{type(grads).__name__}."
        )
    result = list(grads)
    if len(result) != len(params):
        raise ValueError(
            f"grad_callback returned {len(result)} gradients for {len(params)} parameters; "
            f"return one per parameter (None to leave a parameter unchanged)."
        )
    check_like_params("grad_callback's result", result, params)
    return result


def checked_tensors(argument: str, values: Iterable[Tensor]) -> list[Tensor]:
    """``values`` as a list, each a tensor (else a ``TypeError`` naming ``argument``)."""
    if isinstance(values, Tensor) or not isinstance(values, Iterable):
        raise TypeError(
            f"{argument} must be an iterable of tensors (e.g. model.parameters()), got "
            f"{type(values).__name__}."
        )
    result = list(values)
    for index, value in enumerate(result):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{argument}[{index}] must be a torch.Tensor, got {type(value).__name__}."
            )
    return result


def check_optimizer(other: Any) -> None:
    """Raise unless ``other`` is a ``torch.optim.Optimizer``."""
    if not isinstance(other, torch.optim.Optimizer):
        raise TypeError(
            f"other must be a torch.optim.Optimizer, got {type(other).__name__}. Build the "
            f"differentiable optimizer from the torch optimizer of your model."
        )


def _check_fmodel(fmodel: Any, count: int) -> None:
    names = getattr(fmodel, "param_names", None)
    if names is not None and len(names) != count:
        raise ValueError(
            f"fmodel has {len(names)} parameters but reference_params has {count}. Pass the "
            f"parameters of the module fmodel was made from (model.parameters())."
        )
