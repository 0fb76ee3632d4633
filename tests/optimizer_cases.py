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

    @property
    def name(self) -> str:
        return self.factory.__name__


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
