"""Measure where stepping a parameter group flat stops paying (``higher_func._execution``).

For parameter groups of ``count`` tensors holding ``total`` float32 elements in all (equal
sizes), and for the parameter shapes of the real-model workloads, this times a tracked
inner loop through ``innerloop_ctx`` (``steps`` recorded steps of the inner optimizer, then
the outer backward through them) twice, interleaved round by round: once with the group
stepped flat, once per tensor.  The loss is ``sum(c * p**2)`` over the parameters, so the
optimizer's steps and their backward are nearly all the work: the figures isolate what the
planner decides.  It prints the median seconds and the ratio per-tensor / flat (above 1:
flat is faster) and the largest flat-winning group, from which
``_execution.FLAT_MAX_BYTES`` is set.

Usage (from the repository root, 1 thread by default)::

    PYTHONPATH=$PWD python benchmarks/plan_thresholds.py                # a few minutes
    PYTHONPATH=$PWD python benchmarks/plan_thresholds.py --device cuda  # re-measure on a GPU
    PYTHONPATH=$PWD python benchmarks/plan_thresholds.py --counts 4,64 --totals 20,22
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import higher_func as hf
from higher_func import _execution

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


class Quadratic(nn.Module):
    """Parameters of the given shapes; ``forward()`` is ``sum(c * p**2)`` over them."""

    def __init__(self, shapes: Sequence[torch.Size], device: str) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in shapes]
        )
        self.scales = [torch.rand(s, generator=generator).to(device) for s in shapes]

    def forward(self) -> torch.Tensor:
        return sum((c * p * p).sum() for c, p in zip(self.scales, self.weights, strict=True))


def model_shapes(name: str) -> list[torch.Size]:
    """The parameter shapes of a real-model workload's model (``workloads.py``)."""
    import workloads

    return [p.shape for p in workloads.MODELS[name]().parameters()]


def one_loop(model: Quadratic, optimizer: torch.optim.Optimizer, steps: int) -> None:
    with hf.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(fmodel())
        fmodel().backward()
    model.zero_grad(set_to_none=True)


def time_plans(
    shapes: Sequence[torch.Size], optimizer: str, steps: int, rounds: int, device: str
) -> dict[str, float]:
    """Median seconds of one loop stepped flat and per tensor, interleaved."""
    model = Quadratic(shapes, device)
    opt = OPTIMIZERS[optimizer](list(model.parameters()))
    limits = {"flat": math.inf, "per tensor": -1}
    times: dict[str, list[float]] = {k: [] for k in limits}
    saved = _execution.FLAT_MAX_BYTES, _execution.FLAT_MAX_MEAN_BYTES
    try:
        for r in range(rounds + 1):  # round 0 warms up
            order = list(limits) if r % 2 else list(limits)[::-1]
            for key in order:
                _execution.FLAT_MAX_BYTES = _execution.FLAT_MAX_MEAN_BYTES = limits[key]  # type: ignore[assignment]
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                one_loop(model, opt, steps)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if r:
                    times[key].append(time.perf_counter() - start)
    finally:
        _execution.FLAT_MAX_BYTES, _execution.FLAT_MAX_MEAN_BYTES = saved
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--counts", default="4,16,64,256", help="tensors per group")
    parser.add_argument(
        "--totals", default="16,18,20,21,22,24", help="log2 of the elements per group"
    )
    parser.add_argument("--models", default="resnet18,bert_tiny,lstm_lm,omniglot")
    parser.add_argument("--optimizers", default="adam,momentum")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--save",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "plan_thresholds.txt",
        help="where to save the table (shown in docs/performance.md by report.py)",
    )
    args = parser.parse_args(argv)
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    cases: list[tuple[str, list[torch.Size]]] = []
    for count in (int(c) for c in args.counts.split(",") if c):
        for log2 in (int(t) for t in args.totals.split(",") if t):
            size = max(1, 2**log2 // count)
            cases.append((f"{count} x {size}", [torch.Size([size])] * count))
    cases += [(name, model_shapes(name)) for name in args.models.split(",") if name]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    emit(f"device {args.device}, {torch.get_num_threads()} thread(s), load average {load}")
    emit(f"{args.steps} recorded steps + outer backward, median of {args.rounds}, float32")
    header = f"{'group':>22} {'tensors':>7} {'elements':>10} {'MB':>7} {'optimizer':>9}"
    emit(f"{header} {'flat s':>9} {'per-t. s':>9} {'per-t./flat':>11}")
    best: dict[str, int] = {}
    for label, shapes in cases:
        elements = sum(math.prod(s) for s in shapes)
        megabytes = elements * 4 / 2**20
        for optimizer in args.optimizers.split(","):
            t = time_plans(shapes, optimizer, args.steps, args.rounds, args.device)
            ratio = t["per tensor"] / t["flat"]
            if ratio > 1.0:
                best[optimizer] = max(best.get(optimizer, 0), elements * 4)
            emit(
                f"{label:>22} {len(shapes):>7} {elements:>10} {megabytes:>7.2f} {optimizer:>9} "
                f"{t['flat']:>9.4f} {t['per tensor']:>9.4f} {ratio:>10.2f}x"
            )
    for optimizer, size in best.items():
        emit(f"{optimizer}: the largest group where flat won: {size / 2**20:.2f} MB")
    emit(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    args.save.parent.mkdir(parents=True, exist_ok=True)
    args.save.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
