"""Functional inner loops: k steps of a rule with ``torch.func.grad``, batched with ``vmap``.

The math of gradient-based meta-learning, written as functions::

    phi_0 = theta
    phi_{k+1}, s_{k+1} = rule.step(phi_k, grad L_support(phi_k), s_k)      k < K
    meta-loss(theta) = L_query(phi_K)

* :class:`FunctionalModel` turns an ``nn.Module`` into ``f(params, buffers, *inputs)``.
* :func:`inner_loop` runs the K steps for one task and returns ``phi_K`` (and more).
* :func:`meta_loss` is ``L_query(phi_K(theta))`` for one task; :func:`batched_meta_loss`
  vmaps it over a batch of tasks, ``theta`` shared.
* :class:`MetaObjective` builds the same batched meta-loss from the pieces of
  ``innerloop_ctx`` code: a model, its torch inner optimizer and a per-task loss.

Inner gradients come from ``torch.func.grad`` (never ``autograd.grad(create_graph=True)``),
so the whole meta-gradient can be vmapped over tasks and compiled with ``torch.compile``.

Randomness under ``vmap``: dropout and other random ops raise by default
(``randomness="error"``); pass ``randomness="different"`` for independent draws per task
(what a per-task loop does) or ``"same"`` for one draw shared by all tasks.  Neither
reproduces a per-task loop's random numbers bit for bit: compare with dropout off.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from ._attention import second_order_attention, vmap_attention
from ._batching import BATCHING, batch_tasks, choose_batching, loop_over_tasks
from ._norm import exact_norms, may_normalize
from ._recompute import recomputed_inner_loop
from ._rules._registry import from_torch_optimizer

__all__ = [
    "FunctionalModel",
    "InnerLoop",
    "MetaObjective",
    "OptimizerRule",
    "batched_meta_loss",
    "inner_loop",
    "meta_loss",
    "rule_from_optimizer",
]

Params = Mapping[str, Tensor]
Hyperparameters = Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None
_RANDOMNESS = ("error", "different", "same")
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- the model


class FunctionalModel:
    """An ``nn.Module`` as a pure function ``f(params, buffers, *inputs)``.

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


# --------------------------------------------------------------------------- one task


class InnerLoop(NamedTuple):
    """What :func:`inner_loop` returns.

    Attributes:
        params: the adapted parameters ``phi_K``, keyed like the input ``params``.
        state: the rule's state after the K steps.
        buffers: the buffers after the K forwards (``None`` when none were given).
        losses: the inner losses ``L_support(phi_k)`` for ``k = 0 .. K-1``, shape ``(K,)``.
        trajectory: ``(phi_0, ..., phi_K)`` when asked for with ``trajectory=True``,
            else ``None``.

    Example:
        >>> import torch, higher_func as hf
        >>> square = lambda p: (p["w"] - 3.0) ** 2
        >>> rule, params = hf.optim.sgd(lr=0.25), {"w": torch.tensor(1.0)}
        >>> result = hf.func.inner_loop(square, rule, params, steps=2, trajectory=True)
        >>> result.params["w"], result.losses, len(result.trajectory)
        (tensor(2.5000), tensor([4., 1.]), 3)
    """

    params: Any
    state: Any
    buffers: Any
    losses: Tensor
    trajectory: tuple[Any, ...] | None


def inner_loop(
    loss: Callable[..., Any],
    rule: Any,
    params: Any,
    *batch: Any,
    steps: int = 1,
    state: Any = None,
    buffers: Params | None = None,
    hyperparameters: Hyperparameters = None,
    first_order: bool = False,
    truncate: int | None = None,
    trajectory: bool = False,
    recompute: bool = False,
) -> InnerLoop:
    """K differentiable steps of ``rule`` on ``loss``: ``phi_{k+1} = step(phi_k, grad L(phi_k))``.

    Gradients come from ``torch.func.grad``; the result is differentiable with respect to
    ``params`` (and to any tensor hyperparameter) to every order, by ``torch.func``
    transforms or by ``.backward()``, and the function runs under ``vmap`` and
    ``torch.compile``.

    Args:
        loss: ``loss(params, *batch) -> scalar``; with ``buffers`` given,
            ``loss(params, buffers, *batch) -> (scalar, new_buffers)`` (e.g. built on
            :meth:`FunctionalModel.with_buffers`), so running statistics carry from step
            to step.
        rule: an update rule from :mod:`higher_func.optim` (``hf.optim.sgd(lr=0.1)``), or
            anything with ``init(params)`` and ``step(params, grads, state, **overrides)``.
        params: the starting point ``phi_0`` (a dict of tensors, or any pytree of them).
            Every leaf is adapted; leave a tensor out to freeze it.  A parameter the loss
            does not use gets a zero gradient (``torch.func.grad`` cannot tell "unused"
            from "zero"), so with weight decay or momentum it still moves: leave it out.
        *batch: the task's data, passed on to ``loss``.
        steps: K, the number of steps (``>= 0``).
        state: the rule's starting state (default ``rule.init(params)``), e.g. imported
            from a torch optimizer.
        buffers: the model's buffers, threaded through the steps (see ``loss``).
        hyperparameters: overrides for every step (``{"lr": lr}``; tensors requiring grad
            receive hypergradients), or a function ``k -> overrides`` for a schedule
            (``lambda k: {"lr": lrs[k]}``).
        first_order: use ``stop_gradient(grad L(phi_k))`` (first-order MAML): the
            meta-gradient skips second derivatives but still reaches ``params`` and the
            hyperparameters through the steps.
        truncate: differentiate through the last ``truncate`` steps only; the earlier
            ones run without building a graph (truncated backpropagation, Shaban et al.
            2019), so nothing before them (``params`` included) receives a gradient
            through them.  ``None`` differentiates through all steps.
        trajectory: also return every iterate ``(phi_0, ..., phi_K)``.
        recompute: keep no graph across steps: store each step's iterate (params, state,
            buffers) and rebuild one step at a time in the backward pass
            (:mod:`higher_func._recompute`).  Same meta-gradient, memory bounded by the
            iterates plus one step's graph, about one extra inner step per step of time.
            Reverse mode only; every tensor requiring grad must be passed in (``params``,
            ``state``, ``buffers``, ``hyperparameters``, the batch or the rule).

    Returns:
        An :class:`InnerLoop` ``(params, state, buffers, losses, trajectory)``.

    Example:
        >>> import torch, higher_func as hf
        >>> theta = {"w": torch.tensor(1.0, requires_grad=True)}
        >>> square = lambda p, target: (p["w"] - target) ** 2
        >>> result = inner_loop(square, hf.optim.sgd(lr=0.25), theta, torch.tensor(3.0), steps=2)
        >>> result.params["w"]  # 1 -> 2 -> 2.5
        tensor(2.5000, grad_fn=<SubBackward0>)
        >>> torch.autograd.grad(result.params["w"], theta["w"])[0]  # (1 - 2 * 0.25) ** 2
        tensor(0.2500)
    """
    _check_rule(rule)
    _check_steps(steps, truncate)
    _check_callable("loss", loss)
    if state is None:
        state = rule.init(params)
    objective = _objective(loss, stateful=buffers is not None)
    if recompute and steps and truncate != 0:  # else there is no graph to spare
        schedule = [_overrides_at(hyperparameters, k) for k in range(steps)]
        start, flags = (params, state, buffers), (first_order, truncate, trajectory)
        return InnerLoop(*recomputed_inner_loop(objective, rule, start, batch, schedule, *flags))
    history = [params]
    losses = []
    for k in range(steps):
        differentiable = truncate is None or k >= steps - truncate
        with nullcontext() if differentiable else torch.no_grad():
            overrides = _overrides_at(hyperparameters, k)
            at = _detach(params) if first_order else params
            with second_order_attention(not first_order):
                grads, (value, new_buffers) = grad(objective, has_aux=True)(at, buffers, *batch)
            buffers = new_buffers if buffers is not None else None
            params, state = rule.step(params, grads, state, **overrides)
        losses.append(value)
        if trajectory:
            history.append(params)
    stacked = torch.stack(losses) if losses else _no_losses(params)
    return InnerLoop(params, state, buffers, stacked, tuple(history) if trajectory else None)


def _no_losses(params: Any) -> Tensor:
    leaves = optree.tree_leaves(params)
    return leaves[0].new_zeros(0) if leaves else torch.zeros(0)


def _objective(loss: Callable[..., Any], stateful: bool) -> Callable[..., Any]:
    """``loss`` as ``(params, buffers, *batch) -> (value, (value, new_buffers))``.

    Without buffers the auxiliary output is ``(value, {})`` (``grad`` cannot return ``None``).
    """

    def objective(params: Any, buffers: Any, *batch: Any) -> tuple[Tensor, Any]:
        if stateful:
            value, buffers = _split_stateful(loss(params, buffers, *batch))
        else:
            value, buffers = loss(params, *batch), {}
        _check_scalar(value)
        return value, (value, buffers)

    return objective


def _split_stateful(result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(
            "With buffers=..., loss(params, buffers, *batch) must return (loss, new_buffers), "
            f"got {type(result).__name__}. Return e.g. (F.mse_loss(out, y), new_buffers) with "
            "out, new_buffers = fmodel.with_buffers(params, buffers, x)."
        )
    return result


def _check_scalar(value: Any) -> None:
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else (type(value).__name__)
        )
        raise TypeError(
            f"loss must return a scalar tensor, got {got}. Reduce it, e.g. with .mean()."
        )


def _detach(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.detach(), tree)


def _overrides_at(hyperparameters: Hyperparameters, k: int) -> Mapping[str, Any]:
    if hyperparameters is None:
        return {}
    # isinstance before callable(): dynamo cannot trace callable() on a dict.
    if isinstance(hyperparameters, Mapping):
        return hyperparameters
    overrides = hyperparameters(k) if callable(hyperparameters) else None
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"hyperparameters must be a dict of overrides (e.g. {{'lr': lr}}) or a function "
            f"step -> dict, got {type(hyperparameters).__name__}"
            f"{f' returning {type(overrides).__name__}' if callable(hyperparameters) else ''}."
        )
    return overrides


def meta_loss(
    loss: Callable[..., Any],
    rule: Any,
    params: Any,
    support: Any,
    query: Any,
    *,
    query_loss: Callable[..., Any] | None = None,
    steps: int = 1,
    state: Any = None,
    buffers: Params | None = None,
    hyperparameters: Hyperparameters = None,
    first_order: bool = False,
    truncate: int | None = None,
    recompute: bool = False,
) -> Tensor:
    """One task's meta-loss ``L_query(phi_K(params))`` after :func:`inner_loop` on ``support``.

    Args:
        loss: the inner (support) loss, as in :func:`inner_loop`.
        rule, params, steps, state, buffers, hyperparameters, first_order, truncate,
            recompute: as in :func:`inner_loop`.
        support: the support batch, a tuple of arguments for ``loss`` (a single tensor is
            taken as a 1-tuple).
        query: the query batch, likewise.
        query_loss: the outer loss, same signature as ``loss`` (default ``loss``).  With
            ``buffers``, it runs with the adapted buffers and its buffer updates are
            dropped.

    Returns:
        The scalar meta-loss, differentiable with respect to ``params``.

    Example:
        >>> import torch, higher_func as hf
        >>> theta = {"w": torch.tensor(0.0, requires_grad=True)}
        >>> square = lambda p, target: (p["w"] - target) ** 2
        >>> meta_loss(square, hf.optim.sgd(lr=0.25), theta, torch.tensor(2.0), torch.tensor(1.0))
        tensor(0., grad_fn=<PowBackward0>)
    """
    adapted = inner_loop(
        loss,
        rule,
        params,
        *_as_tuple(support),
        steps=steps,
        state=state,
        buffers=buffers,
        hyperparameters=hyperparameters,
        first_order=first_order,
        truncate=truncate,
        recompute=recompute,
    )
    outer = loss if query_loss is None else query_loss
    if buffers is None:
        value = outer(adapted.params, *_as_tuple(query))
    else:
        value, _ = _split_stateful(outer(adapted.params, adapted.buffers, *_as_tuple(query)))
    _check_scalar(value)
    return value


# --------------------------------------------------------------------------- many tasks


def batched_meta_loss(
    loss: Callable[..., Any],
    rule: Any,
    params: Any,
    support: Any,
    query: Any,
    *,
    query_loss: Callable[..., Any] | None = None,
    steps: int = 1,
    state: Any = None,
    buffers: Params | None = None,
    hyperparameters: Hyperparameters = None,
    task_hyperparameters: Mapping[str, Tensor] | None = None,
    first_order: bool = False,
    truncate: int | None = None,
    reduction: str = "mean",
    randomness: str = "error",
    chunk_size: int | None = None,
    recompute: bool = False,
    batching: str = "auto",
) -> Tensor:
    """:func:`meta_loss` over a batch of tasks in one ``vmap``, ``params`` shared.

    ``params``, ``state``, ``buffers`` and ``hyperparameters`` are shared by all tasks
    (``in_dims=None``); every tensor in ``support``, ``query`` and
    ``task_hyperparameters`` has the task as its first dimension.  The result equals a
    Python loop over tasks of :func:`meta_loss` (tested in float64 to 1e-10, batch and
    layer norms included) and is differentiable with respect to ``params`` and to tensor
    hyperparameters, by ``.backward()`` or ``torch.func.grad``; the whole meta-gradient
    compiles with ``torch.compile(fullgraph=True)``.

    Args:
        loss, rule, params, query_loss, steps, state, buffers, hyperparameters,
            first_order, truncate, recompute: as in :func:`meta_loss`.
        support: per-task support data: a tuple of tensors (or one tensor) of shape
            ``(tasks, ...)``.
        query: per-task query data, likewise.
        task_hyperparameters: per-task overrides applied at every step, e.g.
            ``{"lr": lrs}`` with ``lrs`` of shape ``(tasks,)`` (learned per-task learning
            rates); they take precedence over ``hyperparameters``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one loss per task).
        randomness: ``vmap``'s policy for random ops such as dropout: ``"error"`` (raise),
            ``"different"`` (independent per task) or ``"same"`` (one draw for all).
        chunk_size: vmap this many tasks at a time (less memory, same result).
        batching: ``"auto"`` (default): ``vmap``, or a per-task loop with a one-time
            warning naming the module or op when ``vmap`` cannot batch the model (an
            ``nn.LSTM``, a training-mode ``spectral_norm``, transformers' 0/1 attention
            masks); ``"vmap"``: raise a :class:`~higher_func.func.BatchingError` naming the
            module and the fix instead; ``"loop"``: always the loop (same result; random
            ops draw per task, or from one state with ``randomness="same"``).

    Returns:
        The reduced meta-loss (shape ``()``; ``(tasks,)`` with ``reduction="none"``).

    Example:
        >>> import torch, higher_func as hf
        >>> theta = {"w": torch.tensor(0.0, requires_grad=True)}
        >>> square = lambda p, target: ((p["w"] - target) ** 2).mean()
        >>> targets = torch.tensor([[1.0], [2.0]])
        >>> losses = batched_meta_loss(square, hf.optim.sgd(lr=0.25), theta, targets, targets,
        ...                            reduction="none")
        >>> losses.detach()  # per task: (0.5 * target) ** 2
        tensor([0.2500, 1.0000])
    """
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("randomness", randomness, _RANDOMNESS)
    _check_choice("batching", batching, BATCHING)
    support, query = _as_tuple(support), _as_tuple(query)
    per_task = dict(task_hyperparameters or {})
    tasks = _check_task_batch(support, query, per_task)
    options: dict[str, Any] = {
        "query_loss": query_loss,
        "steps": steps,
        "first_order": first_order,
        "truncate": truncate,
        "recompute": recompute,
    }

    def task_loss(
        params: Any, state: Any, buffers: Any, support: Any, query: Any, per_task: Any
    ) -> Tensor:
        return meta_loss(
            loss,
            rule,
            params,
            support,
            query,
            state=state,
            buffers=buffers,
            hyperparameters=_with_task_overrides(hyperparameters, per_task),
            **options,
        )

    def vmapped() -> Tensor:
        with vmap_attention(params):
            return vmap(
                task_loss,
                in_dims=(None, None, None, 0, 0, 0),
                randomness=randomness,
                chunk_size=chunk_size,
            )(params, state, buffers, support, query, per_task)

    def one_task(i: int) -> Tensor:
        batches: Any = (support, query, per_task)
        return task_loss(params, state, buffers, *optree.tree_map(lambda t: t[i], batches))

    def looped() -> Tensor:
        return loop_over_tasks(tasks, one_task, randomness)

    try:
        losses = batch_tasks(vmapped, looped, batching, "batched_meta_loss")
    except RuntimeError as error:
        if "randomness error mode" not in str(error):
            raise
        raise RuntimeError(_RANDOM_OP_UNDER_VMAP) from None
    return _reduce(losses, reduction)


_RANDOM_OP_UNDER_VMAP = (
    "A random operation (e.g. dropout) ran inside the task batch, which randomness='error' "
    "(the default) refuses. Pass randomness='different' (independent draws per task, like "
    "a loop over tasks) or randomness='same' (one draw shared by all tasks) to "
    "MetaObjective(...) or batched_meta_loss(...), or put the model in eval() mode."
)


def _with_task_overrides(shared: Hyperparameters, per_task: Mapping[str, Any]) -> Hyperparameters:
    if not per_task:
        return shared
    if shared is None or isinstance(shared, Mapping):
        return {**(shared or {}), **per_task}
    schedule = shared
    return lambda k: {**_overrides_at(schedule, k), **per_task}


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _as_tuple(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)


def _check_task_batch(
    support: tuple[Any, ...], query: tuple[Any, ...], per_task: Mapping[str, Any]
) -> int:
    """The number of tasks (dimension 0 of every per-task tensor, checked equal)."""
    sizes = {}
    for argument, tree in (
        ("support", support),
        ("query", query),
        ("task_hyperparameters", per_task),
    ):
        for where, leaf in _leaves_with_paths(argument, tree):
            if not isinstance(leaf, Tensor) or leaf.dim() == 0:
                raise ValueError(
                    f"{where} must be a tensor whose first dimension indexes the tasks, got "
                    f"{_describe(leaf)}. Stack the tasks' data along dimension 0."
                )
            sizes[where] = leaf.shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{where}: {size}" for where, size in sizes.items())
        raise ValueError(
            f"Every per-task tensor needs the same number of tasks in dimension 0, got {listing}."
        )
    return next(iter(sizes.values()), 0)


def _leaves_with_paths(where: str, tree: Any) -> list[tuple[str, Any]]:
    """The leaves of nested tuples/lists/dicts with readable paths (cheap under dynamo)."""
    if isinstance(tree, Mapping):
        items: Any = tree.items()
    elif isinstance(tree, tuple | list):
        items = enumerate(tree)
    else:
        return [(where, tree)]
    return [pair for key, sub in items for pair in _leaves_with_paths(f"{where}[{key!r}]", sub)]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a 0-d tensor ({value.item() if value.numel() else value})"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------- torch optimizers


class OptimizerRule:
    """The rules of a ``torch.optim`` optimizer's parameter groups, as one rule.

    ``init``/``step`` work on the model's whole parameter dict: each group's rule updates
    its own parameters with its own hyperparameters; parameters in no group, and those
    that do not require grad, stay unchanged.  The state is a tuple (one entry per group).
    Built by :func:`rule_from_optimizer`.

    Example (one group per learning rate):
        >>> import torch, higher_func as hf
        >>> model = torch.nn.Linear(1, 1)
        >>> opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias]}])
        >>> rule, state = hf.func.rule_from_optimizer(opt, model)
        >>> ones = {"weight": torch.ones(1, 1), "bias": torch.ones(1)}
        >>> rule.step(ones, ones, state)[0]
        {'weight': tensor([[0.9000]]), 'bias': tensor([0.9990])}
    """

    __slots__ = ("frozen", "groups")

    def __init__(self, groups: Sequence[Any], frozen: frozenset[str]) -> None:
        self.groups = tuple(groups)
        self.frozen = frozen

    def __repr__(self) -> str:
        return f"OptimizerRule({', '.join(repr(g.rule) for g in self.groups)})"

    def init(self, params: Params) -> tuple[Any, ...]:
        """A fresh state: one rule state per group."""
        return tuple(g.rule.init({n: params[n] for n in g.names}) for g in self.groups)

    def step(
        self, params: Params, grads: Params, state: tuple[Any, ...], **overrides: Any
    ) -> tuple[dict[str, Tensor], tuple[Any, ...]]:
        """One step of every group; ``overrides`` apply to all groups."""
        new_params, new_state = dict(params), []
        for group, group_state in zip(self.groups, state, strict=True):
            own = {n: params[n] for n in group.names}
            own_grads = {n: None if n in self.frozen else grads[n] for n in group.names}
            updated, group_state = group.rule.step(own, own_grads, group_state, **overrides)
            new_params.update(updated)
            new_state.append(group_state)
        return new_params, tuple(new_state)


def rule_from_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[OptimizerRule, tuple[Any, ...]]:
    """The pure rule equal to ``optimizer`` over ``model``'s parameters, and its state.

    Args:
        optimizer: a ``torch.optim`` optimizer over (some of) ``model``'s parameters; any
            state it has (momentum buffers, moments, step counts) is imported, detached,
            as ``innerloop_ctx`` does.
        model: the module whose parameters it optimizes.

    Returns:
        ``(rule, state)``: an :class:`OptimizerRule` and its imported state.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> rule, state = rule_from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        >>> [(group.rule.name, group.names) for group in rule.groups]
        [('sgd', ('weight', 'bias'))]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    groups = from_torch_optimizer(optimizer, model)
    frozen = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
    return OptimizerRule(groups, frozen), tuple(g.state for g in groups)


class MetaObjective:
    """The batched meta-loss of ``innerloop_ctx`` code, from its pieces, without a rewrite.

    ``innerloop_ctx`` code adapts ``model`` with ``inner_optimizer`` on each task's support
    set and sums the query losses.  This class computes the same meta-loss for a whole batch
    of tasks at once (``vmap`` over tasks, ``torch.func.grad`` inside), which pays off on
    small models and many tasks (see ``benchmarks/``; on a small CPU, conv nets can be
    faster as a loop); compiled (``compiled(objective.value_and_grad)``) it is faster still.
    The meta-gradient equals the per-task loop's, batch norm included.

    Args:
        model: the meta-model; its parameters are the meta-parameters (``.backward()`` on
            the result fills their ``.grad``).  Its buffers are each task's starting
            buffers and are never modified.  ``train()``/``eval()`` applies as usual.
        inner_optimizer: the ``torch.optim`` optimizer used as ``innerloop_ctx``'s inner
            optimizer: its class, parameter groups, hyperparameters and any state are taken
            (once, here).  Parameters in no group, or not requiring grad, are not adapted.
        loss_fn: the per-task loss ``loss_fn(predictions, targets) -> scalar``, e.g.
            ``F.cross_entropy``.
        steps: inner steps per task.
        first_order: first-order MAML (see :func:`inner_loop`).
        truncate: differentiate through the last ``truncate`` steps only.
        randomness: ``vmap``'s policy for dropout and other random ops (``"error"``,
            ``"different"``, ``"same"``).
        chunk_size: vmap this many tasks at a time.
        batching: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :func:`batched_meta_loss`);
            ``"auto"`` goes straight to the loop, with a one-time warning, for a model
            with an ``nn.LSTM``/``GRU``/``RNN`` or a training-mode ``spectral_norm``.
        recompute: store iterates and rebuild steps in the backward pass, for long inner
            loops at bounded memory (see :func:`inner_loop`).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> model = torch.nn.Linear(1, 1)
        >>> objective = MetaObjective(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                           F.mse_loss, steps=2)
        >>> x, y = torch.randn(4, 5, 1), torch.randn(4, 5, 1)   # 4 tasks of 5 points
        >>> objective((x, y), (x, y)).backward()                 # support, query
        >>> model.weight.grad.shape
        torch.Size([1, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], Tensor],
        *,
        steps: int = 1,
        first_order: bool = False,
        truncate: int | None = None,
        randomness: str = "error",
        chunk_size: int | None = None,
        batching: str = "auto",
        recompute: bool = False,
    ) -> None:
        _check_callable("loss_fn", loss_fn)
        _check_steps(steps, truncate)
        _check_choice("randomness", randomness, _RANDOMNESS)
        _check_choice("batching", batching, BATCHING)
        self.batching = batching
        self.model = FunctionalModel(model)
        self.rule, self.state = rule_from_optimizer(inner_optimizer, model)
        self.loss_fn = loss_fn
        self.options: dict[str, Any] = {
            "steps": steps,
            "first_order": first_order,
            "truncate": truncate,
            "randomness": randomness,
            "chunk_size": chunk_size,
            "recompute": recompute,
        }

    def _task_loss(self, params: Params, buffers: Params, inputs: Any, targets: Any) -> Any:
        predictions, buffers = self.model.with_buffers(params, buffers, *_as_tuple(inputs))
        return self.loss_fn(predictions, targets), buffers

    def loss(
        self,
        params: Params,
        support: tuple[Any, Any],
        query: tuple[Any, Any],
        *,
        task_hyperparameters: Mapping[str, Tensor] | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """The batched meta-loss at meta-parameters ``params`` (a dict by name)."""
        return batched_meta_loss(
            self._task_loss,
            self.rule,
            params,
            _pair("support", support),
            _pair("query", query),
            state=self.state,
            buffers=self.model.buffers,
            task_hyperparameters=task_hyperparameters,
            reduction=reduction,
            batching=choose_batching(self.batching, self.model.module),
            **self.options,
        )

    def __call__(
        self,
        support: tuple[Any, Any],
        query: tuple[Any, Any],
        *,
        task_hyperparameters: Mapping[str, Tensor] | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """The batched meta-loss at the model's parameters (call ``.backward()`` on it).

        Args:
            support: ``(inputs, targets)``, each with the task as dimension 0; ``inputs``
                may be a tuple of tensors (several model inputs).
            query: ``(inputs, targets)``, likewise.
            task_hyperparameters: per-task overrides, e.g. ``{"lr": lrs}`` (shape
                ``(tasks,)``), for every parameter group.
            reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        """
        return self.loss(
            self.model.params,
            support,
            query,
            task_hyperparameters=task_hyperparameters,
            reduction=reduction,
        )

    def value_and_grad(
        self,
        support: tuple[Any, Any],
        query: tuple[Any, Any],
        *,
        task_hyperparameters: Mapping[str, Tensor] | None = None,
        reduction: str = "mean",
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(meta-loss, meta-gradient by name)`` for parameters requiring grad, by ``torch.func``.

        Same arguments as calling the objective; ``reduction`` is ``"mean"`` or ``"sum"``.
        Compile it whole: ``higher_func.func.compiled(objective.value_and_grad)``.
        """
        _check_choice("reduction", reduction, ("mean", "sum"))
        params = self.model.params
        trainable = {name: p.detach() for name, p in params.items() if p.requires_grad}
        frozen = {name: p.detach() for name, p in params.items() if not p.requires_grad}

        def objective(trainable: Params) -> Tensor:
            return self.loss(
                {**trainable, **frozen},
                support,
                query,
                task_hyperparameters=task_hyperparameters,
                reduction=reduction,
            )

        grads, value = grad_and_value(objective)(trainable)
        return value, grads


def _pair(argument: str, batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"{argument} must be a pair (inputs, targets) with the task as dimension 0, got "
            f"{type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, tuple | list) else ''}."
        )
    for where, leaf in _leaves_with_paths(f"{argument} inputs", batch[0]):
        _check_has_examples(where, leaf)
    return (batch[0], batch[1])


def _check_has_examples(where: str, inputs: Any) -> None:
    """Floating inputs need (tasks, examples, features...): a (5, 1) tensor would silently
    be 5 tasks of one unbatched example each."""
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.dim() < 3:
        shape = tuple(inputs.shape)
        raise ValueError(
            f"{where} has shape {shape}, which MetaObjective reads as {shape[0]} task(s) "
            f"of one example of shape {shape[1:]} without a batch dimension. Give "
            f"(tasks, examples, features...): e.g. x.unsqueeze(0) for one task of "
            f"{shape[0]} examples, or x.unsqueeze(-1) for scalar features."
        )


# --------------------------------------------------------------------------- validation


def _check_rule(rule: Any) -> None:
    if not (callable(getattr(rule, "init", None)) and callable(getattr(rule, "step", None))):
        raise TypeError(
            f"rule must be an update rule with init(params) and step(params, grads, state), "
            f"e.g. higher_func.optim.sgd(lr=0.1), got {type(rule).__name__}."
        )


def _check_steps(steps: Any, truncate: Any) -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
    if truncate is None:
        return
    if not isinstance(truncate, numbers.Integral) or isinstance(truncate, bool) or truncate < 0:
        raise ValueError(
            f"truncate must be None (differentiate through every step) or an integer >= 0, "
            f"got {truncate!r}."
        )


def _check_callable(argument: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{argument} must be callable, got {type(value).__name__}.")


def _check_choice(argument: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}.")
