"""Measure the two kernel-level choices of the planner (``higher_func._execution``).

1. Why no rule's foreach kernel runs while autograd records: the bytes each op saves for
   its backward, foreach and per tensor, counted with ``torch.autograd.graph``'s
   ``saved_tensors_hooks`` (in lists of the inputs' size).
2. Where ``safe_sqrt``'s one-pass autograd Function starts to pay
   (``_execution.ONE_PASS_SQRT_MIN_ELEMENTS``): forward and backward with ``create_graph``
   of the four-op ``where`` form and of the Function, interleaved, per tensor size.

Usage (from the repository root, 1 thread by default; a few seconds)::

    PYTHONPATH=$PWD python benchmarks/kernel_costs.py
    PYTHONPATH=$PWD python benchmarks/kernel_costs.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from higher_func._execution import ONE_PASS_SQRT_MIN_ELEMENTS
from higher_func._rules._math import _RecordedSafeSqrt

#: name -> (foreach form, per-tensor form), each over lists ``x``, ``y`` of equal tensors.
OPS: dict[str, tuple[Callable[..., object], Callable[..., object]]] = {
    "x * 0.5": (lambda x, y: torch._foreach_mul(x, 0.5), lambda x, y: [a * 0.5 for a in x]),
    "x / 2.0": (lambda x, y: torch._foreach_div(x, 2.0), lambda x, y: [a / 2.0 for a in x]),
    "x + 0.5": (lambda x, y: torch._foreach_add(x, 0.5), lambda x, y: [a + 0.5 for a in x]),
    "x - y": (
        lambda x, y: torch._foreach_sub(x, y),
        lambda x, y: [a - b for a, b in zip(x, y, strict=True)],
    ),
    "x * y": (
        lambda x, y: torch._foreach_mul(x, y),
        lambda x, y: [a * b for a, b in zip(x, y, strict=True)],
    ),
    "add(x, y, alpha=0.1)": (
        lambda x, y: torch._foreach_add(x, y, alpha=0.1),
        lambda x, y: [torch.add(a, b, alpha=0.1) for a, b in zip(x, y, strict=True)],
    ),
    "addcmul(x, y, y)": (
        lambda x, y: torch._foreach_addcmul(x, y, y, value=0.1),
        lambda x, y: [torch.addcmul(a, b, b, value=0.1) for a, b in zip(x, y, strict=True)],
    ),
    "sqrt(x)": (lambda x, y: torch._foreach_sqrt(x), lambda x, y: [a.sqrt() for a in x]),
    "-x": (lambda x, y: torch._foreach_neg(x), lambda x, y: [-a for a in x]),
    "lerp(x, y, 0.1)": (
        lambda x, y: torch._foreach_lerp(x, y, 0.1),
        lambda x, y: [torch.lerp(a, b, 0.1) for a, b in zip(x, y, strict=True)],
    ),
}


def saved_lists(op: Callable[..., object], device: str) -> float:
    """Bytes ``op`` saves for its backward, in lists of the inputs' size."""
    x = [torch.randn(1000, device=device, requires_grad=True) for _ in range(3)]
    y = [torch.randn(1000, device=device, requires_grad=True) for _ in range(3)]
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(x, y)
    return total / sum(t.numel() * t.element_size() for t in x)


def where_form(x: Tensor) -> Tensor:
    zero = x == 0
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, x)))


def time_sqrt(elements: int, rounds: int, device: str) -> dict[str, float]:
    """Median seconds of forward + backward (``create_graph``) per form, interleaved."""
    start = torch.rand(elements, device=device)
    start[::5] = 0.0
    weights = torch.randn(elements, device=device)
    forms = {"where": where_form, "function": _RecordedSafeSqrt.apply}
    repeats = max(5, 2**21 // elements)
    times: dict[str, list[float]] = {k: [] for k in forms}
    for r in range(rounds + 1):  # round 0 warms up
        for key, form in forms.items():
            x = start.clone().requires_grad_()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(repeats):
                torch.autograd.grad(form(x), x, weights, create_graph=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                times[key].append((time.perf_counter() - begin) / repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="10,12,13,14,16,18,20", help="log2 of the elements")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--save",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "kernel_costs.txt",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    emit(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s)")
    emit(f"load average {load}")
    emit("saved for backward, in lists of the inputs' size:")
    emit(f"{'op':>22} {'foreach':>8} {'per tensor':>11}")
    for name, (foreach, per_tensor) in OPS.items():
        emit(
            f"{name:>22} {saved_lists(foreach, args.device):>8.0f} "
            f"{saved_lists(per_tensor, args.device):>11.0f}"
        )
    emit(f"recorded safe_sqrt, forward + backward (create_graph), median of {args.rounds}:")
    emit(f"{'elements':>10} {'where us':>9} {'function us':>12} {'speed-up':>9}")
    for log2 in (int(s) for s in args.sizes.split(",") if s):
        t = time_sqrt(2**log2, args.rounds, args.device)
        emit(
            f"{2**log2:>10} {t['where'] * 1e6:>9.1f} {t['function'] * 1e6:>12.1f} "
            f"{t['where'] / t['function']:>8.2f}x"
        )
    emit(f"ONE_PASS_SQRT_MIN_ELEMENTS = {ONE_PASS_SQRT_MIN_ELEMENTS}")
    emit(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    args.save.parent.mkdir(parents=True, exist_ok=True)
    args.save.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
