"""MAML on sinusoid regression with the drop-in API, saving a plot of the fits before and after.

Written as a ``higher`` user writes it (``import higher_func as higher``): the meta-model is a
plain ``nn.Module`` trained by a plain ``torch.optim.Adam``; ``higher.innerloop_ctx`` gives a
functional copy of the model and a differentiable twin of the inner SGD optimizer, and the
query loss after the inner steps back-propagates through them into the model's parameters
(``copy_initial_weights=False``, the MAML setting).

    python examples/maml_sinusoid.py [--iterations 250] [--plot maml_sinusoid.png]

The plot shows a held-out sinusoid, its few support points, the meta-learned model before
adaptation, and after 1 and ``--inner-steps`` steps of SGD on the support points.
"""

from __future__ import annotations

import argparse

import torch
from _common import HelpFormatter, progress, pyplot, sinusoid_mlp, sinusoid_tasks, write
from torch import Tensor, nn

import higher_func as higher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=250, help="meta-iterations")
    parser.add_argument("--tasks", type=int, default=6, help="tasks per meta-batch")
    parser.add_argument("--shots", type=int, default=10, help="support/query points per task")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps per task")
    parser.add_argument("--inner-lr", type=float, default=0.01, help="inner SGD learning rate")
    parser.add_argument("--meta-lr", type=float, default=3e-3, help="outer Adam learning rate")
    parser.add_argument(
        "--first-order",
        action="store_true",
        help="first-order MAML: no graph through the inner steps (faster, less memory)",
    )
    parser.add_argument("--plot", default="maml_sinusoid.png", help="where to save the plot")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.tasks = 3, 2
    return args


def meta_step(
    model: nn.Module,
    meta_opt: torch.optim.Optimizer,
    inner_opt: torch.optim.Optimizer,
    tasks: tuple,
    args: argparse.Namespace,
) -> float:
    """One meta-update over a batch of tasks; returns the mean query loss after adaptation."""
    (xs, ys), (xq, yq), _ = tasks
    meta_opt.zero_grad()
    total = 0.0
    for t in range(len(xs)):
        with higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, first_order=args.first_order
        ) as (fmodel, diffopt):
            for _ in range(args.inner_steps):
                diffopt.step(nn.functional.mse_loss(fmodel(xs[t]), ys[t]))
            query_loss = nn.functional.mse_loss(fmodel(xq[t]), yq[t]) / len(xs)
            query_loss.backward()  # accumulates this task's meta-gradient in model's .grad
        total += query_loss.item()
    meta_opt.step()
    return total


def adapted_predictions(
    model: nn.Module, inner_opt: torch.optim.Optimizer, support: tuple, x: Tensor, steps: int
) -> list[Tensor]:
    """Predictions at ``x`` after 0, 1 and ``steps`` inner steps on ``support`` (no meta-graph)."""
    predictions = []
    with higher.innerloop_ctx(model, inner_opt, track_higher_grads=False) as (fmodel, diffopt):
        for step in range(steps + 1):
            if step in (0, 1, steps):
                predictions.append(fmodel(x).detach())
            if step < steps:
                diffopt.step(nn.functional.mse_loss(fmodel(support[0]), support[1]))
    return predictions


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = sinusoid_mlp()
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    generator = torch.Generator().manual_seed(1)
    for iteration in progress(range(args.iterations), desc="meta-iterations"):
        loss = meta_step(
            model, meta_opt, inner_opt, sinusoid_tasks(args.tasks, args.shots, generator), args
        )
        if iteration % max(1, args.iterations // 6) == 0 or iteration == args.iterations - 1:
            write(f"iteration {iteration:4d}  query loss after adaptation {loss:.4f}")

    (xs, ys), _, (amplitude, phase) = sinusoid_tasks(
        1, args.shots, torch.Generator().manual_seed(7)
    )
    x = torch.linspace(-5, 5, 200).unsqueeze(1)
    truth = amplitude[0] * torch.sin(x + phase[0])
    before, one, after = adapted_predictions(model, inner_opt, (xs[0], ys[0]), x, args.inner_steps)
    for label, prediction in (("before", before), ("after 1 step", one), ("after", after)):
        print(f"held-out task, {label:12s}: MSE {nn.functional.mse_loss(prediction, truth):.4f}")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, truth, "k-", label="true function")
        ax.plot(xs[0], ys[0], "k^", label=f"{args.shots} support points")
        ax.plot(x, before, "--", label="meta-learned init (before adaptation)")
        ax.plot(x, one, ":", label="after 1 inner step")
        ax.plot(x, after, "-", label=f"after {args.inner_steps} inner steps")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(f"MAML, a held-out sinusoid: {args.shots}-shot adaptation")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
