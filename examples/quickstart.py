"""Quickstart: second-order MAML on sinusoid regression, with higher_func's pure rules.

Runs in about half a minute on a CPU and prints the meta-loss (the query loss after five
inner steps of SGD, averaged over 20 meta-batches) falling as the initial weights are
meta-learned.

    python examples/quickstart.py [--iterations 100]
"""

import argparse
import math

import torch
from torch import nn
from torch.func import functional_call, grad

import higher_func as hf


def sample_tasks(n_tasks: int, shots: int, generator: torch.Generator):
    """Sinusoids y = a sin(x + b): support and query sets for ``n_tasks`` tasks."""
    amplitude = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(n_tasks, 2 * shots, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x + phase)
    return (x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100, help="meta-iterations")
    parser.add_argument("--tasks", type=int, default=10, help="tasks per meta-batch")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner = hf.optim.sgd(lr=0.01)

    def loss(params, x, y):
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    def adapted_query_loss(params, support, query):
        state = inner.init(params)
        for _ in range(args.inner_steps):
            params, state = inner.step(params, grad(loss)(params, *support), state)
        return loss(params, *query)

    window = []
    for iteration in range(1, args.iterations + 1):
        (xs, ys), (xq, yq) = sample_tasks(args.tasks, 10, generator)
        params = dict(model.named_parameters())
        meta_loss = (
            sum(
                adapted_query_loss(params, (xs[t], ys[t]), (xq[t], yq[t]))
                for t in range(args.tasks)
            )
            / args.tasks
        )
        meta_opt.zero_grad()
        meta_loss.backward()
        meta_opt.step()
        window.append(meta_loss.item())
        if iteration % 20 == 0:  # the mean over the last 20 meta-batches: less noisy
            mean = sum(window) / len(window)
            print(f"iterations {iteration - 19:4d}-{iteration:<4d}  meta-loss {mean:.3f}")
            window.clear()


if __name__ == "__main__":
    main()
