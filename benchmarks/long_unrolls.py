"""Long unrolls: peak memory and time of one meta-gradient against the number of inner steps.

The workload of issue 14: float64, a tanh MLP 16-64-64-64-1, a batch of 2048 synthetic
regression points, K inner Adam steps with a learned learning rate, one meta-backward (the
meta-gradient of the query loss with respect to the starting weights and the learning rate).
Methods:

* ``plain``: ``higher_func.func.meta_loss`` (the whole unroll's graph is kept);
* ``recompute``: the same with ``recompute=True`` (iterates stored, steps rebuilt);
* ``forward``: ``torch.func.jvp`` of the same meta-loss in the learning rate (the
  hypergradient of that one hyperparameter, no weight gradient);
* ``first_order``: ``first_order=True`` (an approximation);
* ``truncate``: ``truncate=10`` (an approximation: the last 10 steps only);
* ``higher``: higher 0.2.1's ``innerloop_ctx`` with ``override={"lr": ...}``;
* ``torchopt``: torchopt's ``MetaAdam`` (weight gradient only: no tensor learning rate).

Each (method, steps) runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc
otherwise lets freed activations pin the heap, and peak RSS grows even when live memory does
not); the figure is that process's peak RSS (``ru_maxrss``) and the seconds of one
meta-gradient after one warm-up at 2 steps.  ``--live`` measures live tensor bytes instead
(a ``TorchDispatchMode`` that tracks storages; slower, so its times are not reported).

    python benchmarks/long_unrolls.py                      # the full table (about 10 minutes)
    python benchmarks/long_unrolls.py --steps 10,50 --methods plain,recompute
    python benchmarks/long_unrolls.py --render docs/long-unrolls.png   # table and chart
    python benchmarks/long_unrolls.py --ratios 100 --methods plain,recompute,forward
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("plain", "recompute", "forward", "first_order", "truncate", "higher", "torchopt")
STEPS = (10, 20, 50, 100, 200, 500, 1000)
#: The most steps a method that keeps the whole graph may run here (about 12.6 MB a step).
GRAPH_LIMIT = 200
KEEPS_GRAPH = {"plain", "higher", "torchopt"}
BATCH, WIDTH, FEATURES, LR, TRUNCATE = 2048, 64, 16, 1e-3, 10


# --------------------------------------------------------------------------- one measurement


def _problem() -> tuple[Any, ...]:
    import torch

    torch.manual_seed(0)
    dtype = torch.float64
    net = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, 1),
    ).to(dtype)
    x = torch.randn(2, BATCH, FEATURES, dtype=dtype)
    y = torch.sin(x.sum(-1, keepdim=True))
    return net, (x[0], y[0]), (x[1], y[1])


def _runner(method: str) -> Any:
    """A function ``steps -> None`` computing one meta-gradient with ``method``."""
    import torch

    import higher_func as hf

    net, (xs, ys), (xq, yq) = _problem()
    model = hf.func.FunctionalModel(net)

    def mse(prediction: Any, target: Any) -> Any:
        # Not F.mse_loss: its backward fails under torch.func.jvp ("ZeroTensors are immutable").
        return ((prediction - target) ** 2).mean()

    def loss(params: Any, x: Any, y: Any) -> Any:
        return mse(model(params, None, x), y)

    def hf_meta(steps: int, **options: Any) -> None:
        theta = {k: v.detach().requires_grad_() for k, v in model.params.items()}
        lr = torch.tensor(LR, dtype=torch.float64, requires_grad=True)
        value = hf.func.meta_loss(
            loss,
            hf.optim.adam(lr=LR),
            theta,
            (xs, ys),
            (xq, yq),
            steps=steps,
            hyperparameters={"lr": lr},
            **options,
        )
        value.backward()

    if method == "plain":
        return hf_meta
    if method == "recompute":
        return lambda steps: hf_meta(steps, recompute=True)
    if method == "first_order":
        return lambda steps: hf_meta(steps, first_order=True)
    if method == "truncate":
        return lambda steps: hf_meta(steps, truncate=TRUNCATE)
    if method == "forward":
        theta = {k: v.detach() for k, v in model.params.items()}

        def forward(steps: int) -> None:
            def of_lr(lr: Any) -> Any:
                rule = hf.optim.adam(lr=LR)
                support, query = (xs, ys), (xq, yq)
                hp = {"lr": lr}
                return hf.func.meta_loss(
                    loss, rule, theta, support, query, steps=steps, hyperparameters=hp
                )

            one = torch.ones((), dtype=torch.float64)
            torch.func.jvp(of_lr, (torch.tensor(LR, dtype=torch.float64),), (one,))

        return forward
    if method == "higher":
        import higher

        def with_higher(steps: int) -> None:
            lr = torch.tensor(LR, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam(net.parameters(), lr=LR)
            with higher.innerloop_ctx(net, opt, override={"lr": [lr]}) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(mse(fnet(xs), ys))
                mse(fnet(xq), yq).backward()

        return with_higher
    if method == "torchopt":
        import copy

        import torchopt

        def with_torchopt(steps: int) -> None:
            inner = copy.deepcopy(net)
            opt = torchopt.MetaAdam(inner, lr=LR)
            for _ in range(steps):
                opt.step(mse(inner(xs), ys))
            mse(inner(xq), yq).backward()

        return with_torchopt
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")


def _child(method: str, steps: int, live: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    run = _runner(method)
    run(2)  # warm-up: imports, first-call caches
    if live:
        sys.path.insert(0, str(ROOT / "tests"))
        from live_memory import LiveTensorBytes

        with LiveTensorBytes() as meter:
            run(steps)
        return {"peak_bytes": meter.peak}
    start = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - start
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "s": seconds}


# --------------------------------------------------------------------------- the table


def measure(method: str, steps: int, live: bool = False) -> dict[str, Any]:
    """One fresh process; ``{"peak_bytes", "s"}`` or ``{"error": ...}``."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, __file__, "--child", method, str(steps)] + (["--live"] * live)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def table(
    methods: list[str], steps: list[int], path: Path, live: bool = False, merge: bool = False
) -> dict[str, Any]:
    """Measure every (method, steps), saving ``path`` after each (``merge``: add to it)."""
    results: dict[str, Any] = {}
    if merge and path.exists():
        results = json.loads(path.read_text())["results"]
    path.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        for k in steps:
            if method in KEEPS_GRAPH and k > GRAPH_LIMIT:
                results[f"{method}/{k}"] = {"error": f"not run: over {GRAPH_LIMIT} steps"}
                continue
            results[f"{method}/{k}"] = measure(method, k, live)
            print(method, k, results[f"{method}/{k}"], flush=True)
            path.write_text(json.dumps({"live": live, "results": results}, indent=1))
    return results


def time_ratios(methods: list[str], steps: int, rounds: int = 3) -> dict[str, float]:
    """Median CPU seconds (one thread) per method, interleaved in one process.

    CPU time of alternating runs is steadier than wall time on a shared machine; this is
    where the report's time ratios come from.
    """
    import statistics

    import torch

    torch.set_num_threads(1)
    runs = {method: _runner(method) for method in methods}
    for run in runs.values():
        run(2)
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for _ in range(rounds):
        for method, run in runs.items():
            start = time.process_time()
            run(steps)
            seconds[method].append(time.process_time() - start)
    return {method: statistics.median(values) for method, values in seconds.items()}


LABELS = {
    "plain": "plain unroll (exact)",
    "recompute": "recompute=True (exact)",
    "forward": "forward mode, d/d lr (exact)",
    "first_order": "first_order=True (approx.)",
    "truncate": f"truncate={TRUNCATE} (approx.)",
    "higher": "higher 0.2.1 (exact)",
    "torchopt": "torchopt 0.7.3 MetaAdam (exact)",
}


def markdown(results: dict[str, Any], steps: list[int]) -> str:
    """The table: peak RSS in MB per method and number of steps."""
    header = "| method | " + " | ".join(f"{k} steps" for k in steps) + " |"
    lines = [header, "|---" * (len(steps) + 1) + "|"]
    for method in METHODS:
        cells = []
        for k in steps:
            cell = results.get(f"{method}/{k}")
            ok = cell is not None and "error" not in cell
            cells.append(f"{cell['peak_bytes'] / 1e6:,.0f}" if ok else "")
        if any(cells):
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    """Peak RSS against steps, one line per method (wall times on a shared CPU are noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4.8))
    for method in METHODS:
        points = sorted(
            (int(key.split("/")[1]), cell["peak_bytes"] / 1e6)
            for key, cell in results.items()
            if key.split("/")[0] == method and "error" not in cell
        )
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=LABELS[method])
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("inner Adam steps")
    axis.set_ylabel("peak RSS of a fresh process (MB)")
    axis.set_title(
        "One meta-gradient: float64 MLP 16-64-64-64-1, batch 2048, inner Adam", fontsize=10
    )
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated")
    parser.add_argument("--live", action="store_true", help="live tensor bytes, not peak RSS")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/long_unrolls.json")
    parser.add_argument("--merge", action="store_true", help="add to the results in --json")
    parser.add_argument("--ratios", type=int, metavar="STEPS", help="CPU-time ratios at STEPS")
    parser.add_argument("--render", type=Path, help="print the table of --json, save a chart")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.live)))
        return
    if args.ratios:
        medians = time_ratios(args.methods.split(","), args.ratios)
        for method, seconds in medians.items():
            ratio = seconds / medians.get("plain", seconds)
            print(f"{method:12s} {seconds:7.2f} s CPU  {ratio:5.2f}x plain")
        return
    if args.render:
        results = json.loads(args.json.read_text())["results"]
        print(markdown(results, [int(s) for s in args.steps.split(",")]))
        chart(results, args.render)
        print(f"saved {args.render}")
        return
    methods = args.methods.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    table(methods, steps, args.json, args.live, args.merge)
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
