"""Hyperparameter optimisation with one weight decay per weight, by implicit hypergradients.

As in Lorraine et al. (2020), "Optimizing Millions of Hyperparameters by Implicit
Differentiation": a linear model with ``--features`` weights, more than its ``--train-points``
noisy training points, of which only ``--informative`` matter, is trained with a separate weight
decay ``lam_i`` on every weight (``--features`` hyperparameters). The training solution
``w*(lam)`` is differentiated by the implicit function theorem: its optimality condition is the
training gradient ``X^T (X w - y) / n + lam * w = 0``, and the inverse Hessian is approximated
by ``--neumann-steps`` terms of the Neumann series with the inner step size (``solve_neumann``).
The training itself is ``--inner-steps`` gradient steps warm-started from the previous outer
iteration's weights, and is never differentiated. An outer Adam descends the validation loss
on ``log(lam)``.

    python examples/implicit_hyperparameters.py [--iterations 200] [--neumann-steps 40]

The run prints the validation loss before and after, the learned decays of the informative and
the irrelevant weights (small and large if it worked), the loss on a separate test set beside
that of the best single weight decay of a grid (closed-form ridge regression), and how close
the Neumann hypergradient is to the exact one (``solve_lu``) at the end; the plot shows the
validation loss and every learned decay.
"""

from __future__ import annotations

import argparse
import functools

import torch
from _common import HelpFormatter, progress, pyplot
from torch import Tensor

from higher_func.implicit import custom_root, solve_lu, solve_neumann


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=200, help="hypergradient steps")
    parser.add_argument("--features", type=int, default=80, help="weights = hyperparameters")
    parser.add_argument("--informative", type=int, default=8, help="weights that matter")
    parser.add_argument("--train-points", type=int, default=50, help="noisy training points")
    parser.add_argument("--inner-steps", type=int, default=50, help="training steps per iteration")
    parser.add_argument("--neumann-steps", type=int, default=40, help="Neumann series terms")
    parser.add_argument("--init-decay", type=float, default=0.1, help="initial weight decays")
    parser.add_argument("--hyper-lr", type=float, default=0.1, help="outer Adam learning rate")
    parser.add_argument("--plot", default="implicit_hyperparameters.png", help="output file")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations = 3
    return args


def make_data(args: argparse.Namespace) -> tuple[tuple[Tensor, Tensor], ...]:
    """Training, validation and test sets of ``y = X w_true + noise``, ``w_true`` sparse."""
    g = torch.Generator().manual_seed(0)
    w_true = torch.zeros(args.features, dtype=torch.float64)
    w_true[: args.informative] = 2 * torch.rand(args.informative, generator=g, dtype=torch.float64)
    w_true[: args.informative] += 0.5

    def sample(n: int) -> tuple[Tensor, Tensor]:
        X = torch.randn(n, args.features, generator=g, dtype=torch.float64)
        return X, X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)

    return sample(args.train_points), sample(200), sample(1000)


def training_gradient(w: Tensor, log_decay: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """The gradient of ``|X w - y|^2 / 2n + sum_i lam_i w_i^2 / 2``: zero when trained."""
    return X.T @ (X @ w - y) / len(y) + log_decay.exp() * w


def step_size(log_decay: Tensor, X: Tensor) -> float:
    """``1 / L`` for the training objective (``L`` its largest curvature): stable descent."""
    curvature = torch.linalg.eigvalsh(X.T @ X / len(X)).max() + log_decay.exp().max()
    return 1.0 / curvature.item()


def make_trainer(args: argparse.Namespace, solve) -> object:
    @custom_root(training_gradient, solve=solve)
    def train(w: Tensor, log_decay: Tensor, X: Tensor, y: Tensor) -> Tensor:
        lr = step_size(log_decay, X)
        for _ in range(args.inner_steps):
            w = w - lr * training_gradient(w, log_decay, X, y)
        return w

    return train


def validation_loss(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return ((X @ w - y) ** 2).mean()


def hypergradient(train, w0: Tensor, log_decay: Tensor, train_set, valid_set) -> Tensor:
    def objective(log_decay: Tensor) -> Tensor:
        return validation_loss(train(w0, log_decay, *train_set), *valid_set)

    return torch.func.grad(objective)(log_decay)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train_set, valid_set, test_set = make_data(args)
    log_decay = torch.full((args.features,), args.init_decay, dtype=torch.float64).log()
    log_decay.requires_grad_()
    hyper_opt = torch.optim.Adam([log_decay], lr=args.hyper_lr)
    w = torch.zeros(args.features, dtype=torch.float64)
    history: list[float] = []
    for _ in progress(range(args.iterations), desc="hypergradient steps"):
        # Neumann with the inner step size, as Lorraine et al.; built each time: lr moves.
        neumann = functools.partial(
            solve_neumann,
            steps=args.neumann_steps,
            alpha=step_size(log_decay.detach(), train_set[0]),
        )
        w = make_trainer(args, neumann)(w.detach(), log_decay, *train_set)  # warm start
        loss = validation_loss(w, *valid_set)
        history.append(loss.item())
        hyper_opt.zero_grad()
        loss.backward()
        hyper_opt.step()

    decay = log_decay.detach().exp()
    informative, irrelevant = decay[: args.informative], decay[args.informative :]
    print(f"validation loss {history[0]:.4f} -> {history[-1]:.4f}")
    print(
        f"learned weight decay: informative weights median {informative.median():.3g}, "
        f"irrelevant weights median {irrelevant.median():.3g}"
    )
    X, y = train_set
    ridge = [  # the baseline: one weight decay for all weights, the best of a grid
        torch.linalg.solve(X.T @ X / len(y) + c * torch.eye(len(w)), X.T @ y / len(y))
        for c in torch.logspace(-4, 2, 25, dtype=torch.float64)
    ]
    best = min(ridge, key=lambda w: validation_loss(w, *valid_set).item())
    print(
        f"test loss {validation_loss(w.detach(), *test_set):.4f}; the best single weight decay "
        f"of a grid of 25: validation {validation_loss(best, *valid_set):.4f}, "
        f"test {validation_loss(best, *test_set):.4f}"
    )
    w0, lam = w.detach(), log_decay.detach()
    alpha = step_size(lam, train_set[0])
    neumann = functools.partial(solve_neumann, steps=args.neumann_steps, alpha=alpha)
    approximate = hypergradient(make_trainer(args, neumann), w0, lam, train_set, valid_set)
    exact = hypergradient(make_trainer(args, solve_lu), w0, lam, train_set, valid_set)
    cosine = torch.nn.functional.cosine_similarity(approximate, exact, dim=0)
    print(
        f"Neumann hypergradient ({args.neumann_steps} terms) against the exact one (solve_lu): "
        f"cosine {cosine:.4f}, norm ratio {approximate.norm() / exact.norm():.3f}"
    )
    plot(history, decay, args)


def plot(history: list[float], decay: Tensor, args: argparse.Namespace) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (losses, decays) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(history)
    losses.set_xlabel("hypergradient step")
    losses.set_ylabel("validation MSE")
    losses.set_yscale("log")
    index = torch.arange(args.features)
    decays.semilogy(index[: args.informative], decay[: args.informative], "o", label="informative")
    decays.semilogy(index[args.informative :], decay[args.informative :], ".", label="irrelevant")
    decays.set_xlabel("weight")
    decays.set_ylabel("learned weight decay")
    decays.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
