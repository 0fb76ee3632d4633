"""Run every workload through every implementation in ONE run and report side by side.

Prints one table (median seconds per iteration, speed ratio to higher, ratio to the
hand-written torch.func loop, peak memory, agreement of meta-gradients), checks the
project's performance targets, saves everything as JSON and renders
``docs/performance.md`` (with a bar chart when matplotlib is installed).

Usage (from the repository root)::

    python benchmarks/report.py --quick          # about 3 minutes: few rounds, no compiling
    python benchmarks/report.py                  # the full run, compiled paths included
    python benchmarks/report.py --device cuda    # on a GPU
    python benchmarks/report.py --workloads 1,3 --implementations higher,"torch.func loop"

A speed claim counts only when measured beside the alternative in the same run on the same
machine: every ratio in the report comes from one run.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import implementations  # noqa: E402
import render  # noqa: E402
import workloads  # noqa: E402

ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "latest.json"
DEFAULT_MARKDOWN = ROOT / "docs" / "performance.md"

#: rounds per workload family: (quick, full)
ROUNDS = {"maml": (3, 9), "hyper": (5, 15), "setup": (5, 15), "memory": (1, 1)}
#: seconds of timing after which a workload stops adding rounds (at least 3 are kept)
BUDGET_S = {"quick": 20.0, "full": 90.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, no compiled paths")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--workloads", default="", help="comma-separated keys (default: all)")
    parser.add_argument("--implementations", default="", help="comma-separated keys (default: all)")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (default: by mode)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the compiled paths (default: yes, except with --quick)",
    )
    parser.add_argument(
        "--compile-conv",
        action="store_true",
        help="also compile the conv workload 3 (more than 10 minutes on a 2-core CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a busy machine more threads contend and "
        "inflate times up to 10x; 0 keeps torch's default)",
    )
    parser.add_argument("--memory-steps", default="5,20,50", help="inner steps for workload 6")
    parser.add_argument(
        "--before",
        default="",
        metavar="REV",
        help="also run the drop-in code on higher_func at git revision REV, interleaved in "
        "the same rounds (a before/after comparison of a change)",
    )
    parser.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="keep torch inductor's on-disk cache (default: a fresh one, so compile times "
        "are cold)",
    )
    parser.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        metavar="JSON",
        help="merge this run's workloads (with --render-only: those of --json) into an "
        "earlier report, replacing those re-measured, each marked with its own run's date "
        "and load; render and save the merge",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/performance.md")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: render the --json file into the tables and --markdown",
    )
    return parser.parse_args(argv)


def environment(device: str) -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "libraries": implementations.library_versions(),
        "device": device,
        "memory_method": harness.memory_method(device),
        "load_average_at_start": _load_average(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _selected(spec: str, available: list[str], what: str) -> list[str]:
    if not spec:
        return available
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise SystemExit(f"--{what}: unknown {unknown}; choose from {available}")
    return chosen


# --------------------------------------------------------------------------- targets


def _median(results: dict[str, Any], workload: str, impl: str) -> float | None:
    case = results.get(workload, {}).get(impl)
    return None if case is None else case.get("median_s")


def _peak(results: dict[str, Any], workload: str, impl: str) -> int | None:
    case = results.get(workload, {}).get(impl)
    return None if case is None else case.get("peak_bytes")


def _target(name: str, measured: float | None, goal: str, met: bool | None, why: str = ""):
    status = "not measured" if measured is None else ("met" if met else "missed")
    return {"target": name, "measured": measured, "goal": goal, "status": status, "why": why}


def check_targets(results: dict[str, dict[str, Any]], memory_steps: list[int]) -> list[dict]:
    """The performance targets of issues 4 and 5, each with its measured ratio."""
    ctx, higher = "higher_func.innerloop_ctx", "higher"
    targets = []

    def speedup(workload: str, impl: str, over: str) -> float | None:
        a, b = _median(results, workload, impl), _median(results, workload, over)
        return None if a is None or b is None else b / a

    drop_in_goals = (("1", 1.3), ("2", 1.3), ("2b", 1.3), ("4", 1.3), ("3", 1.0), ("5", 2.0))
    real_models = [key for key in results if key[0] in "3789" and key != "3"]
    for key, goal in (*drop_in_goals, ("5b", 2.0), *((k, 1.0) for k in real_models)):
        ratio = speedup(key, ctx, higher)
        targets.append(
            _target(
                f"workload {key}: innerloop_ctx vs higher (x faster)",
                ratio,
                f">= {goal}",
                ratio is not None and ratio >= goal,
            )
        )
    for key in (k for k in real_models if k[0] != "3"):
        slowdown = speedup(key, "torch.func loop", ctx)
        targets.append(
            _target(
                f"workload {key}: innerloop_ctx / torch.func loop (time, large model)",
                slowdown,
                "<= 1.1",
                slowdown is not None and slowdown <= 1.1,
            )
        )
    for impl in ("higher_func functional", "higher_func inner_loop"):
        for key in ("1", "2", "2b", "3", "4"):
            # this implementation's time over the hand-written loop's (below 1: faster)
            slowdown = speedup(key, "torch.func loop", impl)
            targets.append(
                _target(
                    f"workload {key}: {impl} / torch.func loop (time)",
                    slowdown,
                    "<= 1.05",
                    slowdown is not None and slowdown <= 1.05,
                )
            )
    for key in ("1", "2"):
        for impl, goal in (("higher_func vmap", 10.0), ("higher_func compiled", 50.0)):
            ratio = speedup(key, impl, higher)
            targets.append(
                _target(
                    f"workload {key}: {impl} vs higher (x faster)",
                    ratio,
                    f">= {goal}",
                    ratio is not None and ratio >= goal,
                )
            )
    lo, hi = min(memory_steps), max(memory_steps)
    for impl in (ctx, "higher_func functional", "higher_func inner_loop"):
        growth = _growth(results, "fo", lo, hi, impl)
        tracked = _growth(results, "tracked", lo, hi, impl)
        share = None if growth is None or not tracked else growth / tracked
        targets.append(
            _target(
                f"memory: {impl}, first order: growth {lo}->{hi} steps / tracked growth",
                share,
                "<= 0.1 (flat)",
                share is not None and share <= 0.1,
            )
        )
    for steps in memory_steps:
        mine, theirs = (
            _peak(results, f"6-tracked-{steps}", ctx),
            _peak(results, f"6-tracked-{steps}", higher),
        )
        ratio = None if mine is None or theirs is None else mine / max(theirs, 1)
        targets.append(
            _target(
                f"memory: innerloop_ctx / higher, tracked, {steps} steps",
                ratio,
                "<= 1.05 (page-granular RSS on CPU)",
                ratio is not None and ratio <= 1.05,
            )
        )
    return targets


def _growth(results: dict[str, Any], mode: str, lo: int, hi: int, impl: str) -> float | None:
    """How much the peak grows from ``lo`` to ``hi`` inner steps (bytes)."""
    a, b = _peak(results, f"6-{mode}-{lo}", impl), _peak(results, f"6-{mode}-{hi}", impl)
    return None if a is None or b is None else float(b - a)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        report = json.loads(args.json.read_text())
        if args.merge_into is not None:  # render the merge and save it over the earlier report
            report = merged(json.loads(args.merge_into.read_text()), report)
            args.merge_into.write_text(json.dumps(_finite(report), indent=1, default=str) + "\n")
        print(render.text_report(report))
        written = render.write_markdown(report, args.markdown)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    mode = "quick" if args.quick else "full"
    compile_paths = (not args.quick) if args.compile is None else args.compile
    if args.threads:
        torch.set_num_threads(args.threads)
    implementations.COMPILE_CONV = args.compile_conv
    if not args.warm_compile_cache:
        # Cold compile times: inductor's on-disk cache (read when compiling starts) would
        # otherwise hide most of the compiling on a second run.
        cache = tempfile.mkdtemp(prefix="higher_func_bench_")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    memory_steps = [int(s) for s in args.memory_steps.split(",")]

    if args.before:
        implementations.add_revision(args.before, ROOT)
    suite = workloads.suite(args.device, tuple(memory_steps))
    keys = _selected(args.workloads, sorted({w.key.split("-")[0] for w in suite}), "workloads")
    suite = [w for w in suite if w.key.split("-")[0] in keys]
    all_impls = [i.key for i in implementations.IMPLEMENTATIONS]
    chosen = _selected(args.implementations, all_impls, "implementations")
    impls = [i for i in implementations.IMPLEMENTATIONS if i.key in chosen]

    env = environment(args.device)
    print(f"higher_func benchmarks ({mode} run) on {env['cpu']}, torch {torch.__version__}")
    threads, load = env["torch_threads"], env["load_average_at_start"]
    print(f"  device {args.device}, {threads} torch threads, load average {load}")
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for workload in suite:
        elapsed = time.perf_counter() - started
        print(f"[{elapsed:6.0f} s] workload {workload.key}: {workload.problem.title}", flush=True)
        run_impls = [i for i in impls if compile_paths or not i.compiled]
        cases = harness.run_workload(
            workload,
            run_impls,
            rounds=args.rounds or ROUNDS[workload.family][0 if args.quick else 1],
            device=args.device,
            reference=implementations.REFERENCE,
            budget_s=BUDGET_S[mode],
        )
        for impl in impls:
            if impl not in run_impls:
                cases[impl.key] = harness.CaseResult(
                    impl.key,
                    "skipped",
                    "compiled paths are skipped in --quick runs (compiling takes 30-140 s "
                    "each on a 2-core CPU); run without --quick or with --compile",
                )
        results[workload.key] = {k: c.as_dict() for k, c in cases.items()}

    report = {
        "mode": mode,
        "settings": {
            "rounds": {k: v[0 if args.quick else 1] for k, v in ROUNDS.items()},
            "rounds_override": args.rounds or None,
            "compile": compile_paths,
            "memory_steps": memory_steps,
            "reference": implementations.REFERENCE,
            "baseline": implementations.BASELINE,
            "threads": torch.get_num_threads(),
            "compile_cache": "warm (existing)" if args.warm_compile_cache else "cold (fresh)",
        },
        "environment": env,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "implementations": {i.key: i.description for i in impls},
        "workloads": {w.key: {"title": w.problem.title, "family": w.family} for w in suite},
        "results": results,
        "targets": check_targets(results, memory_steps),
    }
    print()
    print(render.text_report(report))
    if args.merge_into is not None:
        report = merged(json.loads(args.merge_into.read_text()), report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(report), indent=1, default=str) + "\n")
    print(f"\nsaved {args.json}")
    if not args.no_docs:
        written = render.write_markdown(report, args.markdown)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def merged(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``new``'s workloads added or replaced, each marked with its run.

    Ratios stay within one run: every workload's implementations come from the same run.
    """
    env = new["environment"]
    run = {
        "date_utc": env["date_utc"],
        "mode": new["mode"],
        "load_average_at_start": env["load_average_at_start"],
        "libraries": env["libraries"],
    }
    out = json.loads(json.dumps(base))
    out["results"].update(new["results"])
    out["workloads"].update(new["workloads"])
    out["implementations"].update(new["implementations"])
    runs = out.setdefault("workload_runs", {})
    runs.update(dict.fromkeys(new["workloads"], run))
    out["targets"] = check_targets(out["results"], out["settings"]["memory_steps"])
    return out


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as strings (``"nan"``), which JSON cannot hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
