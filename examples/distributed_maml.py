"""Meta-training across processes with torch.distributed: sinusoid MAML, tasks split by rank.

Every process (rank) draws the same meta-batch of tasks, runs the inner loops of its share of
them (tasks ``rank, rank + world_size, ...``) and back-propagates its part of the meta-loss.
One all-reduce then sums the meta-gradients, so every rank takes the same meta-step and the
meta-parameters stay identical everywhere: the result equals one process running all tasks.

    python examples/distributed_maml.py                                  # one process
    torchrun --nproc_per_node 2 examples/distributed_maml.py             # 2 CPU processes, gloo
    torchrun --nproc_per_node 8 examples/distributed_maml.py --backend nccl   # 8 GPUs, NCCL

Why an all-reduce of meta-gradients rather than DistributedDataParallel: DDP synchronises
gradients from hooks that fire once per forward/backward pair, while a meta-step calls the
model many times (every inner step) before one outer backward. Summing the meta-gradients
explicitly after ``backward()`` needs none of that and works with every inner-loop API
(``innerloop_ctx``, the pure rules, ``vmap``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from _common import HelpFormatter, progress, sinusoid_mlp, sinusoid_tasks
from torch import Tensor, nn
from torch.func import functional_call, grad

import higher_func as hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=120, help="meta-steps")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per meta-batch, all ranks")
    parser.add_argument("--shots", type=int, default=10, help="support/query points per task")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps per task")
    parser.add_argument("--inner-lr", type=float, default=0.01, help="inner SGD learning rate")
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="outer Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the tasks")
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="tensor dtype"
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="torch.distributed backend under torchrun; auto = nccl with CUDA, else gloo",
    )
    parser.add_argument("--save", default=None, help="rank 0 saves the meta-parameters here")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.tasks = 5, 4
    return args


# --------------------------------------------------------------------------- the process group


def setup_distributed(backend: str | None) -> tuple[int, int, torch.device, str]:
    """Join the process group that torchrun describes in the environment."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device, backend


def all_reduce_gradients(parameters: list[Tensor]) -> None:
    """Sum ``.grad`` over all ranks, in one flat message (a missing grad counts as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, chunk in zip(parameters, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = chunk.view_as(p).clone()


# --------------------------------------------------------------------------- MAML


def task_share(n_tasks: int, rank: int, world_size: int) -> range:
    """The tasks this rank adapts to: every ``world_size``-th one, from ``rank``."""
    return range(rank, n_tasks, world_size)


def adapted_query_loss(
    model: nn.Module, rule: hf.optim.Rule, inner_steps: int
) -> Callable[..., Tensor]:
    """``(params, support, query) -> query loss`` after ``inner_steps`` steps of ``rule``."""

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    def query_loss(params: dict[str, Tensor], support: tuple, query: tuple) -> Tensor:
        state = rule.init(params)
        for _ in range(inner_steps):
            params, state = rule.step(params, grad(loss)(params, *support), state)
        return loss(params, *query)

    return query_loss


def meta_train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device):
    """Run ``args.iterations`` meta-steps; returns the meta-model and the meta-loss history."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)  # the same initial meta-parameters on every rank
    model = sinusoid_mlp().to(device=device, dtype=dtype)
    parameters = list(model.parameters())
    meta_opt = torch.optim.Adam(parameters, lr=args.meta_lr)
    query_loss = adapted_query_loss(model, hf.optim.sgd(lr=args.inner_lr), args.inner_steps)
    # Every rank draws the same meta-batches from the same generator, then keeps its share.
    generator = torch.Generator().manual_seed(args.seed + 1)
    history = []
    steps = range(args.iterations)
    for _ in progress(steps, desc="meta-steps") if rank == 0 else steps:
        support, query, _ = sinusoid_tasks(args.tasks, args.shots, generator, dtype)
        params = dict(model.named_parameters())
        meta_opt.zero_grad()
        local = torch.zeros((), dtype=dtype, device=device)
        for t in task_share(args.tasks, rank, world_size):
            task_support = (support[0][t].to(device), support[1][t].to(device))
            task_query = (query[0][t].to(device), query[1][t].to(device))
            local = local + query_loss(params, task_support, task_query) / args.tasks
        if local.requires_grad:  # a rank with no task this round contributes zeros
            local.backward()
        if dist.is_initialized():  # under torchrun, even with one process
            all_reduce_gradients(parameters)
            local = local.detach()
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        meta_opt.step()
        history.append(local.item())
    return model, history


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:
        backend = None if args.backend == "auto" else args.backend
        rank, world_size, device, _ = setup_distributed(backend)
    else:
        rank, world_size, device = 0, 1, torch.device("cpu")
    try:
        model, history = meta_train(args, rank, world_size, device)
        if rank == 0:
            report(args, world_size, model, history)
        shut_down()
    finally:
        if dist.is_initialized():  # only after an error: shut_down destroyed the group
            dist.destroy_process_group()


def report(args: argparse.Namespace, world_size: int, model: nn.Module, history: list) -> None:
    """Print the meta-loss curve and save the meta-parameters (rank 0 only)."""
    print(f"{world_size} process(es), {args.tasks} tasks per meta-batch")
    shown = {*range(0, len(history), max(1, len(history) // 6)), len(history) - 1}
    for i in sorted(shown):
        print(f"meta-step {i:4d}  meta-loss (mean over tasks) {history[i]:.4f}")
    if args.save:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.save)
    sys.stdout.flush()


def shut_down() -> None:
    """Leave the process group together: no rank destroys it (and exits) while another still
    uses it, e.g. while rank 0 writes its results.  A rank that left early used to abort at
    teardown ("terminate called without an active exception") on a loaded machine."""
    if not dist.is_initialized():
        return
    dist.barrier()  # every rank has finished its work, rank 0 its report
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
