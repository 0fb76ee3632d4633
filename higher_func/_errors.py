"""Error messages that more than one entry point raises: the same mistake gets the same
exception type and wording from the pure rules (``rule.step``, ``rule_factory``) and from the
drop-in adapter (``diffopt.step``, ``get_diff_optim``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

#: An optimizer class with neither a differentiable class nor a rule.  ``ValueError``, as
#: ``higher.get_diff_optim`` raised for it.
UNSUPPORTED_OPTIMIZER: Final = (
    "Optimizer type {name} is not supported. Supported: {supported}. Register a "
    "differentiable class with higher_func.register_optim({name}, MyDifferentiableClass), "
    "or a pure rule with higher_func.optim.register_rule({name}, factory)."
)

#: A hyperparameter override whose name the optimizer does not have.  ``TypeError``, as
#: ``torch.optim.SGD(params, lrr=0.1)`` raises for an unknown keyword argument.
UNKNOWN_OVERRIDE: Final = (
    "{owner} got an unknown hyperparameter override {key!r}; valid names are {valid}."
)


#: A gradient not shaped like its parameter, from ``rule.step`` or a ``grad_callback``.
#: ``ValueError``: torch.optim's in-place update never broadcasts a gradient.
GRAD_SHAPE: Final = (
    "{grad} has shape {got} but {param} has shape {expected}; a gradient is never broadcast. "
    "Pass one gradient shaped like its parameter (check a grad_callback or a hand-built "
    "gradient)."
)


def grad_shape(
    grad: str, got: tuple[int, ...], param: str, expected: tuple[int, ...]
) -> ValueError:
    """The error for gradient ``grad`` of shape ``got`` given for ``param`` of ``expected``."""
    return ValueError(GRAD_SHAPE.format(grad=grad, got=got, param=param, expected=expected))


def unsupported_optimizer(optimizer_class: type, supported: Iterable[type]) -> ValueError:
    """The error for an optimizer class that no registry serves."""
    names = ", ".join(sorted({k.__name__ for k in supported}))
    return ValueError(UNSUPPORTED_OPTIMIZER.format(name=optimizer_class.__name__, supported=names))


def unknown_override(owner: str, key: str, valid: Iterable[str]) -> TypeError:
    """The error for an override of a hyperparameter that ``owner`` does not have."""
    return TypeError(UNKNOWN_OVERRIDE.format(owner=owner, key=key, valid=sorted(valid)))
