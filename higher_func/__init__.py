"""higher_func: differentiable inner loops for PyTorch, built on ``torch.func``.

The successor of ``higher``: ``import higher_func as higher`` runs higher's programs, every
differentiable optimizer is also a pure update rule (``higher_func.optim``), and inner loops
batch under ``vmap`` and compile with ``torch.compile``.
"""

from . import optim

__version__ = "0.1.0"

__all__ = ["optim"]
