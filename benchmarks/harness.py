"""Measuring: median seconds per iteration, peak memory, and agreement between implementations.

Timing interleaves implementations round by round (round ``r`` times every implementation
once, starting from a rotating position, every other round in reverse order), so slow
drifts of a shared machine hit every implementation alike and the ratios stay meaningful
even when absolute times are noisy.

Peak memory is the growth of memory during one iteration:

* CPU: the process's resident-set high-water mark (``VmHWM``), reset just before the
  iteration by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) after
  ``gc.collect()`` and glibc's ``malloc_trim(0)``, minus the resident set at that moment.
  It counts every allocation the process touches (tensors, autograd graph, Python objects),
  at page granularity, so values below about 1 MB are noise.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the iteration (tensors only, exact).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from implementations import Implementation, Runner, Unavailable
from torch import Tensor
from workloads import Workload


@dataclass
class CaseResult:
    """One implementation on one workload."""

    implementation: str
    status: str  # "ok", "skipped" or "failed"
    message: str = ""
    times: list[float] = field(default_factory=list)
    first_iteration_s: float | None = None
    second_iteration_s: float | None = None
    peak_bytes: int | None = None
    meta_loss: float | None = None
    deviation: float | None = None
    compiled: bool = False
    notes: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "implementation": self.implementation,
            "status": self.status,
            "message": self.message,
            "median_s": self.median_s,
            "times_s": self.times,
            "first_iteration_s": self.first_iteration_s,
            "second_iteration_s": self.second_iteration_s,
            "peak_bytes": self.peak_bytes,
            "meta_loss": self.meta_loss,
            "deviation_from_reference": self.deviation,
            "compiled": self.compiled,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- devices


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


# --------------------------------------------------------------------------- memory


def memory_method(device: str) -> str:
    """How :func:`peak_memory` measures on ``device`` (printed with every memory figure)."""
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated() minus memory_allocated() before the iteration"
    if _can_reset_high_water():
        return (
            "CPU resident-set high-water mark (VmHWM) reset via /proc/self/clear_refs, "
            "minus the resident set before the iteration (after gc and malloc_trim)"
        )
    return "unavailable: /proc/self/clear_refs cannot reset the high-water mark here"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _can_reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _status_bytes("VmHWM")
    except OSError:
        return False
    return True


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(fn: Callable[[], Any], device: str) -> int | None:
    """Bytes by which memory grows at its peak while ``fn()`` runs (``None`` if unmeasurable)."""
    _trim_heap()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not _can_reset_high_water():
        return None
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


# --------------------------------------------------------------------------- agreement


def deviation(values: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    if len(values) != len(reference):
        return math.inf
    scale = max((r.abs().max().item() for r in reference if r.numel()), default=0.0)
    pairs = zip(values, reference, strict=True)
    worst = max(((v.double() - r.double()).abs().max().item() for v, r in pairs), default=0.0)
    return worst / max(scale, 1e-30)


# --------------------------------------------------------------------------- one workload


def run_workload(
    workload: Workload,
    implementations: Sequence[Implementation],
    *,
    rounds: int,
    device: str,
    reference: str,
    budget_s: float = math.inf,
    measure_memory: bool = True,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, CaseResult]:
    """Every implementation on ``workload``: warm-up, agreement, interleaved timing, memory."""
    results: dict[str, CaseResult] = {}
    runners: dict[str, Runner] = {}
    for impl in implementations:
        try:
            runner = impl.build(workload)
        except Unavailable as error:
            results[impl.key] = CaseResult(impl.key, "skipped", str(error))
            continue
        except Exception as error:
            results[impl.key] = _failure(impl.key, "set-up", error)
            continue
        results[impl.key] = CaseResult(impl.key, "ok", compiled=runner.compiled, notes=runner.notes)
        runners[impl.key] = runner

    checks: dict[str, list[Tensor]] = {}
    for key, runner in list(runners.items()):
        try:
            first, loss = _timed(runner.iteration, device)
            checks[key] = [t.detach().cpu() for t in runner.check_values()]
            second = _timed(runner.iteration, device)[0] if runner.compiled else None
        except Exception as error:
            results[key] = _failure(key, "first iteration", error)
            del runners[key]
            continue
        results[key].first_iteration_s = first
        results[key].second_iteration_s = second
        if isinstance(loss, Tensor):
            results[key].meta_loss = float(loss)
        log(f"    {key}: first iteration {first:.3f} s")
    if checks.get(reference):
        for key, values in checks.items():
            results[key].deviation = deviation(values, checks[reference])

    if workload.measures_time:
        _interleaved_timing(runners, results, rounds, budget_s, device)
    if measure_memory:
        for key, runner in runners.items():
            results[key].peak_bytes = peak_memory(runner.iteration, device)
    return results


def _interleaved_timing(
    runners: dict[str, Runner],
    results: dict[str, CaseResult],
    rounds: int,
    budget_s: float,
    device: str,
) -> None:
    keys = list(runners)
    start = time.perf_counter()
    for r in range(rounds):
        # A rotating start, and every other round in reverse: an implementation follows a
        # different one from round to round (in a fixed order, the one that always ran
        # right after its twin, the same code at another revision, measured up to 10%
        # faster than the twin; alternating the order, the two were within 2%).
        order = [keys[(r + offset) % len(keys)] for offset in range(len(keys))]
        for key in order[::-1] if r % 2 else order:
            if key not in runners:
                continue
            try:
                results[key].times.append(_timed(runners[key].iteration, device)[0])
            except Exception as error:
                results[key] = _failure(key, f"round {r}", error)
                del runners[key]
        if r >= 2 and time.perf_counter() - start > budget_s:
            break


def _failure(key: str, stage: str, error: Exception) -> CaseResult:
    last = traceback.extract_tb(error.__traceback__)[-1]
    where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
    message = f"failed at {stage}: {type(error).__name__}: {error} ({where})"
    return CaseResult(key, "failed", message.replace("\n", " ")[:400])
