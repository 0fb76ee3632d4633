"""Meta-SGD: meta-learn a learning rate for every weight, beside MAML's one fixed learning rate.

Meta-SGD (Li et al., 2017) adapts with ``theta' = theta - alpha * grad`` where ``alpha`` has
the shape of ``theta`` and is meta-learned together with ``theta``. With higher_func that is
the SGD rule with a per-parameter learning rate: a dict keyed like the parameters, holding
tensors (here ``exp`` of learned logs, so they stay positive), passed as a step-time
override (``rule.step(..., lr=alphas)``).
Gradients of the meta-loss reach both the initial weights and every learning rate.

The script trains MAML and Meta-SGD on sinusoid regression with one inner step each and
reports the loss after adaptation on held-out tasks.

    python examples/meta_sgd.py [--iterations 250] [--plot meta_sgd.png]

With the drop-in API the same is ``innerloop_ctx(model, opt, override={"lr": [...]})`` with one
parameter group per tensor, since higher's ``override`` is given per parameter group.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from _common import HelpFormatter, progress, pyplot, sinusoid_mlp, sinusoid_tasks
from torch import Tensor, nn
from torch.func import functional_call, grad

import higher_func as hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=250, help="meta-iterations")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-batch")
    parser.add_argument("--shots", type=int, default=10, help="support/query points per task")
    parser.add_argument("--inner-steps", type=int, default=1, help="inner steps per task")
    parser.add_argument(
        "--inner-lr", type=float, default=0.01, help="MAML's (and Meta-SGD's initial) lr"
    )
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="outer Adam learning rate")
    parser.add_argument(
        "--lr-meta-lr", type=float, default=1e-2, help="outer Adam lr of the log learning rates"
    )
    parser.add_argument("--plot", default="meta_sgd.png", help="where to save the curves")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.tasks = 4, 2
    return args


def meta_loss(
    model: nn.Module,
    learning_rates: float | dict[str, Tensor],
    tasks: tuple,
    inner_steps: int,
) -> Tensor:
    """Mean query loss over ``tasks`` after ``inner_steps`` SGD steps at ``learning_rates``."""
    rule = hf.optim.sgd()

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    (xs, ys), (xq, yq), _ = tasks
    total = torch.zeros(())
    for t in range(len(xs)):
        params = dict(model.named_parameters())
        state = rule.init(params)
        for _ in range(inner_steps):
            params, state = rule.step(
                params, grad(loss)(params, xs[t], ys[t]), state, lr=learning_rates
            )
        total = total + loss(params, xq[t], yq[t])
    return total / len(xs)


def train(args: argparse.Namespace, meta_sgd: bool) -> tuple[nn.Module, Any, list[float]]:
    """Meta-train from a fixed initialisation; returns the model, its learning rates, the curve."""
    torch.manual_seed(0)
    model = sinusoid_mlp()
    groups = [{"params": list(model.parameters())}]
    log_lrs = {}
    if meta_sgd:  # learn log(lr): every learned rate stays positive, as SGD's lr must be
        log_lrs = {
            name: torch.full_like(p, math.log(args.inner_lr), requires_grad=True)
            for name, p in model.named_parameters()
        }
        groups.append({"params": list(log_lrs.values()), "lr": args.lr_meta_lr})
    meta_opt = torch.optim.Adam(groups, lr=args.meta_lr)
    generator = torch.Generator().manual_seed(1)  # both methods see the same tasks
    curve = []
    for _ in progress(range(args.iterations), desc="Meta-SGD" if meta_sgd else "MAML"):
        tasks = sinusoid_tasks(args.tasks, args.shots, generator)
        learning_rates = learning_rates_of(log_lrs) if meta_sgd else args.inner_lr
        loss = meta_loss(model, learning_rates, tasks, args.inner_steps)
        meta_opt.zero_grad()
        loss.backward()
        meta_opt.step()
        curve.append(loss.item())
    return model, learning_rates_of(log_lrs) if meta_sgd else args.inner_lr, curve


def learning_rates_of(log_lrs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The per-weight learning rates, differentiable functions of the learned ``log_lrs``."""
    return {name: log_lr.exp() for name, log_lr in log_lrs.items()}


def evaluate(model: nn.Module, learning_rates: Any, args: argparse.Namespace) -> float:
    """Query loss after adaptation on 100 held-out tasks.

    ``torch.func.grad`` still differentiates the inner steps under ``no_grad``; only the
    outer graph (not needed here) is skipped.
    """
    tasks = sinusoid_tasks(100, args.shots, torch.Generator().manual_seed(12345))
    with torch.no_grad():
        return meta_loss(model, learning_rates, tasks, args.inner_steps).item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    maml, maml_lr, maml_curve = train(args, meta_sgd=False)
    msgd, msgd_lr, msgd_curve = train(args, meta_sgd=True)
    print(f"held-out query loss after {args.inner_steps} inner step(s):")
    print(f"  MAML      (lr {args.inner_lr} everywhere)  {evaluate(maml, maml_lr, args):.4f}")
    print(f"  Meta-SGD  (learned lr per weight)     {evaluate(msgd, msgd_lr, args):.4f}")
    for name, alpha in msgd_lr.items():
        low, high = alpha.min().item(), alpha.max().item()
        print(
            f"  learned lr of {name:9s} mean {alpha.mean().item():.4f}  in [{low:.4f}, {high:.4f}]"
        )
    plot(maml_curve, msgd_curve, msgd_lr, args)


def plot(maml_curve: list[float], msgd_curve: list[float], learned: Any, args) -> None:
    """Both training curves, and the learned learning rates of every parameter tensor."""
    plt = pyplot()
    if plt is None:
        return
    window = max(1, args.iterations // 20)
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    for label, curve in (("MAML", maml_curve), ("Meta-SGD", msgd_curve)):
        smooth = torch.tensor(curve).unfold(0, window, 1).mean(1) if len(curve) >= window else curve
        ax.plot(list(smooth), label=label)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"query loss after adaptation (mean of {window})")
    ax.set_yscale("log")
    ax.set_title("meta-training")
    ax.legend()
    names = list(learned)
    for k, name in enumerate(names):  # every weight's learned rate, jittered sideways
        rates = learned[name].detach().flatten()
        offsets = torch.linspace(-0.3, 0.3, len(rates)) if len(rates) > 1 else torch.zeros(1)
        ax_lr.plot(k + offsets, rates, ".", markersize=2, alpha=0.5, color="tab:orange")
    maml_label = f"MAML's lr {args.inner_lr}"
    ax_lr.axhline(args.inner_lr, color="tab:blue", linestyle="--", label=maml_label)
    ax_lr.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax_lr.set_xlabel("parameter tensor")
    ax_lr.set_ylabel("learned learning rate (one dot per weight)")
    ax_lr.set_yscale("log")
    ax_lr.set_title("Meta-SGD's learned rates")
    ax_lr.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"saved {args.plot}")

if __name__ == "__main__":
    main()
