"""Learn a per-step learning-rate schedule through 500 inner Adam steps, at bounded memory.

A small tanh network is trained from a fixed start with ``--inner-steps`` Adam steps on
noisy points of ``y = sin(3x)``; step k uses its own learning rate ``lr_k = exp(s_k)``,
starting from a constant 1e-3 (too small: the network underfits).  The validation loss
after training is a differentiable function of the whole schedule, and an outer Adam
descends on ``s`` with exact hypergradients through every inner step.

Backpropagating through 500 steps keeps 500 steps' graphs (``recompute=False``);
``recompute=True`` keeps only each step's parameters and Adam moments and rebuilds one step
at a time in the backward pass: the same hypergradient, memory that grows by the iterates
only.  The example checks that both give the same hypergradient, then plots the learned
schedule and the peak memory of one hypergradient against the number of steps for both.

    python examples/lr_schedule.py [--inner-steps 500] [--iterations 12] [--plot lr_schedule.png]

Memory is the growth of the process's peak resident set during one hypergradient (Linux:
``/proc/self/clear_refs`` resets the peak), with glibc's mmap threshold fixed at 128 KiB as
``MALLOC_MMAP_THRESHOLD_=131072`` would (else freed graphs pin the heap and the peak
overstates live memory).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import time
from typing import Any

import torch
from _common import HelpFormatter, progress, pyplot
from torch import Tensor

import higher_func as hf

DTYPE = torch.float64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--inner-steps", type=int, default=500, help="Adam steps per training")
    parser.add_argument("--iterations", type=int, default=12, help="hypergradient steps")
    parser.add_argument("--lr", type=float, default=0.001, help="initial (constant) schedule")
    parser.add_argument("--hyper-lr", type=float, default=0.1, help="outer Adam learning rate")
    parser.add_argument("--width", type=int, default=32, help="hidden units")
    parser.add_argument("--train-points", type=int, default=64, help="noisy training points")
    parser.add_argument(
        "--memory-steps", default="100,250,500", help="step counts of the memory plot"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small tensors)")
    parser.add_argument("--plot", default="lr_schedule.png", help="output file")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.inner_steps, args.iterations, args.memory_steps = 20, 2, "10,20"
    return args


def make_data(points: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x_train = torch.rand(points, 1, generator=generator, dtype=DTYPE) * 2 - 1
    noise = 0.2 * torch.randn(points, 1, generator=generator, dtype=DTYPE)
    x_valid = torch.linspace(-1, 1, 200, dtype=DTYPE).unsqueeze(1)
    return (x_train, torch.sin(3 * x_train) + noise), (x_valid, torch.sin(3 * x_valid))


def initial_params(width: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)

    def uniform(*shape: int, fan_in: int) -> Tensor:
        bound = 1 / math.sqrt(fan_in)
        return (torch.rand(*shape, generator=generator, dtype=DTYPE) * 2 - 1) * bound

    return {
        "w1": uniform(1, width, fan_in=1),
        "b1": uniform(width, fan_in=1),
        "w2": uniform(width, 1, fan_in=width),
        "b2": uniform(1, fan_in=width),
    }


def mse(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return ((hidden @ params["w2"] + params["b2"] - y) ** 2).mean()


def validation_loss(
    log_lrs: Tensor, start: dict[str, Tensor], data: tuple, recompute: bool
) -> Tensor:
    """The validation loss after ``len(log_lrs)`` Adam steps, step k at ``exp(log_lrs[k])``."""
    train_set, valid_set = data
    lrs = log_lrs.exp()
    return hf.func.meta_loss(
        mse,
        hf.optim.adam(),
        start,
        train_set,
        valid_set,
        steps=len(log_lrs),
        hyperparameters=lambda k: {"lr": lrs[k]},
        recompute=recompute,
    )


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hypergradient(log_lrs: Tensor, start: dict, data: tuple, recompute: bool) -> Tensor:
    leaf = log_lrs.detach().requires_grad_()
    (value,) = torch.autograd.grad(validation_loss(leaf, start, data, recompute), leaf)
    return value


def peak_growth(fn: Any) -> int | None:
    """Bytes by which the peak resident set grows while ``fn()`` runs (Linux), else None."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current resident set
        before = _status("VmRSS")
        fn()
        return _status("VmHWM") - before
    except OSError:
        return None


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def fix_mmap_threshold() -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``: big blocks go back to the system."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # -3 is M_MMAP_THRESHOLD


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    fix_mmap_threshold()
    data = make_data(args.train_points)
    start = initial_params(args.width)
    log_lrs = torch.full((args.inner_steps,), math.log(args.lr), dtype=DTYPE)

    # The two modes agree before we rely on one of them.  Long unrolls amplify rounding, so
    # the plain unroll differentiated two ways (.backward(), torch.func.grad) is the yardstick.
    plain, recomputed = (hypergradient(log_lrs, start, data, r) for r in (False, True))
    by_func = torch.func.grad(lambda s: validation_loss(s, start, data, False))(log_lrs)
    print(
        f"hypergradient of {args.inner_steps} steps, max. rel. difference: recompute vs plain "
        f"{_relative(recomputed, plain):.1e}; plain by torch.func.grad vs plain by .backward() "
        f"{_relative(by_func, plain):.1e}"
    )

    schedule = log_lrs.clone().requires_grad_()
    outer = torch.optim.Adam([schedule], lr=args.hyper_lr)
    losses = []
    began = time.perf_counter()
    for _ in progress(range(args.iterations), desc="hypergradient steps"):
        loss = validation_loss(schedule, start, data, recompute=True)
        outer.zero_grad()
        loss.backward()
        outer.step()
        losses.append(loss.item())
    seconds = (time.perf_counter() - began) / max(args.iterations, 1)
    print(f"{seconds:.2f} s per hypergradient step ({args.inner_steps} inner steps, recompute)")
    final = validation_loss(schedule.detach(), start, data, recompute=False).item()
    print(f"validation loss: constant lr {losses[0]:.4f}, learned schedule {final:.4f}")

    memory: dict[str, list[tuple[int, int]]] = {"plain": [], "recompute": []}
    for steps in (int(s) for s in args.memory_steps.split(",")):
        for mode, points in memory.items():
            recompute = mode == "recompute"
            grown = peak_growth(lambda: hypergradient(log_lrs[:steps], start, data, recompute))  # noqa: B023
            if grown is not None:
                points.append((steps, grown))
    for mode, points in memory.items():
        listing = ", ".join(f"{k} steps {b / 2**20:.1f} MB" for k, b in points)
        print(f"peak memory of one hypergradient, {mode}: {listing or 'not measurable here'}")
    plot(schedule.detach().exp(), losses, memory, args.plot)


def plot(lrs: Tensor, losses: list[float], memory: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    left.plot(lrs.numpy())
    left.set_xlabel("inner step k")
    left.set_ylabel("learned learning rate")
    left.set_yscale("log")
    middle.plot(losses)
    middle.set_xlabel("hypergradient step")
    middle.set_ylabel("validation loss")
    for mode, points in memory.items():
        if points:
            steps, grown = zip(*points, strict=True)
            right.plot(steps, [b / 2**20 for b in grown], marker="o", label=mode)
    right.set_xlabel("inner steps")
    right.set_ylabel("peak memory of one hypergradient (MB)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
