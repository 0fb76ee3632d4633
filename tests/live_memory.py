"""Live tensor bytes on any device: a dispatch mode that follows every storage ops create.

Peak RSS overstates live memory on glibc (freed activations can pin the heap), and
``torch.cuda.max_memory_allocated`` exists on CUDA only.  :class:`LiveTensorBytes` counts
the bytes of the storages that tensor ops produce while it is active and are still alive,
and keeps the peak: what the tests and ``benchmarks/long_unrolls.py --live`` report.
Tensors made before entering are not counted.
"""

from __future__ import annotations

from typing import Any

import optree
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as meter: ...`` then ``meter.peak`` (bytes).

    Example:
        >>> import torch
        >>> with LiveTensorBytes() as meter:
        ...     a = torch.zeros(1000, dtype=torch.float64)
        ...     del a
        ...     b = torch.zeros(10, dtype=torch.float64)
        >>> meter.peak, meter.current
        (8000, 80)
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._sweep()  # before the op: what died since the last one
        out = func(*args, **(kwargs or {}))
        for t in optree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.storages:
                    self.storages[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self.storages.items() if ref.expired()]
        for key in dead:
            self.current -= self.storages.pop(key)[1]

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._sweep()
