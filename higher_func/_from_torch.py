"""What the drop-in adapter takes from a live ``torch.optim`` optimizer beyond its groups and
state: values torch reads from its defaults, and state imports put off to the first step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

#: Options torch reads from ``optimizer.defaults``, never from the group, when it creates
#: a parameter's state: Adagrad seeds every accumulator from its constructor argument, also
#: in a group added by ``add_param_group(..., initial_accumulator_value=...)``.
SEEDED_FROM_DEFAULTS: dict[type, tuple[str, ...]] = {
    torch.optim.Adagrad: ("initial_accumulator_value",)
}


def seeds_from_defaults(other: torch.optim.Optimizer) -> dict[str, Any]:
    """The values every group of the diffopt takes from ``other.defaults`` (as torch does)."""
    for klass, keys in SEEDED_FROM_DEFAULTS.items():
        if isinstance(other, klass):
            return {k: other.defaults[k] for k in keys if k in other.defaults}
    return {}


class DeferredImport(NamedTuple):
    """What importing a group's torch state needs (its rule is built at the first step)."""

    torch_group: Mapping[str, Any]
    torch_states: dict[int, Mapping[str, Any]]
    params: dict[int, Tensor]
