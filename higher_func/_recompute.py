"""Recompute mode: exact meta-gradients through long unrolls at bounded memory.

A plain unroll keeps every step's graph (each inner forward's and backward's activations)
until the meta-backward, so its memory grows by a whole graph per step.  Recompute mode
(``inner_loop(..., recompute=True)``) keeps only the iterate entering each step:

* forward: the K steps run without a graph, and each differentiated step's starting iterate
  ``(phi_k, s_k, buffers_k)`` is stored (plain tensors, no ``grad_fn``);
* backward: the steps are walked in reverse.  Step k is rebuilt from its stored iterate,
  inner gradient included (so the second-order terms are exact), and ``torch.func.vjp``
  pulls the adjoint of ``(phi_{k+1}, s_{k+1}, buffers_{k+1}, L_k)`` back to
  ``(phi_k, s_k, buffers_k)``, adding up the gradients of that step's tensor
  hyperparameters and of the batch.

The meta-gradient is the plain unroll's (up to floating-point reassociation); memory is the
iterates plus one step's graph; the backward pass costs one extra inner step per step.
The machinery is one ``torch.autograd.Function`` in ``torch.func`` form (no ``ctx`` in
``forward``, the iterates returned as outputs, ``generate_vmap_rule``), so it runs under
``.backward()``, ``torch.func.grad``/``vjp`` and ``vmap``.  The stored iterates are
differentiable outputs whose cotangents join the adjoint, so the backward pass is itself
differentiable: second-order meta-derivatives (``create_graph=True``, nested
``torch.func.grad``) are exact too, at the plain unroll's memory.  Forward mode
(``torch.func.jvp``) raises: it needs no recompute, its memory is already flat in steps.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor
from torch.func import grad, vjp

from ._rules._protocol import spec_of
from ._versions import RECOMPUTE_UNDER_VMAP, require_torch

__all__ = ["inner_step", "recomputed_inner_loop"]

#: ``(params, state, buffers, overrides, batch) -> (params, state, buffers, loss)``
Step = Callable[..., tuple[Any, Any, Any, Tensor]]

_NO_FORWARD_MODE = (
    "inner_loop(recompute=True) supports reverse mode only (.backward(), torch.func.grad, "
    "vjp); for torch.func.jvp/jacfwd or forward_ad use recompute=False: forward mode keeps "
    "no graph, so its memory does not grow with the number of steps anyway."
)


def inner_step(objective: Callable[..., Any], rule: Any, first_order: bool) -> Step:
    """One step of :func:`higher_func.func.inner_loop`'s loop, as a function."""

    def step(params: Any, state: Any, buffers: Any, overrides: Any, batch: Any) -> Any:
        at = optree.tree_map(lambda t: t.detach(), params) if first_order else params
        grads, (value, new_buffers) = grad(objective, has_aux=True)(at, buffers, *batch)
        params, state = rule.step(params, grads, state, **overrides)
        return params, state, new_buffers if buffers is not None else None, value

    return step


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    leaves, spec = optree.tree_flatten(tree)
    return list(leaves), spec


def _fill(spec: Any, leaves: Sequence[Any], tensors: Iterable[Tensor]) -> Any:
    """``spec``'s tree with its tensor leaves replaced by ``tensors`` (in order)."""
    new = iter(tensors)
    return optree.tree_unflatten(spec, [next(new) if _is_tensor(x) else x for x in leaves])


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


class _Plan:
    """The non-tensor description of one recomputed unroll and its flat tensor layout.

    Inputs of the ``Function``: the starting iterate's tensors, then the tensors of each
    step's overrides (one set for all steps when the overrides are one dict), then the
    batch's tensors.  Outputs: the final iterate's tensors, the stacked losses, then the
    tensors of each stored iterate (steps ``stored``; step 0's iterate is the input itself).
    """

    def __init__(
        self,
        step: Step,
        first: int,
        start: tuple[Any, Any, Any],
        overrides: Sequence[Mapping[str, Any]],
        batch: tuple[Any, ...],
        trajectory: bool,
    ) -> None:
        self.step, self.steps, self.first = step, len(overrides), first
        leaves, self.treespec = _flatten(start)
        self.is_tensor = [_is_tensor(x) for x in leaves]
        self.size = sum(self.is_tensor)
        self.start_constants = [x for x in leaves if not _is_tensor(x)]
        self.final_constants: list[Any] = []
        self.constants: list[list[Any]] = []  # each stored iterate's non-tensor leaves
        self.rng: dict[int, tuple[Tensor, list[Tensor]]] = {}  # random state entering step k
        self.stored = range(1 if trajectory else max(first, 1), self.steps)
        self.shared = all(o is overrides[0] for o in overrides)
        self.override_trees = [_flatten(dict(o)) for o in overrides[: 1 if self.shared else None]]
        self.inputs: list[Tensor] = [x for x in leaves if _is_tensor(x)]
        self.override_slots = [
            self._add([x for x in tree if _is_tensor(x)]) for tree, _ in self.override_trees
        ]
        self.batch_leaves, self.batch_spec = _flatten(batch)
        self.batch_slots = self._add([x for x in self.batch_leaves if _is_tensor(x)])

    def _add(self, tensors: list[Tensor]) -> range:
        start = len(self.inputs)
        self.inputs += tensors
        return range(start, len(self.inputs))

    def split(self, iterate: Any, k: int) -> tuple[list[Tensor], list[Any]]:
        """``(tensors, constants)`` of an iterate, checked against the starting structure."""
        leaves, treespec = _flatten(iterate)
        if treespec != self.treespec or [_is_tensor(x) for x in leaves] != self.is_tensor:
            raise ValueError(
                "inner_loop(recompute=True) needs (params, state, buffers) to keep their "
                f"structure from step to step; entering step {k} it is {treespec}, it started "
                f"as {self.treespec}. Use recompute=False with this rule."
            )
        return [x for x in leaves if _is_tensor(x)], [x for x in leaves if not _is_tensor(x)]

    def join(self, tensors: Sequence[Tensor], constants: Sequence[Any]) -> Any:
        """The ``(params, state, buffers)`` tree of an iterate's tensors and constants."""
        tensor_iter, constant_iter = iter(tensors), iter(constants)
        leaves = [next(tensor_iter) if t else next(constant_iter) for t in self.is_tensor]
        return optree.tree_unflatten(self.treespec, leaves)

    def overrides_at(self, flat: Sequence[Tensor], k: int) -> Any:
        index = 0 if self.shared else k
        leaves, spec = self.override_trees[index]
        return _fill(spec, leaves, (flat[i] for i in self.override_slots[index]))

    def batch(self, flat: Sequence[Tensor]) -> Any:
        return _fill(self.batch_spec, self.batch_leaves, (flat[i] for i in self.batch_slots))

    def iterate_at(self, k: int, saved: Sequence[Tensor]) -> tuple[list[Tensor], list[Any]]:
        """The stored iterate entering step k (from the saved inputs and outputs)."""
        if k == 0:
            return list(saved[: self.size]), self.start_constants
        j = k - self.stored.start
        offset = len(self.inputs) + j * self.size
        return list(saved[offset : offset + self.size]), self.constants[j]


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _cuda_devices()]


@contextlib.contextmanager
def _replaying(state: tuple[Tensor, list[Tensor]]) -> Iterator[None]:
    """The random state of a step's first run, restored after (as ``checkpoint`` does)."""
    devices = _cuda_devices()
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for device, cuda_state in zip(devices, state[1], strict=False):
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def _differentiable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class _RecomputedUnroll(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(plan: _Plan, *flat: Tensor) -> tuple[Tensor, ...]:
        iterate = plan.join(flat[: plan.size], plan.start_constants)
        batch, stored, losses = plan.batch(flat), [], []
        plan.constants, plan.rng = [], {}
        for k in range(plan.steps):
            if k >= plan.first:  # the rebuilt step draws the same random numbers (dropout)
                plan.rng[k] = _rng_state()
            if k in plan.stored:
                tensors, constants = plan.split(iterate, k)
                stored += tensors
                plan.constants.append(constants)
            *new, value = plan.step(*iterate, plan.overrides_at(flat, k), batch)
            iterate = tuple(new)
            losses.append(value)
        final, plan.final_constants = plan.split(iterate, plan.steps)
        stacked = torch.stack(losses) if losses else flat[0].new_zeros(0)
        # Each output its own tensor: not an input (autograd would make it a view) and not
        # an earlier output (a state field that a step passes through unchanged).
        seen, outputs = {id(t) for t in flat}, []
        for t in (*final, stacked, *stored):
            outputs.append(t.clone() if id(t) in seen else t)
            seen.add(id(t))
        return tuple(outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        plan = inputs[0]
        stored = output[plan.size + 1 :]
        ctx.plan = plan
        ctx.save_for_backward(*inputs[1:], *stored)
        ctx.set_materialize_grads(False)
        # The stored iterates are differentiable outputs: their cotangents join the adjoint,
        # which makes the backward pass itself differentiable (second-order meta-gradients)
        # and gives trajectory=True its gradients.  Those before the differentiated steps
        # ran without a graph, as in the plain unroll.
        before = sum(k <= plan.first for k in plan.stored) * plan.size
        ctx.mark_non_differentiable(*stored[:before])

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple[Tensor | None, ...]:
        grads = _reverse_walk(ctx.plan, ctx.saved_tensors, ctx.needs_input_grad[1:], cotangents)
        return (None, *grads)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise NotImplementedError(_NO_FORWARD_MODE)


def _reverse_walk(
    plan: _Plan,
    saved: Sequence[Tensor],
    needs: Sequence[bool],
    cotangents: Sequence[Tensor | None],
) -> list[Tensor | None]:
    """The gradients of the flat inputs: step k's VJP for k = K-1 down to ``plan.first``."""
    adjoint: list[Tensor | None] = list(cotangents[: plan.size])
    loss_adjoint, stored_adjoint = cotangents[plan.size], cotangents[plan.size + 1 :]
    grads: list[Tensor | None] = [None] * len(plan.inputs)
    batch_flat = saved[: len(plan.inputs)]
    for k in reversed(range(plan.first, plan.steps)):
        tensors, constants = plan.iterate_at(k, saved)
        override_slots = plan.override_slots[0 if plan.shared else k] if plan.override_slots else ()
        wrt = [
            *(
                i
                for i, t in enumerate(tensors)
                if _differentiable(t) and (k > plan.first or (k == 0 and needs[i]))
            ),
            *(len(tensors) + s for s in override_slots if needs[s]),
            *(len(tensors) + s for s in plan.batch_slots if needs[s]),
        ]
        value_adjoint = None if loss_adjoint is None else loss_adjoint[k]
        if wrt and (value_adjoint is not None or any(a is not None for a in adjoint)):
            pulled = _step_vjp(plan, k, tensors, constants, batch_flat, wrt, adjoint, value_adjoint)
        else:
            pulled = {}
        adjoint = [pulled.get(i) for i in range(plan.size)]
        for position, g in pulled.items():
            if position >= plan.size:
                slot = position - plan.size
                earlier = grads[slot]
                grads[slot] = g if earlier is None else earlier + g
        if k > plan.first:
            j = k - plan.stored.start
            for i in range(plan.size):
                extra, current = stored_adjoint[j * plan.size + i], adjoint[i]
                if extra is not None:
                    adjoint[i] = extra if current is None else current + extra
    if plan.first == 0:
        for i in range(plan.size):
            if needs[i]:
                grads[i] = adjoint[i]
    return grads


def _step_vjp(
    plan: _Plan,
    k: int,
    tensors: list[Tensor],
    constants: list[Any],
    flat: Sequence[Tensor],
    wrt: list[int],
    adjoint: list[Tensor | None],
    value_adjoint: Tensor | None,
) -> dict[int, Tensor]:
    """Rebuild step k and pull the adjoints back to the positions ``wrt``.

    Positions below ``plan.size`` are the iterate's tensors; ``plan.size + s`` is flat input s.
    """
    everything = [*tensors, *flat]

    def rebuilt(*primals: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        current = list(everything)
        for position, primal in zip(wrt, primals, strict=True):
            current[position] = primal
        inputs = current[plan.size :]
        *iterate, value = plan.step(
            *plan.join(current[: plan.size], constants),
            plan.overrides_at(inputs, k),
            plan.batch(inputs),
        )
        leaves = plan.split(tuple(iterate), k + 1)[0]
        return tuple(t for t in leaves if _differentiable(t)), value

    with _replaying(plan.rng[k]):
        (outputs, value), pull = vjp(rebuilt, *(everything[p] for p in wrt))  # type: ignore[misc]
    floats = [i for i, t in enumerate(tensors) if _differentiable(t)]
    seeds = tuple(
        torch.zeros_like(out) if adjoint[i] is None else adjoint[i]
        for i, out in zip(floats, outputs, strict=True)
    )
    pulled = pull((seeds, torch.zeros_like(value) if value_adjoint is None else value_adjoint))
    return dict(zip(wrt, pulled, strict=True))


def _lift_rule_tensors(rule: Any, overrides: Mapping[str, Any]) -> Mapping[str, Any]:
    """The rule's own tensor hyperparameters as overrides, so that they receive gradients."""
    spec = spec_of(rule)
    if spec is None:
        return overrides  # a rule of one's own design (or an optimizer's groups): as given
    fixed = set(spec.static) | set(spec.init_only)
    lifted = {
        key: value
        for key, value in rule.hyperparameters.items()
        if key not in fixed and any(isinstance(x, Tensor) for x in optree.tree_leaves(value))
    }
    return {**lifted, **overrides} if lifted else overrides


def _check_nothing_captured(
    objective: Any, rule: Any, start: Any, overrides: Any, batch: Any
) -> None:
    """Raise if the loss or the rule reads a tensor requiring grad that is not an input.

    Recompute mode differentiates the inputs of each step only; a tensor captured by the
    loss closure or held by the rule would silently get no gradient.  One loss forward and
    one rule step on detached inputs (zero gradients) find it.
    """
    if not torch.is_grad_enabled():
        return
    everything: Any = (*start, overrides, batch)
    detached: Any = optree.tree_map(lambda x: x.detach() if _is_tensor(x) else x, everything)
    params, state, buffers, overrides, batch = detached
    with torch.random.fork_rng(devices=_cuda_devices()):  # leave the random stream alone
        value, _ = objective(params, buffers, *batch)
        zeros = optree.tree_map(torch.zeros_like, params)
        leaves = [value, *optree.tree_leaves(rule.step(params, zeros, state, **overrides))]
    if any(isinstance(x, Tensor) and x.requires_grad for x in leaves):
        raise ValueError(
            "inner_loop(recompute=True): the loss or the rule uses a tensor that requires grad "
            "but is not passed in params, state, buffers, hyperparameters or the batch (a "
            "tensor captured by the loss function, or a rule such as an OptimizerRule built "
            "with a tensor hyperparameter). Recompute mode differentiates only what is passed "
            "in, so it would get no gradient. Pass it in, e.g. hyperparameters={'lr': lr} or "
            "as a batch argument, or use recompute=False."
        )


def _under_vmap() -> bool:
    """Whether a ``vmap`` is active at any level (e.g. ``vmap(grad(...))``)."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def recomputed_inner_loop(*args: Any) -> tuple[Any, Any, Any, Tensor, tuple[Any, ...] | None]:
    """:func:`_recomputed_inner_loop`, kept out of ``torch.compile`` (it runs eagerly there).

    A compiled caller has imported ``torch._dynamo``; an eager program need not pay for that
    import (seconds), so the ``disable`` wrapper is made only once dynamo is loaded.
    """
    if "torch._dynamo" in sys.modules:
        from torch import _dynamo

        return _dynamo.disable(_recomputed_inner_loop)(*args)
    return _recomputed_inner_loop(*args)


def _recomputed_inner_loop(
    objective: Callable[..., Any],
    rule: Any,
    start: tuple[Any, Any, Any],
    batch: tuple[Any, ...],
    overrides: Sequence[Mapping[str, Any]],
    first_order: bool,
    truncate: int | None,
    trajectory: bool,
) -> tuple[Any, Any, Any, Tensor, tuple[Any, ...] | None]:
    """``(params, state, buffers, losses, trajectory)`` of K recomputed steps.

    Args:
        objective: ``(params, buffers, *batch) -> (loss, (loss, new_buffers))``.
        rule: the update rule; its own tensor hyperparameters become overrides.
        start: the starting iterate ``(params, state, buffers)``.
        batch: the task's data, passed on to the loss.
        overrides: each step's hyperparameter overrides (``len(overrides)`` is K; the same
            dict object for every step when they do not change).
        first_order: stop the gradient at each step's inner gradient.
        truncate: differentiate through the last ``truncate`` steps only (``None``: all).
        trajectory: also return ``(phi_0, ..., phi_K)``.
    """
    steps = len(overrides)
    first = 0 if truncate is None else max(steps - truncate, 0)
    if all(o is overrides[0] or not (o or overrides[0]) for o in overrides):
        overrides = [_lift_rule_tensors(rule, overrides[0])] * steps
    else:
        overrides = [_lift_rule_tensors(rule, o) for o in overrides]
    _check_nothing_captured(objective, rule, start, overrides[0], batch)
    step = inner_step(objective, rule, first_order)
    plan = _Plan(step, first, start, overrides, batch, trajectory)
    if _under_vmap():
        require_torch(RECOMPUTE_UNDER_VMAP, "recompute=True under vmap", instead="loop over the "
                      "tasks (batching='loop'), or use recompute=False")  # fmt: skip
    outputs = _RecomputedUnroll.apply(plan, *plan.inputs)
    final = plan.join(outputs[: plan.size], plan.final_constants)
    losses = outputs[plan.size]
    history = None
    if trajectory:
        stored = outputs[plan.size + 1 :]
        history = (
            (start[0],)
            + tuple(
                plan.join(stored[j * plan.size : (j + 1) * plan.size], plan.constants[j])[0]
                for j in range(len(plan.stored))
            )
            + ((final[0],) if steps else ())
        )
    return (*final, losses, history)
