"""higher_func: differentiable inner loops for PyTorch, built on ``torch.func``.

The successor of ``higher``: ``import higher_func as higher`` runs higher's programs, every
differentiable optimizer is also a pure update rule (``higher_func.optim``), and inner loops
batch under ``vmap`` and compile with ``torch.compile``.
"""

from . import func, implicit, optim, patch, utils
from ._attention import is_double_backward_attention_enabled, set_double_backward_attention
from ._batched import batched_meta_loss
from ._constructors import create_diff_optim, get_diff_optim, register_optim
from ._context import (
    clip_grad_norm,
    clip_grad_value,
    innerloop_ctx,
    truncate,
    write_back_module,
    write_back_optimizer,
)
from ._inner_loop import inner_loop
from ._meta_objective import MetaObjective
from ._versions import TorchVersionError
from .patch import monkeypatch

__version__ = "0.1.0"

__all__ = [
    "MetaObjective",
    "TorchVersionError",
    "batched_meta_loss",
    "clip_grad_norm",
    "clip_grad_value",
    "create_diff_optim",
    "func",
    "get_diff_optim",
    "implicit",
    "inner_loop",
    "innerloop_ctx",
    "is_double_backward_attention_enabled",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "set_double_backward_attention",
    "truncate",
    "utils",
    "write_back_module",
    "write_back_optimizer",
]
