"""Functional, batched and compiled inner loops (the fast path of higher_func).

The model is a pure function ``f(params, buffers, *inputs)`` (:class:`FunctionalModel`);
:func:`inner_loop` runs K steps of any rule of :mod:`higher_func.optim` with
``torch.func.grad``; :func:`meta_loss` is one task's ``L_query(phi_K(theta))`` and
:func:`batched_meta_loss` its ``vmap`` over tasks; :class:`MetaObjective` builds the same
batched meta-loss from ``innerloop_ctx`` code's pieces (model, torch inner optimizer,
per-task loss).  Batch, layer and group norms run as decomposed tensor math so the batched
meta-gradient is exact (:func:`exact_norms`).  :func:`compiled` compiles the whole
meta-gradient; :func:`compiled_innerloop` compiles ``innerloop_ctx`` code.
Models that ``vmap`` cannot batch (RNNs, training-mode spectral norms, transformers' 0/1 attention
masks) run as a per-task loop (``batching=``, :class:`BatchingError`).
:func:`hypergradient_forward` gives hypergradients by forward mode (memory flat in steps).
"""

from ._batched import batched_meta_loss
from ._batching import BatchingError
from ._compile import CompileError, compiled, compiled_innerloop
from ._forward import hypergradient_forward
from ._functional_model import FunctionalModel
from ._inner_loop import InnerLoop, inner_loop, meta_loss
from ._meta_objective import MetaObjective
from ._norm import exact_norms
from ._optimizer_rule import OptimizerRule, rule_from_optimizer

__all__ = [
    "BatchingError",
    "CompileError",
    "FunctionalModel",
    "InnerLoop",
    "MetaObjective",
    "OptimizerRule",
    "batched_meta_loss",
    "compiled",
    "compiled_innerloop",
    "exact_norms",
    "hypergradient_forward",
    "inner_loop",
    "meta_loss",
    "rule_from_optimizer",
]
