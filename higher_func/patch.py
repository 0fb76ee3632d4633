"""Stateless ("functional") modules: ``monkeypatch`` and its lower-level pieces.

``monkeypatch(model)`` returns a :class:`FunctionalModule` (an "fmodel"): the model run
with *fast weights* (plain tensors that may carry an autograd graph) and a history of
them, as ``higher.patch.monkeypatch`` did, built on the same slot swap as
``torch.func.functional_call`` instead of subclasses created at run time.
"""

from ._patch import (
    FunctionalModule,
    FunctionalSubmodule,
    buffer_sync,
    make_functional,
    monkeypatch,
)
from ._patch import _StatelessBase as _MonkeyPatchBase  # noqa: F401  (higher's base class name)

__all__ = [
    "FunctionalModule",
    "FunctionalSubmodule",
    "buffer_sync",
    "make_functional",
    "monkeypatch",
]
