"""Stateless ("functional") modules: ``monkeypatch`` and its lower-level pieces.

``monkeypatch(model)`` returns a :class:`FunctionalModule` (an "fmodel"): the model run
with *fast weights* (plain tensors that may carry an autograd graph) and a history of
them, as ``higher.patch.monkeypatch`` did, built on the same slot swap as
``torch.func.functional_call`` instead of subclasses created at run time.
"""

# For compatibility with higher: its type aliases here and, below, its base class name
# ``_MonkeyPatchBase`` (``isinstance(m, higher.patch._MonkeyPatchBase)``, type hints).
from ._compat import _BufferType, _EncapsulatorType  # noqa: F401
from ._patch import (
    FunctionalModule,
    FunctionalSubmodule,
    buffer_sync,
    make_functional,
    monkeypatch,
)
from ._patch import _StatelessBase as _MonkeyPatchBase  # noqa: F401

__all__ = [
    "FunctionalModule",
    "FunctionalSubmodule",
    "buffer_sync",
    "make_functional",
    "monkeypatch",
]
