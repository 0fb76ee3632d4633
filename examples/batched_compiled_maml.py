"""The fast path: the same MAML meta-gradient by a per-task loop, by vmap, and compiled.

Sinusoid MAML (MLP 1-40-40-1, 5 inner SGD steps, second order) computed three ways from the
same model and the same inner ``torch.optim.SGD``:

1. ``loop``: the ``innerloop_ctx`` loop over tasks that higher's users write;
2. ``vmap``: :class:`higher_func.func.MetaObjective`, which runs every task at once with
   ``torch.func.vmap`` and ``torch.func.grad`` (no ``create_graph=True`` anywhere);
3. ``compiled`` (with ``--compile``): ``higher_func.func.compiled(objective.value_and_grad)``,
   i.e. ``torch.compile(..., fullgraph=True)``: the whole meta-gradient as one compiled graph
   (compiled once, reused every iteration).

The script checks that the three meta-gradients agree, prints seconds per meta-iteration for
each path (and the one-off compile time), then meta-trains with the fastest path.

    python examples/batched_compiled_maml.py [--tasks 25] [--compile]

Compiling costs time once: about 100 s on 2 CPU cores (measured with torch 2.11), so it is
opt-in with ``--compile``; then one meta-iteration took 0.0019 s against 0.018 s for vmap
and 0.12 s for the loop. On small models vmap and compile win by 10x and more; on conv nets
on a CPU the loop can be faster than vmap (see the vmap and torch.compile guide).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from _common import HelpFormatter, progress, sinusoid_mlp, sinusoid_tasks
from torch import Tensor, nn

import higher_func as higher
from higher_func.func import MetaObjective, compiled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=25, help="tasks per meta-batch")
    parser.add_argument("--shots", type=int, default=10, help="support/query points per task")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps")
    parser.add_argument("--inner-lr", type=float, default=0.01, help="inner SGD learning rate")
    parser.add_argument("--hidden", type=int, default=40, help="hidden units of the MLP")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-iterations per path")
    parser.add_argument("--iterations", type=int, default=200, help="meta-training iterations")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile (compiling takes minutes)"
    )
    parser.add_argument("--tiny", action="store_true", help="a short run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.tasks, args.inner_steps, args.hidden, args.repeats, args.iterations = 3, 1, 8, 1, 3
    return args


MetaGradient = Callable[[tuple, tuple], tuple[Tensor, dict[str, Tensor]]]


def loop_path(model: nn.Module, inner_opt: torch.optim.Optimizer, steps: int) -> MetaGradient:
    """The per-task ``innerloop_ctx`` loop: ``(support, query) -> (meta-loss, meta-gradient)``."""

    def meta_gradient(support: tuple, query: tuple) -> tuple[Tensor, dict[str, Tensor]]:
        model.zero_grad()
        tasks, total = len(support[0]), torch.zeros(())
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                fmodel,
                diffopt,
            ):
                for _ in range(steps):
                    diffopt.step(nn.functional.mse_loss(fmodel(support[0][t]), support[1][t]))
                loss = nn.functional.mse_loss(fmodel(query[0][t]), query[1][t]) / tasks
                loss.backward()
            total = total + loss.detach()
        return total, {n: p.grad.clone() for n, p in model.named_parameters()}

    return meta_gradient


def seconds_per_call(fn: MetaGradient, batches: list[tuple], repeats: int) -> float:
    """Mean wall time of ``fn`` over ``repeats`` calls, after one untimed warm-up call."""
    fn(*batches[0])
    start = time.perf_counter()
    for i in range(repeats):
        fn(*batches[1 + i % (len(batches) - 1)])
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = sinusoid_mlp(args.hidden)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    objective = MetaObjective(model, inner_opt, nn.functional.mse_loss, steps=args.inner_steps)
    generator = torch.Generator().manual_seed(1)
    batches = [sinusoid_tasks(args.tasks, args.shots, generator)[:2] for _ in range(4)]

    paths: dict[str, MetaGradient] = {
        "loop": loop_path(model, inner_opt, args.inner_steps),
        "vmap": objective.value_and_grad,
    }
    if args.compile:
        meta_gradient = compiled(objective.value_and_grad)  # torch.compile, fullgraph=True
        start = time.perf_counter()
        meta_gradient(*batches[0])
        print(f"torch.compile: first call (compilation) took {time.perf_counter() - start:.1f} s")
        paths["compiled"] = meta_gradient

    _, reference = paths["loop"](*batches[0])
    for name, fn in paths.items():
        loss, grads = fn(*batches[0])
        difference = max((grads[n] - reference[n]).abs().max().item() for n in reference)
        print(f"{name:8s} meta-loss {loss.item():.6f}  max |meta-grad - loop's| {difference:.1e}")

    timings = {name: seconds_per_call(fn, batches, args.repeats) for name, fn in paths.items()}
    for name, seconds in timings.items():
        speedup = timings["loop"] / seconds
        print(f"{name:8s} {seconds:.4f} seconds per meta-iteration  ({speedup:.1f}x the loop)")

    fastest = min(timings, key=timings.__getitem__)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in progress(range(args.iterations), desc=f"meta-training ({fastest})"):
        loss, grads = paths[fastest](*sinusoid_tasks(args.tasks, args.shots, generator)[:2])
        for name, p in model.named_parameters():
            p.grad = grads[name]
        meta_opt.step()
        losses.append(loss.item())
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    print(
        f"meta-trained {args.iterations} iterations with {fastest}: meta-loss "
        f"{sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f}"
    )


if __name__ == "__main__":
    main()
