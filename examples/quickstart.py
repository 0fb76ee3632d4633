"""Quickstart: second-order MAML on sinusoid regression, a batch of tasks in one vmap.

Meta-learns the initial weights of a small regressor so that five inner SGD steps on ten
points of a new sinusoid fit it well. ``higher_func.func.batched_meta_loss`` runs the
inner loops of all tasks of a meta-batch at once (``vmap``) with the pure SGD rule
``higher_func.optim.sgd``, and ``.backward()`` differentiates through every inner step.

Prints the meta-loss (the query loss after adaptation, averaged over 100 meta-batches)
falling from about 3.4 to about 0.5. Measured (torch 2.13, one thread): 17 s of CPU time,
so about 17 s on an idle core; 54 s on a shared 2-core machine at a load average of 10.

    python examples/quickstart.py [--iterations 1000]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _common import HelpFormatter, progress, write
from torch import nn

import higher_func as hf


def sample_tasks(n_tasks: int, shots: int, generator: torch.Generator):
    """Sinusoids y = a sin(x + b): support and query sets for ``n_tasks`` tasks."""
    amplitude = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(n_tasks, 2 * shots, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x + phase)
    return (x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--iterations", type=int, default=1000, help="meta-iterations")
    parser.add_argument("--tasks", type=int, default=25, help="tasks per meta-batch")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations = 20
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tensors this small run fastest on one thread
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner = hf.optim.sgd(lr=0.01)
    f = hf.func.FunctionalModel(model)  # f(params, buffers, x): the model as a function

    def loss(params, x, y):
        return nn.functional.mse_loss(f(params, None, x), y)

    every = max(1, args.iterations // 10)
    window, start = [], time.perf_counter()
    for iteration in progress(range(1, args.iterations + 1), desc="meta-iterations"):
        support, query = sample_tasks(args.tasks, 10, generator)
        params = dict(model.named_parameters())
        meta_loss = hf.func.batched_meta_loss(
            loss, inner, params, support, query, steps=args.inner_steps
        )
        meta_opt.zero_grad()
        meta_loss.backward()  # through all inner steps of every task
        meta_opt.step()
        window.append(meta_loss.item())
        if iteration % every == 0:  # the mean over the last meta-batches: less noisy
            mean = sum(window) / len(window)
            write(f"iterations {iteration - every + 1:4d}-{iteration:<4d}  meta-loss {mean:.3f}")
            window.clear()
    write(f"{args.iterations} meta-iterations in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
