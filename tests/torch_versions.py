"""Skips for tests of features the installed torch lacks, with the version they need.

A feature that needs a newer torch is refused by higher_func with a ``TorchVersionError``
(see ``higher_func/_versions.py``); its tests are skipped with this reason, never passed.
``tests/test_versions.py`` checks the refusals themselves on every torch.
"""

from __future__ import annotations

import pytest
import torch

from higher_func._versions import torch_at_least


def skip_reason(minimum: str, feature: str) -> str | None:
    """The skip reason when the installed torch is older than ``minimum``, else ``None``."""
    if torch_at_least(minimum):
        return None
    return f"{feature} needs torch >= {minimum}; this is torch {torch.__version__}"


def needs_torch(minimum: str, feature: str) -> pytest.MarkDecorator:
    """``@needs_torch("2.7", "Adam's decoupled_weight_decay")``: skip on an older torch."""
    reason = skip_reason(minimum, feature)
    return pytest.mark.skipif(reason is not None, reason=reason or "")
