"""Render a benchmark report (the dict built by ``report.py``) as text, Markdown and a chart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASELINE = "higher"
#: The saved output of ``benchmarks/plan_thresholds.py`` shown on the page.
PLAN_THRESHOLDS = Path(__file__).resolve().parent / "results" / "plan_thresholds.txt"
#: The saved results of ``benchmarks/long_unrolls.py`` (its own fresh-process runs).
LONG_UNROLLS = Path(__file__).resolve().parent / "results" / "long_unrolls.json"
REFERENCE = "torch.func loop"
MB = 2**20

NOISE_NOTE = (
    "Absolute times depend on the machine and on what else runs on it; on a shared 2-core "
    "machine they are noisy. Ratios are more stable: every implementation is timed in the "
    "same run, interleaved round by round, so a slow spell hits all of them alike."
)


# --------------------------------------------------------------------------- cells


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value >= 1e-3 else f"{value * 1e6:.0f} us"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def _deviation(value: Any) -> str:
    if value is None:
        return "-"
    return f"{float(value):.1e}"


def _case_rows(report: dict[str, Any], key: str) -> list[list[str]]:
    """One row per implementation of a timed workload."""
    cases = report["results"][key]
    base = cases.get(BASELINE, {}).get("median_s")
    floor = cases.get(REFERENCE, {}).get("median_s")
    rows = []
    for impl, case in cases.items():
        if case["status"] != "ok":
            rows.append([impl, case["status"], "", "", "", "", _footnote(report, case["message"])])
            continue
        median = case["median_s"]
        notes = [case["notes"]] if case["notes"] else []
        if case["compiled"] and case["first_iteration_s"] is not None:
            notes.append(
                f"compile (1st call) {case['first_iteration_s']:.1f} s, "
                f"2nd call {case['second_iteration_s']:.3f} s"
            )
        rows.append(
            [
                impl,
                _seconds(median),
                _ratio(base / median if base and median else None),
                _ratio(median / floor if floor and median else None),
                _megabytes(case["peak_bytes"]),
                _deviation(case["deviation_from_reference"]),
                "; ".join(notes),
            ]
        )
    return rows


def _footnote(report: dict[str, Any], message: str) -> str:
    reasons = report.setdefault("_reasons", [])
    if message not in reasons:
        reasons.append(message)
    return f"[{reasons.index(message) + 1}]"


CASE_HEADER = [
    "implementation",
    "median s/iter",
    "x faster than higher",
    "time / torch.func loop",
    "peak MB",
    "meta-grad deviation",
    "notes",
]


def _memory_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    memory = {k: v for k, v in report["results"].items() if k.startswith("6-")}
    impls = [
        i
        for i in report["implementations"]
        if any(c.get(i, {}).get("status") == "ok" for c in memory.values())
    ]
    rows = []
    for key, cases in memory.items():
        _, mode, steps = key.split("-")
        label = "tracked" if mode == "tracked" else "first order"
        rows.append(
            [label, steps, *(_megabytes(cases.get(i, {}).get("peak_bytes")) for i in impls)]
        )
    return ["mode", "inner steps", *impls], rows


def _target_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in report["targets"]:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        rows.append([t["target"], t["goal"], measured, t["status"]])
    return rows


# --------------------------------------------------------------------------- text


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def text_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables for the terminal."""
    report.pop("_reasons", None)
    parts = []
    for key, info in report["workloads"].items():
        if info["family"] == "memory":
            continue
        parts.append(f"Workload {key}: {info['title']}")
        parts.append(_text_table(CASE_HEADER, _case_rows(report, key)))
        parts.append("")
    header, rows = _memory_table(report)
    if rows:
        parts.append("Peak memory (MB) of one meta-iteration, workload 6")
        parts.append(f"  measured as: {report['environment']['memory_method']}")
        parts.append(_text_table(header, rows))
        parts.append("")
    parts.append("Targets (ratios from this run)")
    parts.append(_text_table(["target", "goal", "measured", "status"], _target_rows(report)))
    reasons = report.pop("_reasons", [])
    if reasons:
        parts.append("")
        parts.append("Skipped or failed:")
        parts += [f"  [{i}] {r}" for i, r in enumerate(reasons, 1)]
    parts.append("")
    parts.append(NOISE_NOTE)
    return "\n".join(parts)


# --------------------------------------------------------------------------- markdown


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape: Callable[[str], str] = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], chart: str | None, chart_note: str) -> str:
    """``docs/performance.md``: environment, targets, tables, chart and method."""
    report.pop("_reasons", None)
    env = report["environment"]
    libraries = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    out = [
        "# Performance",
        "",
        "<!-- Generated by benchmarks/report.py; edit that script, not this page. -->",
        "",
        "higher_func beside higher 0.2.1, torchopt and a hand-written `torch.func` loop, "
        "every workload through every implementation in one run. Reproduce with",
        "",
        "```bash",
        'pip install -e ".[bench]"    # higher==0.2.1, pytest-benchmark, matplotlib',
        "python benchmarks/report.py           # full run (compiled paths included)",
        "python benchmarks/report.py --quick   # a few minutes, no compiled paths",
        "```",
        "",
        "## Where these figures come from",
        "",
        _markdown_table(
            ["", ""],
            [
                ["date", env["date_utc"]],
                ["run", f"{report['mode']} ({report['elapsed_s']} s)"],
                ["CPU", f"{env['cpu']} ({env['logical_cpus']} logical CPUs, {env['machine']})"],
                ["torch threads", str(env["torch_threads"])],
                ["load average at start", str(env["load_average_at_start"])],
                ["device", env["device"] + (f" ({env['gpu']})" if "gpu" in env else "")],
                ["platform", env["platform"]],
                ["Python", env["python"]],
                ["libraries", libraries],
            ],
        ),
        "",
        NOISE_NOTE,
        "",
    ]
    if chart:
        out += ["## At a glance", "", f"![speed-up over higher and peak memory]({chart})", ""]
    else:
        out += ["## At a glance", "", f"_{chart_note}_", ""]
    out += ["## Time per meta-iteration", ""]
    out.append(
        "Median over the timed rounds, after one warm-up iteration (two for compiled paths, "
        "whose first call compiles). *x faster than higher*: higher's median divided by this "
        "one. *time / torch.func loop*: this median divided by the hand-written loop's. "
        "*meta-grad deviation*: largest difference of the meta-gradient after the first "
        "iteration from the hand-written loop's, relative to its largest entry (float32)."
    )
    out.append("")
    runs = report.get("workload_runs", {})
    if runs:
        out.append(
            "Workloads marked *re-measured* come from a later run than the one described "
            "above (date, mode and load average given with each); within a workload every "
            "implementation comes from the same run, so its ratios hold."
        )
        out.append("")
    for key, info in report["workloads"].items():
        if info["family"] == "memory":
            continue
        out += [f"### Workload {key}: {info['title']}", ""]
        if key in runs:
            run = runs[key]
            load = run["load_average_at_start"]
            loaded = bool(load) and load[0] > 1.0  # more than one core's worth of other work
            note = " (a loaded machine: trust the ratios, not the seconds)" if loaded else ""
            out += [
                f"_Re-measured {run['date_utc']}, {run['mode']} run, load average at start "
                f"{load}{note}._",
                "",
            ]
        out += [_markdown_table(CASE_HEADER, _case_rows(report, key)), ""]
    header, rows = _memory_table(report)
    if rows:
        out += ["## Peak memory (workload 6)", ""]
        out += [
            "MB by which memory grows during one meta-iteration (inner loop and meta-backward) "
            f"of an MLP 784-256-256-10 on one task. Measured as: {env['memory_method']}.",
            "",
            _markdown_table(header, rows),
            "",
        ]
    thresholds = PLAN_THRESHOLDS.read_text() if PLAN_THRESHOLDS.exists() else ""
    if thresholds:
        out += ["## When a parameter group is stepped flat", ""]
        out += [
            "While autograd records the inner steps, the drop-in optimizers step a parameter "
            "group of a stateful elementwise rule as one flat tensor when that is faster "
            "(`higher_func/_execution.py`, the one place that decides how a rule's kernel "
            "runs). On the CPU that holds for groups of small tensors: flat only when the "
            "mean tensor is at most `FLAT_MAX_MEAN_BYTES` (64 KiB) and the group at most "
            "`FLAT_MAX_BYTES` (8 MiB); on accelerators there is no limit until measured "
            "there. The figures below set those limits: seconds of 3 recorded steps and the "
            "outer backward through them, flat and per tensor, interleaved (median of 7; "
            "above 1x flat is faster). Re-measure with "
            "`PYTHONPATH=$PWD python benchmarks/plan_thresholds.py` (add `--device cuda` on "
            "a GPU).",
            "",
            "```text",
            thresholds.rstrip(),
            "```",
            "",
        ]
    out += _long_unrolls_section()
    out += ["## Targets and status", ""]
    out += [_markdown_table(["target", "goal", "measured", "status"], _target_rows(report)), ""]
    out += ["## Implementations", ""]
    out += [f"- **{k}**: {v}" for k, v in report["implementations"].items()]
    out += ["", "## Method", ""]
    out += [f"- {line}" for line in method_notes(report)]
    reasons = report.pop("_reasons", [])
    if reasons:
        out += ["", "## Skipped or failed", ""]
        out += [f"{i}. {r}" for i, r in enumerate(reasons, 1)]
    out.append("")
    return "\n".join(out)


def _long_unrolls_section() -> list[str]:
    """Peak memory against inner steps, from ``long_unrolls.py``'s saved results."""
    if not LONG_UNROLLS.exists():
        return []
    import long_unrolls  # beside this file; imported only to render its saved table

    results = json.loads(LONG_UNROLLS.read_text())["results"]
    return [
        "## Long unrolls",
        "",
        "Peak RSS (MB) of a fresh process computing one meta-gradient against the number of "
        "inner Adam steps (float64 tanh MLP 16-64-64-64-1, batch 2048, "
        "`MALLOC_MMAP_THRESHOLD_=131072`; about 340 MB is torch and the data). Methods, "
        "time ratios and how to reproduce: [Long unrolls](long-unrolls.md#figures).",
        "",
        long_unrolls.markdown(results, list(long_unrolls.STEPS)),
        "",
        "![peak memory against inner steps](long-unrolls.png)",
        "",
    ]


def method_notes(report: dict[str, Any]) -> list[str]:
    """How the figures were taken, for the Markdown page."""
    settings = report["settings"]
    rounds = ", ".join(f"{k} {v}" for k, v in settings["rounds"].items())
    return [
        "Workloads are defined once in `benchmarks/workloads.py` (fixed seeds, float32, "
        "synthetic data) and every implementation in `benchmarks/implementations.py` runs "
        "the same problem; the meta-gradient column checks that they compute the same thing.",
        f"Timed rounds per workload family ({report['mode']} run): {rounds} (fewer when a "
        "workload's timing budget runs out; at least 3). Rounds are interleaved across "
        "implementations.",
        f"torch intra-op threads: {settings.get('threads')} (on a busy machine several threads "
        "contend and inflate small-op times up to 10x; `--threads 0` keeps torch's default).",
        "Compiled paths: the first call compiles and is reported in the notes, not in the "
        f"median; the inductor cache was {settings.get('compile_cache', 'unknown')}.",
        "MAML meta-loss: the sum of the tasks' query losses; the per-task loops call "
        "`backward()` once per task, the batched paths once per batch. BatchNorm uses batch "
        "statistics only (`track_running_stats=False`), as in MAML, so no implementation "
        "updates buffers.",
        "First order (workload 6): the `innerloop_ctx` code runs with "
        "`track_higher_grads=False` (higher's semantics: no graph across steps, no "
        "meta-gradient), torchopt calls `stop_gradient` after each step, the functional "
        "loops detach the inner gradients (first-order MAML).",
        f"Peak memory: {report['environment']['memory_method']}.",
        "Targets: the ratios of issues 4 and 5, computed from this run's medians; a target "
        "on a noisy machine should be confirmed by a rerun on a quiet one.",
    ]


# --------------------------------------------------------------------------- chart


def write_chart(report: dict[str, Any], path: Path) -> str | None:
    """Save the chart (``None`` when matplotlib is missing): speed on top, memory below.

    Sized to be read at page width: one wide speed panel with its legend beneath, and the
    memory growth split into a tracked and a first-order panel (half the series each).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [k for k, v in report["workloads"].items() if v["family"] != "memory"]
    impls = [i for i in report["implementations"] if i != BASELINE]
    # One colour per implementation in every panel (tab10 has ten).
    colour = {impl: f"C{n % 10}" for n, impl in enumerate(report["implementations"])}
    fig = plt.figure(figsize=(10, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.15, 1))
    speed = fig.add_subplot(grid[0, :])
    width = 0.8 / max(len(impls), 1)
    for n, impl in enumerate(impls):
        values = []
        for key in timed:
            cases = report["results"][key]
            base, mine = (
                cases.get(BASELINE, {}).get("median_s"),
                cases.get(impl, {}).get("median_s"),
            )
            values.append(base / mine if base and mine else 0.0)
        positions = [i + (n - (len(impls) - 1) / 2) * width for i in range(len(timed))]
        speed.bar(positions, values, width, label=impl, color=colour[impl])
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_yscale("log")
    speed.set_xticks(range(len(timed)), timed)
    speed.set_xlabel("workload (see the tables below)")
    speed.set_ylabel("x faster than higher (log scale)")
    speed.set_title("Speed relative to higher 0.2.1 (higher = 1; no bar = not run)")
    speed.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    for column, (mode, name) in enumerate((("tracked", "tracked"), ("fo", "first order"))):
        memory = fig.add_subplot(grid[1, column])
        keys = [k for k in report["results"] if k.startswith(f"6-{mode}-")]
        steps = [int(k.rsplit("-", 1)[1]) for k in keys]
        for impl in report["implementations"]:
            peaks = [report["results"][k].get(impl, {}).get("peak_bytes") for k in keys]
            if steps and all(p is not None for p in peaks):
                memory.plot(
                    steps, [p / MB for p in peaks], marker="o", label=impl, color=colour[impl]
                )
        memory.set_xlabel("inner steps")
        memory.set_ylabel("peak memory growth (MB)")
        memory.set_title(f"Memory of one meta-iteration, {name}")
        memory.legend(fontsize=9)
    fig.suptitle(
        f"{report['environment']['cpu']}, torch {report['environment']['libraries']['torch']}, "
        f"{report['environment']['date_utc']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_markdown(report: dict[str, Any], path: Path) -> list[Path]:
    """Write ``path`` (and the chart beside it); returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chart_path = path.with_suffix(".png")
    chart = write_chart(report, chart_path)
    note = (
        "Chart skipped: matplotlib is not installed (`pip install matplotlib`, or the "
        "`bench` extra). The tables below hold every figure."
    )
    path.write_text(markdown_report(report, chart, note))
    return [path, chart_path] if chart else [path]
