"""Implicit differentiation: gradients of a solution through its optimality condition.

:func:`custom_root` and :func:`custom_fixed_point` decorate a solver so that its output is
differentiable by the implicit function theorem, at the memory of one inner gradient instead
of the whole unrolled inner loop (iMAML, Rajeswaran et al. 2019; hyperparameter optimisation,
Lorraine et al. 2020). The ``solve_*`` functions solve the linear systems this needs, on
pytrees, with a fixed iteration count (no ``.item()``), so they run under ``vmap`` and
``torch.compile``.
"""

from ._implicit import custom_fixed_point, custom_root
from ._linear_solve import solve_cg, solve_inv, solve_lu, solve_neumann, solve_normal_cg

__all__ = [
    "custom_fixed_point",
    "custom_root",
    "solve_cg",
    "solve_inv",
    "solve_lu",
    "solve_neumann",
    "solve_normal_cg",
]
