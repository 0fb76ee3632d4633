"""Optimising inputs, not a model: a deep energy model that predicts by gradient descent.

A small network scores pairs ``E(x, y)``; its prediction for ``x`` is where ``y`` lands after
``--inner-steps`` steps of an optimizer on ``E(x, y)`` from ``y = 0``. Training the energy so
that those landing points match the targets means differentiating through the optimizer's
steps over the *input tensor* ``y``: there is no functional model, only tensors. That is
higher's ``get_diff_optim(opt, [y])`` use, unchanged with ``import higher_func as higher``::

    y = torch.zeros(batch, 2, requires_grad=True)
    diffopt = higher.get_diff_optim(torch.optim.SGD([y], lr=0.1), [y])
    for _ in range(steps):
        (y,) = diffopt.step(energy(x, y).sum(), params=[y])
    loss = mse(y, target)        # back-propagates through every step into the energy network

The targets here are points on a curve, ``y* = (sin 2x, cos 2x)``.

    python examples/optimize_inputs.py [--inner-optimizer adam] [--plot optimize_inputs.png]
"""

from __future__ import annotations

import argparse

import torch
from _common import HelpFormatter, progress, pyplot, write
from torch import Tensor, nn

import higher_func as higher

INNER_OPTIMIZERS = {
    "sgd": lambda y, lr: torch.optim.SGD([y], lr=lr),
    "momentum": lambda y, lr: torch.optim.SGD([y], lr=lr, momentum=0.5),
    "adam": lambda y, lr: torch.optim.Adam([y], lr=lr),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=400, help="training iterations")
    parser.add_argument("--batch", type=int, default=64, help="inputs per iteration")
    parser.add_argument("--inner-steps", type=int, default=10, help="optimizer steps over y")
    parser.add_argument(
        "--inner-optimizer", choices=sorted(INNER_OPTIMIZERS), default="sgd", help="over y"
    )
    parser.add_argument("--inner-lr", type=float, default=0.1, help="its learning rate")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam lr of the energy network")
    parser.add_argument("--plot", default="optimize_inputs.png", help="where to save the plot")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.batch = 3, 8
    return args


class Energy(nn.Module):
    """``E(x, y)``: a scalar per example; a quadratic term keeps every ``y`` bounded."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
            nn.Linear(hidden, 1),
        )  # fmt: skip

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([x, y], dim=1)).squeeze(1) + 0.5 * (y * y).sum(1)


def predict(energy: Energy, x: Tensor, args: argparse.Namespace, create_graph: bool) -> Tensor:
    """Minimise ``E(x, .)`` from ``y = 0`` with a differentiable optimizer; the final ``y``."""
    y = torch.zeros(len(x), 2, requires_grad=True)
    opt = INNER_OPTIMIZERS[args.inner_optimizer](y, args.inner_lr)
    diffopt = higher.get_diff_optim(opt, [y], track_higher_grads=create_graph)
    for _ in range(args.inner_steps):
        (y,) = diffopt.step(energy(x, y).sum(), params=[y])
    return y


def target(x: Tensor) -> Tensor:
    return torch.cat([torch.sin(2 * x), torch.cos(2 * x)], dim=1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    energy = Energy()
    opt = torch.optim.Adam(energy.parameters(), lr=args.lr)
    curve = []
    for iteration in progress(range(args.iterations), desc="iterations"):
        x = torch.rand(args.batch, 1) * 4 - 2
        loss = nn.functional.mse_loss(predict(energy, x, args, create_graph=True), target(x))
        opt.zero_grad()
        loss.backward()  # through all inner steps over y, into the energy's weights
        opt.step()
        curve.append(loss.item())
        if iteration % max(1, args.iterations // 5) == 0 or iteration == args.iterations - 1:
            write(f"iteration {iteration:4d}  loss of the landing points {loss.item():.4f}")
    x = torch.linspace(-2, 2, 100).unsqueeze(1)
    prediction = predict(energy, x, args, create_graph=False).detach()
    error = nn.functional.mse_loss(prediction, target(x)).item()
    print(f"test MSE on a grid of 100 inputs: {error:.4f}")
    plt = pyplot()
    if plt is not None:
        fig, (ax_curve, ax_fit) = plt.subplots(1, 2, figsize=(10, 4))
        ax_curve.plot(curve)
        ax_curve.set_yscale("log")
        ax_curve.set_xlabel("iteration")
        ax_curve.set_ylabel("MSE of the optimised y")
        ax_curve.set_title("training through the inner steps over y")
        for k, (name, style) in enumerate((("sin 2x", "-"), ("cos 2x", ":"))):
            ax_fit.plot(x, target(x)[:, k], "k" + style, linewidth=1, label=f"true {name}")
            ax_fit.plot(x, prediction[:, k], "--", label=f"argmin of E, {name}")
        ax_fit.set_xlabel("x")
        ax_fit.set_ylabel("y (each of its two coordinates)")
        ax_fit.set_title(f"predictions: {args.inner_steps} {args.inner_optimizer} steps on E(x, y)")
        ax_fit.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
