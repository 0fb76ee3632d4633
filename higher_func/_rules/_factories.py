"""The public rule factories: one per ``torch.optim`` optimizer, with its names and defaults.

Each takes keyword-only hyperparameters and returns a :class:`~higher_func.optim.Rule`.
Numeric hyperparameters accept a number, a tensor (learnable when it requires grad) or a
dict keyed like ``params`` with per-parameter values.  ``foreach``, ``fused``,
``capturable`` and ``differentiable`` select implementations in ``torch.optim``; they are
accepted here and change nothing (every rule is differentiable).  ``arithmetic="torch"``
(the default: torch.optim's fused ops) or ``"higher"`` (higher 0.2.1's two-op forms, what
the drop-in optimizers use) selects which ops a step runs; see ``_math.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from . import _adagrad, _adam, _adam_variants, _asgd, _rmsprop, _sgd
from ._core import Rule, RuleSpec, build_rule

Number = Any  # a float, a tensor, or a dict of per-parameter values


def _options(arguments: dict[str, Any]) -> dict[str, Any]:
    """A factory's keyword arguments, with the implementation flags of ``**flags`` merged in."""
    options = {k: v for k, v in arguments.items() if k != "flags"}
    return {**options, **arguments["flags"]}


def sgd(
    *,
    lr: Number = 1e-3,
    momentum: Number = 0.0,
    dampening: Number = 0.0,
    weight_decay: Number = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""Stochastic gradient descent, as ``torch.optim.SGD``.

    .. math::
        g \leftarrow \pm g + \lambda\theta,\quad
        b \leftarrow \mu b + (1-\tau) g \ (b_1 = g),\quad
        \theta \leftarrow \theta - \gamma\,(g + \mu b \text{ if nesterov else } b)

    The first momentum step seeds the buffer with the (undamped) gradient, as torch does;
    ``state.step`` records which step is the first.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = rule.init(params)
        >>> params, state = rule.step(params, {"w": torch.ones(2)}, state)
        >>> params["w"]
        tensor([0.9000, 0.9000])
    """
    return build_rule(SGD, _options(locals()))


def adam(
    *,
    lr: Number = 1e-3,
    betas: tuple[Number, Number] = (0.9, 0.999),
    eps: Number = 1e-8,
    weight_decay: Number = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    **flags: Any,
) -> Rule:
    r"""Adam, as ``torch.optim.Adam`` (AMSGrad, maximize, decoupled weight decay).

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    Where the second moment is exactly zero, the square root's derivative is taken as 0
    (see :func:`higher_func.optim.safe_sqrt`), so gradients through the step stay finite.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.adam(lr=0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> params, state = rule.step(params, {"w": torch.tensor([1.0, -1.0])}, rule.init(params))
        >>> params["w"]
        tensor([-0.1000,  0.1000])
    """
    return build_rule(ADAM, _options(locals()))


def adamw(
    *,
    lr: Number = 1e-3,
    betas: tuple[Number, Number] = (0.9, 0.999),
    eps: Number = 1e-8,
    weight_decay: Number = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay
    :math:`\theta \leftarrow \theta (1 - \gamma\lambda)` before the Adam update.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.adamw(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.ones(1)}
        >>> params, _ = rule.step(params, {"w": torch.zeros(1)}, rule.init(params))
        >>> params["w"]
        tensor([0.9500])
    """
    return build_rule(ADAMW, _options(locals()))


def adagrad(
    *,
    lr: Number = 1e-2,
    lr_decay: Number = 0.0,
    weight_decay: Number = 0.0,
    initial_accumulator_value: Number = 0.0,
    eps: Number = 1e-10,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""Adagrad, as ``torch.optim.Adagrad``.

    .. math::
        s \leftarrow s + g^2,\quad
        \theta \leftarrow \theta - \frac{\gamma}{1 + (t-1)\eta}\frac{g}{\sqrt{s} + \epsilon}

    ``initial_accumulator_value`` is read by ``init`` only.  (``torch.optim.Adagrad`` seeds
    every group from its constructor's value; a rule uses its own value.)

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.adagrad(lr=1.0)
        >>> params = {"w": torch.zeros(1)}
        >>> params, _ = rule.step(params, {"w": torch.tensor([2.0])}, rule.init(params))
        >>> params["w"]
        tensor([-1.])
    """
    return build_rule(ADAGRAD, _options(locals()))


def adadelta(
    *,
    lr: Number = 1.0,
    rho: Number = 0.9,
    eps: Number = 1e-6,
    weight_decay: Number = 0.0,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""Adadelta, as ``torch.optim.Adadelta``.

    .. math::
        v \leftarrow \rho v + (1-\rho) g^2,\quad
        \Delta = \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}} g,\quad
        u \leftarrow \rho u + (1-\rho)\Delta^2,\quad \theta \leftarrow \theta - \gamma\Delta

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.adadelta()
        >>> params = {"w": torch.zeros(1, dtype=torch.float64)}
        >>> params, _ = rule.step(params, {"w": torch.ones(1, dtype=torch.float64)},
        ...                       rule.init(params))
        >>> round(params["w"].item(), 6)
        -0.003162
    """
    return build_rule(ADADELTA, _options(locals()))


def adamax(
    *,
    lr: Number = 2e-3,
    betas: tuple[Number, Number] = (0.9, 0.999),
    eps: Number = 1e-8,
    weight_decay: Number = 0.0,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""Adamax, as ``torch.optim.Adamax``: Adam with an infinity-norm second moment.

    .. math::
        u \leftarrow \max(\beta_2 u, |g| + \epsilon),\quad
        \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\frac{m}{u}

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.adamax(lr=0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> params, _ = rule.step(params, {"w": torch.ones(1)}, rule.init(params))
        >>> params["w"]
        tensor([-0.1000])
    """
    return build_rule(ADAMAX, _options(locals()))


def asgd(
    *,
    lr: Number = 1e-2,
    lambd: Number = 1e-4,
    alpha: Number = 0.75,
    t0: Number = 1e6,
    weight_decay: Number = 0.0,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""Averaged SGD, as ``torch.optim.ASGD``.

    .. math::
        \theta \leftarrow \theta(1 - \lambda\eta) - \eta g,\quad
        a \leftarrow a + \mu(\theta - a),\quad
        \eta \leftarrow \frac{\gamma}{(1 + \lambda\gamma t)^\alpha},\quad
        \mu \leftarrow \frac{1}{\max(1, t - t_0)}

    The averaged iterate ``state.ax`` is taken of the updated parameter, as in torch.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.asgd(lr=0.1, lambd=0.0)
        >>> params = {"w": torch.ones(1)}
        >>> params, state = rule.step(params, {"w": torch.ones(1)}, rule.init(params))
        >>> params["w"], state.ax["w"]
        (tensor([0.9000]), tensor([0.9000]))
    """
    return build_rule(ASGD, _options(locals()))


def rmsprop(
    *,
    lr: Number = 1e-2,
    alpha: Number = 0.99,
    eps: Number = 1e-8,
    weight_decay: Number = 0.0,
    momentum: Number = 0.0,
    centered: bool = False,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""RMSprop, as ``torch.optim.RMSprop`` (centered, with momentum).

    .. math::
        v \leftarrow \alpha v + (1-\alpha) g^2,\quad
        d = \frac{g}{\sqrt{v - \bar g^2} + \epsilon},\quad
        b \leftarrow \mu b + d,\quad \theta \leftarrow \theta - \gamma b

    (:math:`\bar g` is the running mean of gradients when ``centered``, else 0; without
    momentum :math:`b = d`.)

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.rmsprop(lr=0.01, alpha=0.0)
        >>> params = {"w": torch.zeros(1)}
        >>> params, _ = rule.step(params, {"w": torch.ones(1)}, rule.init(params))
        >>> params["w"]
        tensor([-0.0100])
    """
    return build_rule(RMSPROP, _options(locals()))


def rprop(
    *,
    lr: Number = 1e-2,
    etas: tuple[Number, Number] = (0.5, 1.2),
    step_sizes: tuple[Number, Number] = (1e-6, 50.0),
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""Resilient backpropagation, as ``torch.optim.Rprop``.

    Each element's step size grows by ``etas[1]`` while its gradient keeps its sign and
    shrinks by ``etas[0]`` when it flips (that element then skips the update), clamped to
    ``step_sizes``; the parameter moves by ``-sign(g) * step_size``.  ``lr`` is the initial
    step size, read by ``init`` only.  ``sign`` has a zero derivative, so gradients reach
    ``lr`` and ``etas`` through the step sizes only.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.rprop(lr=0.5)
        >>> params = {"w": torch.zeros(1)}
        >>> params, _ = rule.step(params, {"w": torch.ones(1)}, rule.init(params))
        >>> params["w"]
        tensor([-0.5000])
    """
    return build_rule(RPROP, _options(locals()))


def nadam(
    *,
    lr: Number = 2e-3,
    betas: tuple[Number, Number] = (0.9, 0.999),
    eps: Number = 1e-8,
    weight_decay: Number = 0.0,
    momentum_decay: Number = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""NAdam (Adam with Nesterov momentum and momentum decay), as ``torch.optim.NAdam``.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.nadam(lr=0.1)
        >>> params = {"w": torch.zeros(1, dtype=torch.float64)}
        >>> params, _ = rule.step(params, {"w": torch.ones(1, dtype=torch.float64)},
        ...                       rule.init(params))
        >>> round(params["w"].item(), 6)
        -0.105645
    """
    return build_rule(NADAM, _options(locals()))


def radam(
    *,
    lr: Number = 1e-3,
    betas: tuple[Number, Number] = (0.9, 0.999),
    eps: Number = 1e-8,
    weight_decay: Number = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    **flags: Any,
) -> Rule:
    r"""RAdam (variance-rectified Adam), as ``torch.optim.RAdam``.

    While the variance of the adaptive learning rate is intractable (:math:`\rho_t \le 5`,
    the first steps) the update is the bias-corrected momentum alone, as in torch.

    Example:
        >>> import torch, higher_func as hf
        >>> rule = hf.optim.radam(lr=0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> params, _ = rule.step(params, {"w": torch.ones(1)}, rule.init(params))
        >>> params["w"]
        tensor([-0.1000])
    """
    return build_rule(RADAM, _options(locals()))


# --------------------------------------------------------------------------- the specs


def _with_signature_defaults(spec: RuleSpec, factory: Callable[..., Rule]) -> RuleSpec:
    """``spec`` with the defaults of ``factory``'s keyword arguments, written once, there
    (then those the spec fixes itself, which the factory does not take)."""
    parameters = inspect.signature(factory).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}
    return dataclasses.replace(spec, defaults={**defaults, **spec.defaults})


SGD = _with_signature_defaults(_sgd.SGD, sgd)
ADAM = _with_signature_defaults(_adam.ADAM, adam)
ADAMW = _with_signature_defaults(_adam.ADAMW, adamw)
ADAGRAD = _with_signature_defaults(_adagrad.ADAGRAD, adagrad)
ADADELTA = _with_signature_defaults(_adagrad.ADADELTA, adadelta)
ADAMAX = _with_signature_defaults(_adam_variants.ADAMAX, adamax)
ASGD = _with_signature_defaults(_asgd.ASGD, asgd)
RMSPROP = _with_signature_defaults(_rmsprop.RMSPROP, rmsprop)
RPROP = _with_signature_defaults(_rmsprop.RPROP, rprop)
NADAM = _with_signature_defaults(_adam_variants.NADAM, nadam)
RADAM = _with_signature_defaults(_adam_variants.RADAM, radam)

#: The built-in rules by the ``torch.optim`` class whose math they reproduce (each spec's
#: ``torch_class``): what the registry starts from.
BUILT_IN: dict[type, Callable[..., Rule]] = {
    spec.torch_class: factory
    for spec, factory in (
        (SGD, sgd),
        (ADAM, adam),
        (ADAMW, adamw),
        (ADAGRAD, adagrad),
        (ADADELTA, adadelta),
        (ADAMAX, adamax),
        (ASGD, asgd),
        (RMSPROP, rmsprop),
        (RPROP, rprop),
        (NADAM, nadam),
        (RADAM, radam),
    )
    if spec.torch_class is not None
}
