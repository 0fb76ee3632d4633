"""Hyperparameter optimisation: learn Adam's learning rate and weight decay by hypergradient.

A polynomial regressor is trained from scratch with ``--inner-steps`` Adam steps on a few
noisy points (it overfits without weight decay). The validation loss after training is a
differentiable function of the learning rate and the weight decay, because every Adam step
is: ``higher_func.optim.adam`` is a pure rule, so a step takes the hyperparameters as tensors
(``rule.step(params, grads, state, lr=lr, weight_decay=wd)``) and gradients flow back to them
through the whole training run. An outer Adam then descends on ``log(lr)`` and ``log(wd)``.

    python examples/hyperparameter_optimization.py [--inner-steps 30] [--plot hpo.png]

With the drop-in API the same hypergradient comes from
``innerloop_ctx(model, opt, override={"lr": [lr], "weight_decay": [wd]})``.
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import HelpFormatter, progress, pyplot
from torch import Tensor
from torch.func import grad

import higher_func as hf

DEGREE = 9  # features 1, x, ..., x^9: enough to overfit 12 noisy points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=150, help="hypergradient steps")
    parser.add_argument("--inner-steps", type=int, default=30, help="Adam steps per training run")
    parser.add_argument("--lr", type=float, default=0.01, help="initial Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="initial weight decay")
    parser.add_argument("--hyper-lr", type=float, default=0.05, help="outer Adam learning rate")
    parser.add_argument("--train-points", type=int, default=12, help="noisy training points")
    parser.add_argument("--plot", default="hyperparameter_optimization.png", help="output file")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations = 3
    return args


def features(x: Tensor) -> Tensor:
    """Polynomial features ``[1, x, ..., x^DEGREE]`` of a column of inputs."""
    return x ** torch.arange(DEGREE + 1, dtype=x.dtype)


def make_data(train_points: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Noisy training points and clean validation points of ``y = sin(3x)`` on ``[-1, 1]``."""
    generator = torch.Generator().manual_seed(0)
    x_train = torch.rand(train_points, 1, generator=generator, dtype=torch.float64) * 2 - 1
    noise = 0.3 * torch.randn(train_points, 1, generator=generator, dtype=torch.float64)
    x_valid = torch.linspace(-1, 1, 200, dtype=torch.float64).unsqueeze(1)
    return (x_train, torch.sin(3 * x_train) + noise), (x_valid, torch.sin(3 * x_valid))


def mse(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return ((features(x) @ params["w"] - y) ** 2).mean()


def train(lr: Tensor, weight_decay: Tensor, steps: int, train_set: tuple) -> dict[str, Tensor]:
    """``steps`` Adam steps from zero weights: the trained weights, differentiable in the hps."""
    rule = hf.optim.adam()
    params = {"w": torch.zeros(DEGREE + 1, 1, dtype=torch.float64)}
    state = rule.init(params)
    for _ in range(steps):
        grads = grad(mse)(params, *train_set)
        params, state = rule.step(params, grads, state, lr=lr, weight_decay=weight_decay)
    return params


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train_set, valid_set = make_data(args.train_points)
    log_lr = torch.tensor(math.log(args.lr), dtype=torch.float64, requires_grad=True)
    log_wd = torch.tensor(math.log(args.weight_decay), dtype=torch.float64, requires_grad=True)
    hyper_opt = torch.optim.Adam([log_lr, log_wd], lr=args.hyper_lr)
    history: dict[str, list[float]] = {"valid": [], "train": [], "lr": [], "wd": []}
    for _ in progress(range(args.iterations), desc="hypergradient steps"):
        params = train(log_lr.exp(), log_wd.exp(), args.inner_steps, train_set)
        valid = mse(params, *valid_set)
        history["valid"].append(valid.item())
        history["train"].append(mse(params, *train_set).item())
        history["lr"].append(log_lr.exp().item())
        history["wd"].append(log_wd.exp().item())
        hyper_opt.zero_grad()
        valid.backward()  # through all inner Adam steps, into log_lr and log_wd
        hyper_opt.step()
    for i in sorted({0, len(history["valid"]) - 1}):
        print(
            f"iteration {i:4d}  lr {history['lr'][i]:.4f}  weight decay {history['wd'][i]:.2e}  "
            f"train loss {history['train'][i]:.4f}  validation loss {history['valid'][i]:.4f}"
        )
    plot(history, args.plot)


def plot(history: dict[str, list[float]], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (losses, hps) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(history["train"], label="training loss")
    losses.plot(history["valid"], label="validation loss (the objective)")
    losses.set_xlabel("hypergradient step")
    losses.set_ylabel("mean squared error after training")
    losses.set_yscale("log")
    losses.set_title("the objective falls")
    losses.legend()
    hps.plot(history["lr"], label="Adam lr")
    hps.plot(history["wd"], label="weight decay")
    hps.set_xlabel("hypergradient step")
    hps.set_ylabel("hyperparameter value")
    hps.set_yscale("log")
    hps.set_title("the learned hyperparameters")
    hps.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
