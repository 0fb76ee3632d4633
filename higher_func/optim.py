"""Differentiable optimizers.

Two layers live here:

* **Pure rules** (the functional API): ``sgd``, ``adam``, ``adamw``, ``adagrad``,
  ``adadelta``, ``adamax``, ``asgd``, ``rmsprop``, ``rprop``, ``nadam``, ``radam``.  Each
  returns a :class:`Rule` with ``init(params) -> state`` and
  ``step(params, grads, state, **overrides) -> (params, state)`` over a dict of tensors,
  equal to ``torch.optim`` and differentiable to any order.
* The registry mapping ``torch.optim`` classes to rules, and :func:`from_torch_optimizer`
  to turn a live optimizer (with its state) into rules.
* ``higher``'s **differentiable optimizer classes** (:class:`DifferentiableOptimizer` and
  its subclasses), built on those rules.

A custom rule is a :class:`RuleSpec`; ``make_rule(spec, hyperparameters)`` (also named
``build_rule``) turns one into a validated :class:`Rule` (see "Writing a custom
optimizer" in the documentation).
"""

from ._constructors import create_diff_optim, get_diff_optim, register_optim
from ._diffopt import DifferentiableOptimizer
from ._hyperparams import apply_trainable_opt_params, get_trainable_opt_params
from ._rule_optimizer import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdam,
    DifferentiableAdamax,
    DifferentiableAdamW,
    DifferentiableASGD,
    DifferentiableNAdam,
    DifferentiableRAdam,
    DifferentiableRMSprop,
    DifferentiableRprop,
    DifferentiableRuleOptimizer,
    DifferentiableSGD,
)
from ._rules._adagrad import AdadeltaState, AdagradState
from ._rules._adam import AdamState
from ._rules._adam_variants import AdamaxState, NAdamState, RAdamState
from ._rules._asgd import ASGDState
from ._rules._core import Rule, RuleSpec, build_rule, safe_sqrt
from ._rules._factories import (
    adadelta,
    adagrad,
    adam,
    adamax,
    adamw,
    asgd,
    nadam,
    radam,
    rmsprop,
    rprop,
    sgd,
)
from ._rules._registry import (
    ImportedGroup,
    from_torch_optimizer,
    register_rule,
    rule_factory,
    supported_optimizers,
)
from ._rules._rmsprop import RMSpropState, RpropState
from ._rules._sgd import SGDState

# The public name of build_rule (the documentation's); build_rule is what the factories call.
make_rule = build_rule

# For compatibility with higher: the module-level names of higher.optim that public custom
# optimizers import (``from higher.optim import _add, _GroupedGradsType``), with higher's
# behaviour.  ``_opt_mapping`` is the drop-in registry itself, as in higher.
from ._compat import (  # noqa: E402, F401
    _add,
    _addcdiv,
    _addcmul,
    _get_mask_closure,
    _GradCallbackType,
    _GradClosureType,
    _GroupedGradsType,
    _maybe_mask,
    _OptMappingType,
    _OverrideType,
    _recursive_apply,
    _StateType,
)
from ._constructors import DifferentiableClasses  # noqa: E402

_opt_mapping = DifferentiableClasses()  # a view of the one registry, writable as in higher

__all__ = [
    "ASGDState",
    "AdadeltaState",
    "AdagradState",
    "AdamState",
    "AdamaxState",
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableRuleOptimizer",
    "DifferentiableSGD",
    "ImportedGroup",
    "NAdamState",
    "RAdamState",
    "RMSpropState",
    "RpropState",
    "Rule",
    "RuleSpec",
    "SGDState",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "asgd",
    "from_torch_optimizer",
    "get_diff_optim",
    "get_trainable_opt_params",
    "make_rule",
    "nadam",
    "radam",
    "register_optim",
    "register_rule",
    "rmsprop",
    "rprop",
    "rule_factory",
    "safe_sqrt",
    "sgd",
    "supported_optimizers",
]
