"""Measuring what the libraries do not: interleaved rounds, peak memory, agreement.

One call is timed with ``torch.utils.benchmark``'s clock, which synchronizes an accelerator
(its ``Timer`` would add two untimed warm-up calls to each); the statistics of a case's
rounds are pytest-benchmark's ``Stats`` (median, quartiles, outliers), so a saved report
is a pytest-benchmark JSON file.

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
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from implementations import Implementation, Runner, Unavailable
from pytest_benchmark.stats import Stats
from torch import Tensor
from torch.utils.benchmark.utils.timer import timer as clock  # synchronizes accelerators
from workloads import Workload


@dataclass
class Case:
    """One implementation on one workload: timed rounds and what else was measured."""

    implementation: str
    status: str = "ok"  # "ok", "skipped" or "failed"
    message: str = ""
    stats: Stats = field(default_factory=Stats)
    #: first_iteration_s, second_iteration_s, peak_bytes, deviation_from_reference, ...
    extra_info: dict[str, Any] = field(default_factory=dict)


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of ``fn`` (an accelerator synchronized before and after)."""
    start = clock()
    fn()
    return clock() - start


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


def peak_memory(fn: Callable[[], Any], device: str) -> int | None:
    """Bytes by which memory grows at its peak while ``fn()`` runs (``None`` if unmeasurable)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
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
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, Case]:
    """Every implementation on ``workload``: warm-up, agreement, interleaved rounds, memory."""
    cases: dict[str, Case] = {}
    runners: dict[str, Runner] = {}
    checks: dict[str, list[Tensor]] = {}
    for impl in implementations:
        try:
            runner = impl.build(workload)
            first = seconds(runner.iteration)
            checks[impl.key] = [t.detach().cpu() for t in runner.check_values()]
            second = seconds(runner.iteration) if runner.compiled else None
        except Unavailable as error:
            cases[impl.key] = Case(impl.key, "skipped", str(error))
            continue
        except Exception as error:
            cases[impl.key] = _failure(impl.key, "set-up or first iteration", error)
            continue
        runners[impl.key] = runner
        info = {"first_iteration_s": first, "second_iteration_s": second}
        info |= {"compiled": runner.compiled, "notes": runner.notes}
        cases[impl.key] = Case(impl.key, extra_info=info)
        log(f"    {impl.key}: first iteration {first:.3f} s")
    for key, values in checks.items() if checks.get(reference) else ():
        value = deviation(values, checks[reference])
        # a nan meta-gradient's deviation is saved as "nan": JSON has no such float
        cases[key].extra_info["deviation_from_reference"] = (
            value if math.isfinite(value) else str(value)
        )

    keys, start = list(runners), time.perf_counter()
    for r in range(rounds):
        # A rotating start, and every other round in reverse: an implementation follows a
        # different one from round to round (in a fixed order, the one that always ran
        # right after its twin, the same code at another revision, measured up to 10%
        # faster than the twin; alternating the order, the two were within 2%).
        order = [keys[(r + offset) % len(keys)] for offset in range(len(keys))]
        for key in order[::-1] if r % 2 else order:
            if key in runners:
                try:
                    cases[key].stats.update(seconds(runners[key].iteration))
                except Exception as error:
                    cases[key] = _failure(key, f"round {r}", error)
                    del runners[key]
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    for key, runner in runners.items():
        cases[key].extra_info["peak_bytes"] = peak_memory(runner.iteration, device)
    return cases


def _failure(key: str, stage: str, error: Exception) -> Case:
    last = traceback.extract_tb(error.__traceback__)[-1]
    where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
    message = f"failed at {stage}: {type(error).__name__}: {error} ({where})"
    return Case(key, "failed", message.replace("\n", " ")[:400])
