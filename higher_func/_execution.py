"""The execution planner: how one step of an update rule runs over a set of tensors.

Every rule is written once, as a kernel over single tensors (``_rules/``).  A step can run
that kernel three ways, with the same values (the flat and per-tensor plans do the same
arithmetic element by element; foreach ops may differ from the per-tensor ops in the last
bit):

* :attr:`Plan.PER_TENSOR`: once per tensor.  What ``vmap`` and ``torch.compile`` need
  (``torch._foreach_*`` ops have no batching rule, and the compiler fuses the per-tensor
  ops best), and what a recorded step of large tensors runs fastest.
* :attr:`Plan.FOREACH`: once over a :class:`~higher_func._rules._tensor_list.TensorList`,
  one ``torch._foreach_*`` op per line of the kernel.  Only where autograd records
  nothing, for every rule: a recorded foreach op saves its input lists for its backward
  where the per-tensor op saves only what its derivative reads (see the table below), and
  every kernel has a scalar multiplication or a list addition.
* :attr:`Plan.FLAT`: once over the tensors of a parameter group concatenated into one
  (the differentiable optimizers' flat groups, ``_flat_groups._FlatState``): while autograd
  records, one autograd node per line of the kernel instead of one per line and tensor.

Why not foreach while autograd records (measured with ``saved_tensors_hooks``, counting
the bytes each op saves for its backward, in lists of the inputs' size; torch 2.4.1 and
2.13.0 alike)::

    op                     foreach  per tensor      op                foreach  per tensor
    x * 0.5                      1           0      x / 2.0                 1           0
    x + y, x - y                 2           0      x + 0.5                 1           0
    torch.add(x, y, alpha)       2           0      x * y, x / y            2           2
    addcmul, addcdiv             3           2      sqrt                    1           1
    -x                           0           0      lerp(x, y, 0.5)         0           0

Higher's SGD step ``p - lr * g`` thus saves three lists per step run foreach and none per
tensor: 5 steps of the sinusoid MLP ran 1.15x faster foreach (12 autograd nodes per step
become 2) and saved 0.98 MB for its backward against 0.55 MB per tensor (higher: 0.93);
50 tracked SGD steps of workload 6's 784-256-256-10 MLP saved 170 MB against 29 MB, a peak
of 184 MB against 90 MB.  Momentum and Adam on small groups run :attr:`Plan.FLAT`, which
beat foreach (Adam on the sinusoid: a whole iteration ran 0.71x as fast foreach).

A kernel's op sequence is the planner's concern too where it can change without changing
a bit: Adam's, RMSprop's and Adagrad's ``safe_sqrt`` (a square root whose derivative is 0
at 0) is ``where(x == 0, 0, sqrt(where(x == 0, 1, x)))``, four passes over the tensor, in
every transform; while autograd records in plain reverse mode, a tensor of at least
:data:`ONE_PASS_SQRT_MIN_ELEMENTS` elements takes one ``sqrt`` in a custom autograd
Function whose backward is the same derivative, bit for bit.  Forward and backward with
``create_graph`` (float32, 1 thread, load average about 3, time of the four ops / time of
the Function; ``benchmarks/results/kernel_costs.txt``; 4096 elements measured 0.97x in
another run)::

    elements     1024   4096   8192   16384   65536   262144   1048576
    speed-up     0.94   1.04   1.12    1.14    1.22     1.65      1.46

Below the limit the Function's Python cost (a few microseconds forward and backward) eats
the passes saved: the sinusoid's Adam step (one flat tensor of 1,761 elements) ran 0.97x
as fast with it.  Above it, whole drop-in Adam iterations (the Function against the four
ops, in one process, alternating, meta-gradients bit for bit the same; load average about
3): BERT-tiny 1.08x, LSTM LM 1.06x, ResNet-18 1.03x.  Re-measure with
``PYTHONPATH=$PWD python benchmarks/kernel_costs.py`` (both tables above).

This module is the only place that asks what decides between them: the number and sizes
of the tensors, their dtype, layout and device, whether autograd records, and whether a
functorch transform (``vmap``, ``grad``) or ``torch.compile`` is tracing.  :func:`plan`
answers for a rule's step (``Rule.step``) and for a differentiable optimizer's parameter
group (``rule=`` given, where :attr:`Plan.FLAT` is allowed); :func:`group_plan` is the
group's answer as the drop-in step uses it: made once per group and step and passed down
to ``Rule.step_list``, or ``None`` where the rule's step must decide (nothing recorded).

When flat pays (measured by ``benchmarks/plan_thresholds.py``, whose saved output
``benchmarks/results/plan_thresholds.txt`` is shown in ``docs/performance.md``).  A
recorded flat step saves per-tensor overhead (a few microseconds per op and tensor,
forward and backward) but pays in memory traffic: the first step concatenates weights and
gradients, and element-wise ops over one tensor of many megabytes run at DRAM bandwidth
(on fresh pages from ``mmap``) where the per-tensor kernel keeps each parameter's few
lines in cache.  So the saving grows with the number of tensors and the cost with their
size: flat pays when the mean tensor is small.  On the development CPU (2 shared cores,
float32, 1 thread, 3 recorded Adam or SGD-momentum steps and the outer backward; time per
tensor / time flat, above 1 flat is faster; measured under a load average of about 5)::

    tensors x elements    mean KiB  total MiB   Adam  momentum
    64 x 4096                   16          1   1.86     1.28
    256 x 4096                  16          4   2.00     1.38
    256 x 8192                  32          8   1.45     1.04
    64 x 16384                  64          4   1.16     1.12
    16 x 16384                  64          1   1.04     0.88
    64 x 32768                 128          8   0.78     0.97
    16 x 65536                 256          4   0.84     0.91
    4 x 262144                1024          4   0.74     0.86
    Omniglot conv net (18)      24       0.43   1.38     0.94
    LSTM LM (7)                650        4.4   0.92     0.80
    BERT-tiny (41)             418         17   0.95     0.91
    ResNet-18 (62)             704         43   0.43     0.76

Hence the limits on the CPU: flat when the group's mean tensor is at most
:data:`FLAT_MAX_MEAN_BYTES` (64 KiB) and the group at most :data:`FLAT_MAX_BYTES`
(8 MiB; above it, 256 x 16384, 16 MiB, measured 0.38x and 0.67x with Adam in two
runs).  On accelerators, where a kernel launch costs the same few microseconds whatever
its size, groups are stepped flat at every size, as before these limits existed, until
a measurement there says otherwise.
Re-measure with::

    PYTHONPATH=$PWD python benchmarks/plan_thresholds.py            # CPU
    PYTHONPATH=$PWD python benchmarks/plan_thresholds.py --device cuda
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = [
    "FLAT_MAX_BYTES",
    "FLAT_MAX_MEAN_BYTES",
    "ONE_PASS_SQRT_MIN_ELEMENTS",
    "Plan",
    "one_pass_sqrt_pays",
    "derivative_wanted",
    "forward_ad_active",
    "group_plan",
    "plan",
    "records",
    "traced",
    "under_transform",
]

#: The largest parameter group (bytes of its weights) stepped flat on the CPU.
FLAT_MAX_BYTES = 8 * 2**20
#: The largest mean tensor size (bytes) of a parameter group stepped flat on the CPU.
FLAT_MAX_MEAN_BYTES = 64 * 2**10
#: The smallest tensor (elements) whose recorded ``safe_sqrt`` runs as one custom autograd
#: Function (one sqrt forward) instead of four built-in ops.
ONE_PASS_SQRT_MIN_ELEMENTS = 8192


class Plan(enum.Enum):
    """How a step runs its per-tensor kernel (see the module docstring)."""

    PER_TENSOR = "per tensor"
    FOREACH = "foreach"
    FLAT = "flat"


def under_transform() -> bool:
    """Whether ``torch.compile`` or a functorch transform (``vmap``, ``grad``) is tracing."""
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad`` level is open: dual tensors may flow, and the
    per-tensor kernel is the one that carries their tangents exactly."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def traced(t: Tensor) -> bool:
    """Whether ``t`` lives inside ``torch.compile`` or a ``torch.func`` transform."""
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def derivative_wanted(tensors: Iterable[Tensor]) -> bool:
    """Whether an op on ``tensors`` may be differentiated: autograd records it, a dual
    tensor may carry a tangent (a dual tensor does not say that it requires grad), or a
    transform traces it (functorch wrappers may not say either)."""
    tensors = list(tensors)
    if forward_ad_active() or records(tensors):
        return True
    return any(traced(t) for t in tensors)


def one_pass_sqrt_pays(x: Tensor) -> bool:
    """Whether a differentiated ``safe_sqrt`` of ``x`` runs as one custom autograd Function
    (one sqrt forward) instead of its four built-in ops (``_rules._math.safe_sqrt``): in
    plain reverse mode only (forward mode and the transforms need the built-in ops), from
    :data:`ONE_PASS_SQRT_MIN_ELEMENTS` elements, where the three passes saved outweigh the
    Function's Python cost (see the module docstring)."""
    return x.numel() >= ONE_PASS_SQRT_MIN_ELEMENTS and not (forward_ad_active() or traced(x))


def records(tensors: Iterable[Tensor]) -> bool:
    """Whether autograd records an op on any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def plan(
    tensors: Sequence[Tensor],
    grads: Sequence[Tensor | None] = (),
    *,
    others: Iterable[Tensor] = (),
    rule: Any = None,
) -> Plan:
    """How one step of a rule runs over ``tensors`` (the parameters being updated).

    Args:
        tensors: the parameters the step updates (those with a gradient).
        grads: their gradients.
        others: every other tensor the step reads (state, tensor hyperparameters); read
            only when the answer depends on them, so a generator costs nothing otherwise.
        rule: a differentiable optimizer's rule for a whole parameter group: then the
            group may be stepped :attr:`Plan.FLAT`.  ``None`` for a pure rule's step.

    Example:
        >>> import torch, higher_func as hf
        >>> from higher_func._execution import plan
        >>> small = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
        >>> plan(small, [torch.ones(3), torch.ones(2)], rule=hf.optim.adam()).name
        'FLAT'
        >>> plan(small).name, plan([t.detach() for t in small]).name
        ('PER_TENSOR', 'FOREACH')
    """
    if rule is not None:
        # Nothing recorded: the rule's own step plans foreach.
        return group_plan(tensors, grads, rule) or Plan.PER_TENSOR
    if len(tensors) < 2 or under_transform() or forward_ad_active():
        return Plan.PER_TENSOR
    if records(tensors):
        return Plan.PER_TENSOR  # the common MAML case, decided without reading the rest
    if records(others) or records(g for g in grads if g is not None):
        return Plan.PER_TENSOR  # e.g. a learned learning rate: recorded after all
    first = tensors[0]
    if first.layout != torch.strided:
        return Plan.PER_TENSOR
    if any(t.device != first.device or t.layout != first.layout for t in tensors):
        return Plan.PER_TENSOR
    return Plan.FOREACH


def group_plan(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    rule: Any,
    *,
    flat: bool = True,
    flat_before: bool = False,
) -> Plan | None:
    """A differentiable optimizer's plan for one step of a parameter group, or ``None``
    where the rule's own step must decide (nothing recorded: foreach may pay, which depends
    on the state and hyperparameters the rule reads).  Made once per group and step and
    passed down to :meth:`~higher_func._rules._core.Rule.step_list`.

    Args:
        params: the group's parameters (fast weights).
        grads: their gradients (``None`` for a parameter left unchanged).
        rule: the group's rule.
        flat: whether the group may be stepped :attr:`Plan.FLAT` (the differentiable
            optimizer's flat groups run only while it keeps the graph).
        flat_before: ``params`` are the views cut by the group's last step, which ran
            :attr:`Plan.FLAT` with this same ``rule``: what decided it for the rule and the
            weights still holds, and only the gradients are checked again.

    Example:
        >>> import torch, higher_func as hf
        >>> from higher_func._execution import group_plan
        >>> small = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
        >>> grads = [torch.ones(3), torch.ones(2)]
        >>> group_plan(small, grads, hf.optim.adam()).name
        'FLAT'
        >>> group_plan(small, grads, hf.optim.adam(), flat=False).name
        'PER_TENSOR'
        >>> print(group_plan([t.detach() for t in small], grads, hf.optim.adam()))
        None
    """
    if len(params) < 2 or under_transform() or forward_ad_active():
        return Plan.PER_TENSOR
    # Only the weights with a gradient are stepped (and flat needs a gradient for each).
    if not records(p for p, g in zip(params, grads, strict=False) if g is not None):
        return None
    if flat and (flat_before or _flat_suits(rule, params)) and _grads_fit(params, grads):
        return Plan.FLAT
    return Plan.PER_TENSOR  # the common MAML case: what the rule's step would decide


def _flat_suits(rule: Any, params: Sequence[Tensor]) -> bool:
    """Whether a recorded step of a whole group may, and should, run on one flat tensor, as
    far as the rule and the weights tell (:func:`_grads_fit` checks the gradients)."""
    spec = getattr(rule, "spec", None)
    if spec is None or not spec.elementwise:
        return False
    if not spec.fields(rule.hyperparameters):
        return False  # plain SGD: flat measured 0.98x per tensor's speed on the sinusoid
    first = params[0]
    if not first.dtype.is_floating_point:
        return False
    if not all(p.is_contiguous() for p in params):
        return False  # e.g. channels_last weights: the views would be contiguous instead
    for t in params:
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            return False
        if t.dtype != first.dtype or t.device != first.device:
            return False
    if first.device.type == "cpu":
        size = sum(p.numel() for p in params) * first.element_size()
        if size > FLAT_MAX_BYTES or size > FLAT_MAX_MEAN_BYTES * len(params):
            return False  # memory traffic outweighs the per-tensor overhead saved
    values = rule.hyperparameters.values()
    if any(isinstance(v, Mapping) for v in values):
        return False  # per-parameter values: each parameter needs its own
    leaves: list[Any] = optree.tree_leaves(list(values), none_is_leaf=True)  # type: ignore[arg-type]
    return all(not isinstance(v, Tensor) or v.dim() == 0 for v in leaves)


def _grads_fit(params: Sequence[Tensor], grads: Sequence[Any]) -> bool:
    """Whether every gradient is a dense tensor of its weight's shape, dtype and device (the
    per-parameter step names a gradient that is not)."""
    first = params[0]
    dtype, device = first.dtype, first.device
    for p, g in zip(params, grads, strict=True):
        if not isinstance(g, Tensor) or g.layout != torch.strided:
            return False
        if g.dtype != dtype or g.device != device or g.shape != p.shape:
            return False
    return True
