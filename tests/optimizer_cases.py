"""The one table of optimizer cases that drives every generic rule test.

Adding an optimizer is one entry: its torch class, its factory, the option combinations
whose math differs, and the numeric hyperparameters to differentiate through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import higher_func as hf
from higher_func._versions import ADAM_DECOUPLED_WEIGHT_DECAY

from torch_versions import skip_reason


@dataclass(frozen=True)
class OptimizerCase:
    torch_class: type[torch.optim.Optimizer]
    factory: Callable[..., hf.optim.Rule]
    option_sets: tuple[dict[str, Any], ...]
    #: Hyperparameter -> value used as a tensor requiring grad in gradchecks.
    tensor_hyperparameters: dict[str, Any] = field(default_factory=dict)
    #: Options used with the tensor hyperparameters.
    gradcheck_options: dict[str, Any] = field(default_factory=dict)
    #: Unrolled steps in gradchecks (RAdam rectifies only from its sixth step on).
    gradcheck_steps: int = 2
    #: Option -> the oldest torch whose optimizer has it (tests of it skip on older ones).
    newer_options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.factory.__name__

    def unsupported(self, options: dict[str, Any]) -> str | None:
        """Why the installed torch cannot run ``options`` (a skip reason), or ``None``."""
        for option, minimum in self.newer_options.items():
            reason = skip_reason(minimum, f"{self.torch_class.__name__}'s {option}")
            if options.get(option) and reason is not None:
                return reason
        return None


CASES = (
    OptimizerCase(
        torch.optim.SGD,
        hf.optim.sgd,
        (
            {"lr": 0.1},
            {"lr": 0.1, "momentum": 0.9},
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
            {"lr": 0.05, "momentum": 0.8, "nesterov": True},
            {"lr": 0.1, "weight_decay": 0.2, "maximize": True},
            {"lr": 0.1, "momentum": 0.5, "maximize": True, "nesterov": True},
        ),
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05},
    ),
    OptimizerCase(
        torch.optim.Adam,
        hf.optim.adam,
        (
            {"lr": 0.01},
            {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6},
            {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": 0.01, "maximize": True, "amsgrad": True},
        ),
        {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1},
        newer_options={"decoupled_weight_decay": ADAM_DECOUPLED_WEIGHT_DECAY},
    ),
    OptimizerCase(
        torch.optim.AdamW,
        hf.optim.adamw,
        (
            {"lr": 0.01},
            {"lr": 0.01, "weight_decay": 0.3, "amsgrad": True},
            {"lr": 0.01, "maximize": True, "betas": (0.7, 0.9)},
        ),
        {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1},
    ),
    OptimizerCase(
        torch.optim.Adagrad,
        hf.optim.adagrad,
        (
            {"lr": 0.1},
            {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1},
            {"lr": 0.1, "initial_accumulator_value": 0.2, "eps": 1e-4},
            {"lr": 0.1, "maximize": True},
        ),
        {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1, "eps": 1e-3},
    ),
    OptimizerCase(
        torch.optim.Adadelta,
        hf.optim.adadelta,
        (
            {},
            {"lr": 0.5, "rho": 0.6, "eps": 1e-4},
            {"weight_decay": 0.1, "maximize": True},
        ),
        {"lr": 0.9, "rho": 0.7, "eps": 1e-3, "weight_decay": 0.1},
    ),
    OptimizerCase(
        torch.optim.Adamax,
        hf.optim.adamax,
        (
            {"lr": 0.01},
            {"lr": 0.02, "betas": (0.8, 0.9), "weight_decay": 0.1},
            {"lr": 0.01, "maximize": True, "eps": 1e-4},
        ),
        {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1},
    ),
    OptimizerCase(
        torch.optim.ASGD,
        hf.optim.asgd,
        (
            {"lr": 0.05},
            {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 3.0},
            {"lr": 0.05, "t0": 2.0, "weight_decay": 0.1, "maximize": True},
        ),
        {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 0.5, "weight_decay": 0.1},
    ),
    OptimizerCase(
        torch.optim.RMSprop,
        hf.optim.rmsprop,
        (
            {"lr": 0.01},
            {"lr": 0.01, "centered": True},
            {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
            {"lr": 0.01, "momentum": 0.5, "centered": True, "alpha": 0.9},
            {"lr": 0.01, "maximize": True, "eps": 1e-4},
        ),
        {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "momentum": 0.5, "weight_decay": 0.1},
        {"centered": True},
    ),
    OptimizerCase(
        torch.optim.Rprop,
        hf.optim.rprop,
        (
            {"lr": 0.01},
            {"lr": 0.02, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.05)},
            {"lr": 0.01, "maximize": True},
        ),
        {"lr": 0.01, "etas": (0.4, 1.3)},
    ),
    OptimizerCase(
        torch.optim.NAdam,
        hf.optim.nadam,
        (
            {"lr": 0.01},
            {"lr": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": 0.01, "maximize": True, "betas": (0.8, 0.99)},
        ),
        {
            "lr": 0.01,
            "betas": (0.8, 0.95),
            "eps": 1e-3,
            "weight_decay": 0.1,
            "momentum_decay": 0.01,
        },
    ),
    OptimizerCase(
        torch.optim.RAdam,
        hf.optim.radam,
        (
            {"lr": 0.01},
            {"lr": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": 0.01, "maximize": True, "betas": (0.8, 0.9)},
        ),
        {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1},
        gradcheck_steps=7,
    ),
)

CASE_IDS = [case.name for case in CASES]

OPTION_CASES = [(case, options) for case in CASES for options in case.option_sets]
OPTION_IDS = [
    f"{case.name}-" + ("-".join(f"{k}={v}" for k, v in options.items()) or "defaults")
    for case, options in OPTION_CASES
]

#: Low-precision rows: every optimizer in bfloat16 and float16 against torch.optim run in the
#: same dtype (the default suite steps each optimizer's first option set, the slow pass all).
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
LOW_PRECISION_CASES = [
    (case, options, dtype) for case, options in OPTION_CASES for dtype in LOW_PRECISION_DTYPES
]
LOW_PRECISION_IDS = [
    f"{option_id}-{str(dtype).removeprefix('torch.')}"
    for option_id in OPTION_IDS
    for dtype in LOW_PRECISION_DTYPES
]


# --------------------------------------------------------------------------- error cases


@dataclass(frozen=True)
class ErrorCase:
    """A misuse, and the error it gets from every entry point (``rule.step`` and
    ``diffopt.step``), matched by message.  The mistake is made on a ``(3, 1)`` weight."""

    name: str
    torch_class: type[torch.optim.Optimizer]
    options: dict[str, Any]
    error: type[Exception]
    match: str
    #: The gradient given instead of the right one (``None``: the right one).
    bad_grad: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: Hyperparameters of the wrong type (given to the factory; written into the diffopt's
    #: ``param_groups`` before a step).
    bad_options: dict[str, Any] = field(default_factory=dict)
    #: Whether the case applies to the drop-in path too (pytree structure does not).
    through_diffopt: bool = True


ERROR_CASES = (
    ErrorCase(
        "grad-of-wrong-shape",
        torch.optim.SGD,
        {"lr": 0.1},
        ValueError,
        r"has shape \(3,\) but params\S* has shape \(3, 1\); a gradient is never broadcast",
        bad_grad=lambda g: g.reshape(3),
    ),
    ErrorCase(
        "one-element-grad",
        torch.optim.Adam,
        {"lr": 0.1},
        ValueError,
        r"has shape \(1,\) but params\S* has shape \(3, 1\)",
        bad_grad=lambda g: g[:1, 0],
    ),
    ErrorCase(
        "grad-of-same-size-and-wrong-shape",
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9},
        ValueError,
        r"has shape \(1, 3\) but params\S* has shape \(3, 1\)",
        bad_grad=lambda g: g.reshape(1, 3),
    ),
    ErrorCase(
        "grad-of-wrong-dtype-sgd",
        torch.optim.SGD,
        {"lr": 0.1},
        TypeError,
        r"is torch.float64 but params\S* is torch.float32.*grad.to\(torch.float32\)",
        bad_grad=lambda g: g.double(),
    ),
    ErrorCase(
        "grad-of-wrong-dtype-adam",
        torch.optim.Adam,
        {"lr": 0.1},
        TypeError,
        r"is torch.float64 but params\S* is torch.float32",
        bad_grad=lambda g: g.double(),
    ),
    ErrorCase(
        "sparse-grad-adam",
        torch.optim.Adam,
        {"lr": 0.1},
        RuntimeError,
        r"adam does not support sparse gradients.*torch.sparse_coo.*to_dense\(\)",
        bad_grad=lambda g: g.to_sparse(),
    ),
    ErrorCase(
        "sparse-grad-rmsprop",
        torch.optim.RMSprop,
        {"lr": 0.1},
        RuntimeError,
        r"rmsprop does not support sparse gradients",
        bad_grad=lambda g: g.to_sparse(),
    ),
    ErrorCase(
        "lr-none",
        torch.optim.SGD,
        {"lr": 0.1},
        TypeError,
        r"sgd\(\): lr must be a number or a floating-point tensor, got NoneType \(None\)",
        bad_options={"lr": None},
    ),
    ErrorCase(
        "lr-string",
        torch.optim.SGD,
        {"lr": 0.1},
        TypeError,
        r"lr must be a number .*got str \('0.1'\) \(a string: convert it with float\(\)\)",
        bad_options={"lr": "0.1"},
    ),
    ErrorCase(
        "beta-string",
        torch.optim.Adam,
        {"lr": 0.1},
        TypeError,
        r"adam\(\): betas\[1\] must be a number .*got str \('0.99'\)",
        bad_options={"betas": (0.9, "0.99")},
    ),
    ErrorCase(
        "momentum-integer-tensor",
        torch.optim.SGD,
        {"lr": 0.1},
        TypeError,
        r"momentum must be a number or a floating-point tensor, got a torch.int64 tensor",
        bad_options={"momentum": torch.tensor(1)},
    ),
)

ERROR_IDS = [case.name for case in ERROR_CASES]
