"""From a ``torch.optim`` optimizer to its differentiable twin: :func:`get_diff_optim`,
:func:`create_diff_optim` and :func:`register_optim` (``higher``'s constructors), served by
the one registry of ``_rules/_registry.py``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from ._diffopt import DifferentiableOptimizer, checked_tensors
from ._hyperparams import Override
from ._rule_optimizer import DifferentiableRuleOptimizer
from ._rules._registry import differentiable_classes, register_differentiable_class, registration

__all__ = ["create_diff_optim", "get_diff_optim", "register_optim"]


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable twin of a live ``torch.optim`` optimizer.

    Args:
        opt: the optimizer (it may have stepped: its state is imported, detached).
        reference_params: the parameters of the module ``opt`` optimizes, in
            ``module.parameters()`` order.
        fmodel, device, override, track_higher_grads: see
            :class:`DifferentiableOptimizer`.
        **kwargs: passed to the constructor (``grad_callback=``, ``schedule=``).

    Returns:
        An instance of the class registered for ``type(opt)``.

    Example:
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> diffopt = hf.get_diff_optim(opt, model.parameters())
        >>> params = diffopt.step(model(torch.ones(1, 2)).sum(), params=model.parameters())
        >>> [tuple(p.shape) for p in params]
        [(1, 2), (1,)]
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"opt must be a torch.optim.Optimizer instance, got {type(opt).__name__}. To build "
            f"one from a class and its options, use create_diff_optim(opt_type, opt_kwargs, ...)."
        )
    cls = differentiable_class(type(opt))
    return cls(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[Tensor] | Iterable[Mapping[str, Any]] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer built from a ``torch.optim`` class and its options.

    Args:
        opt_type: the ``torch.optim`` class (``torch.optim.Adam``).
        opt_kwargs: its constructor options (``{"lr": 0.1}``).
        params: the fast weights to optimize, or a list of parameter-group dicts
            (``[{"params": [...], "lr": 0.1}, ...]``) over them.  With ``fmodel``, the
            tensors may be any subset of ``fmodel.fast_params`` (matched by identity) or, in
            order, stand-ins of the same shapes for all of them.  Default: all of
            ``fmodel``'s fast weights in one group.
        fmodel, device, override, track_higher_grads, **kwargs: as in
            :func:`get_diff_optim`.

    Returns:
        The differentiable optimizer; its state is initialised at the first step.  No
        parameter is copied: the torch optimizer used to fill in the defaults is built over
        empty stand-ins.

    Example:
        >>> import torch, higher_func as hf
        >>> w, b = torch.ones(2, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> diffopt = hf.create_diff_optim(
        ...     torch.optim.SGD, {"lr": 0.5}, params=[{"params": [w]}, {"params": [b], "lr": 1.0}]
        ... )
        >>> diffopt.step((w.sum() + b.sum()) ** 2, params=[w, b])
        [tensor([-1., -1.], grad_fn=<SubBackward0>), tensor([-4.], grad_fn=<SubBackward0>)]
    """
    if not (isinstance(opt_type, type) and issubclass(opt_type, torch.optim.Optimizer)):
        raise TypeError(
            f"opt_type must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), got "
            f"{opt_type!r}. For an optimizer instance, use get_diff_optim(opt, ...)."
        )
    cls = differentiable_class(opt_type)
    groups = _param_groups("params", params, fmodel)
    reference = _reference_for_groups(groups, fmodel)
    position = {id(t): k for k, t in enumerate(reference)}
    stand_ins = [t.new_empty(0) for t in reference]
    stand_in_groups = [
        {**group, "params": [stand_ins[position[id(t)]] for t in group["params"]]}
        for group in groups
    ]
    opt = opt_type(stand_in_groups, **dict(opt_kwargs or {}))
    return cls(
        opt,
        stand_ins,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Use ``diff_optim_type`` for optimizers of class ``optim_type`` (``higher``'s hook).

    Args:
        optim_type: the ``torch.optim.Optimizer`` subclass (the torch class).
        diff_optim_type: a :class:`DifferentiableOptimizer` subclass implementing its math,
            e.g. a ``higher``-style class with ``_update(self, grouped_grads, **kwargs)``.

    Example:
        >>> import torch, higher_func as hf
        >>> class MySGD(torch.optim.SGD):
        ...     pass
        >>> hf.register_optim(MySGD, hf.optim.DifferentiableSGD)
        >>> model = torch.nn.Linear(2, 1)
        >>> type(hf.get_diff_optim(MySGD(model.parameters(), lr=0.1), model.parameters())).__name__
        'DifferentiableSGD'
    """
    if isinstance(optim_type, type) and issubclass(optim_type, DifferentiableOptimizer):
        raise TypeError(
            f"register_optim takes the torch optimizer class first, then the differentiable "
            f"one: register_optim(TorchOptimizerClass, {optim_type.__name__})."
        )
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}.")
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"diff_optim_type must be a subclass of higher_func.optim.DifferentiableOptimizer "
            f"(implementing _update(self, grouped_grads, **kwargs)), got {diff_optim_type!r}."
        )
    register_differentiable_class(optim_type, diff_optim_type)


def differentiable_class(optimizer_class: type) -> type[DifferentiableOptimizer]:
    """The class for ``optimizer_class``: that registered for its nearest base (in method
    resolution order) with a registration, so ``class MyAdam(torch.optim.Adam)`` gets Adam's;
    the rule-backed class where only a rule is registered."""
    return registration(optimizer_class).differentiable_class or DifferentiableRuleOptimizer


class DifferentiableClasses(MutableMapping[type, type]):
    """``higher.optim._opt_mapping``: the registry's differentiable classes as a dict
    (writing an entry is :func:`register_optim`)."""

    def __getitem__(self, optimizer_class: type) -> type:
        return differentiable_classes()[optimizer_class]

    def __setitem__(self, optimizer_class: type, diff_optim_type: type) -> None:
        register_optim(optimizer_class, diff_optim_type)

    def __delitem__(self, optimizer_class: type) -> None:
        raise TypeError("registered differentiable classes cannot be removed.")

    def __iter__(self) -> Iterator[type]:
        return iter(differentiable_classes())

    def __len__(self) -> int:
        return len(differentiable_classes())


def _param_groups(argument: str, params: Any, fmodel: Any) -> list[dict[str, Any]]:
    """``params`` as a list of group dicts with a list of tensors each."""
    if params is None:
        if fmodel is None:
            raise ValueError(
                "create_diff_optim needs params= (the fast weights, or a list of parameter-group "
                "dicts) or fmodel= (whose fast weights it then optimizes)."
            )
        return [{"params": list(fmodel.fast_params)}]
    if isinstance(params, Tensor):
        raise TypeError(f"{argument} must be a list of tensors or of group dicts, got a Tensor.")
    items = list(params)
    if items and all(isinstance(item, Mapping) for item in items):
        groups = []
        for g, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"{argument}[{g}] is a parameter group without a 'params' key.")
            group_params = group["params"]
            tensors = [group_params] if isinstance(group_params, Tensor) else group_params
            groups.append(
                {**group, "params": checked_tensors(f"{argument}[{g}]['params']", tensors)}
            )
        return groups
    return [{"params": checked_tensors(argument, items)}]


def _reference_for_groups(groups: list[dict[str, Any]], fmodel: Any) -> list[Tensor]:
    """The reference order: fmodel's fast weights if the groups hold them (a subset is fine),
    else the groups' tensors in order (with fmodel, they must then stand for all of them)."""
    listed = [t for group in groups for t in group["params"]]
    if fmodel is None:
        return listed
    fast = list(fmodel.fast_params)
    fast_ids = {id(t) for t in fast}
    if all(id(t) in fast_ids for t in listed):
        return fast
    shapes_match = len(listed) == len(fast) and all(
        a.shape == b.shape for a, b in zip(listed, fast, strict=True)
    )
    if not shapes_match:
        raise ValueError(
            f"params holds {len(listed)} tensors that are not fmodel's fast weights and do not "
            f"match them one for one in order and shape ({len(fast)} fast weights). Pass "
            f"fmodel.fast_params (or groups over a subset of them)."
        )
    return listed
