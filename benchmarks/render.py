"""Render a benchmark report (``report.py``'s pytest-benchmark JSON) as tables and a chart."""

from __future__ import annotations

import datetime
import json
import re
import string
from pathlib import Path
from typing import Any

import long_unrolls as long_unrolls_table  # beside this file: the table of its saved results

BASELINE = "higher"
REFERENCE = "torch.func loop"
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: The page's text; ``$name`` fields are filled in by :func:`markdown_report`.
TEMPLATE = HERE / "performance.template.md"
#: The saved output of ``benchmarks/plan_thresholds.py`` shown on the page.
PLAN_THRESHOLDS = RESULTS / "plan_thresholds.txt"
#: The saved output of ``benchmarks/kernel_costs.py`` shown on the page.
KERNEL_COSTS = RESULTS / "kernel_costs.txt"
#: The saved results of ``benchmarks/long_unrolls.py`` (its own fresh-process runs).
LONG_UNROLLS = RESULTS / "long_unrolls.json"
#: The saved report of the ``gpu`` preset (``.ci/gpu-check``), shown when present.
GPU_REPORT = RESULTS / "gpu.json"
MB = 2**20

NOISE_NOTE = (
    "Absolute times depend on the machine and on what else runs on it; on a shared 2-core "
    "machine they are noisy. Ratios are more stable: every implementation is timed in the "
    "same run, interleaved round by round, so a slow spell hits all of them alike."
)
REMEASURED_NOTE = (
    "Workloads marked *re-measured* come from a later run than the one described above "
    "(date, mode and load average given with each); within a workload every implementation "
    "comes from the same run, so its ratios hold."
)
CASE_HEADER = [
    "implementation",
    "median s/iter",
    "x faster than higher",
    "time / torch.func loop",
    "peak MB",
    "meta-grad deviation",
    "notes",
]


def date(iso: str) -> str:
    """``2026-11-27T17:00:05+00:00`` as ``2026-11-27 17:00 UTC``."""
    return datetime.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


def cases(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{workload: {implementation: case}}``, each case one flat dict, in report order."""
    meta = report["higher_func"]
    flat: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in meta["workloads"]}
    for bench in report["benchmarks"]:
        case = {"status": "ok", "message": "", "median_s": bench["stats"]["median"]}
        flat[bench["params"]["workload"]][bench["name"]] = case | bench["extra_info"]
    for case in meta["not_run"]:
        flat[case["workload"]][case["implementation"]] = case
    order = list(meta["implementations"])
    return {
        key: dict(sorted(impls.items(), key=lambda item: order.index(item[0])))
        for key, impls in flat.items()
    }


# --------------------------------------------------------------------------- tables


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value >= 1e-3 else f"{value * 1e6:.0f} us"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, its columns padded so that it reads as text too."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(row) for row in cells[1:]]
    )


def _case_rows(workload: dict[str, dict[str, Any]], reasons: list[str]) -> list[list[str]]:
    """One row per implementation of a timed workload; ``reasons`` collects footnotes."""
    base = workload.get(BASELINE, {}).get("median_s")
    floor = workload.get(REFERENCE, {}).get("median_s")
    rows = []
    for impl, case in workload.items():
        if case["status"] != "ok":
            if case["message"] not in reasons:
                reasons.append(case["message"])
            footnote = f"[{reasons.index(case['message']) + 1}]"
            rows.append([impl, case["status"], "", "", "", "", footnote])
            continue
        median, deviation = case["median_s"], case.get("deviation_from_reference")
        notes = [case["notes"]] if case.get("notes") else []
        if case.get("compiled") and case.get("first_iteration_s") is not None:
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
                _megabytes(case.get("peak_bytes")),
                "-" if deviation is None else f"{float(deviation):.1e}",
                "; ".join(notes),
            ]
        )
    return rows


def _memory_table(report: dict[str, Any]) -> str:
    memory = {k: v for k, v in cases(report).items() if k.startswith("6-")}
    impls = [
        i
        for i in report["higher_func"]["implementations"]
        if any(c.get(i, {}).get("status") == "ok" for c in memory.values())
    ]
    rows = []
    for key, workload in memory.items():
        _, mode, steps = key.split("-")
        label = "tracked" if mode == "tracked" else "first order"
        peaks = (_megabytes(workload.get(i, {}).get("peak_bytes")) for i in impls)
        rows.append([label, steps, *peaks])
    return table(["mode", "inner steps", *impls], rows) if rows else ""


def _targets_table(report: dict[str, Any]) -> str:
    rows = []
    for t in report["higher_func"]["targets"]:
        measured = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        rows.append([t["target"], t["goal"], measured, t["status"]])
    return table(["target", "goal", "measured", "status"], rows)


def _timed(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: w for k, w in report["higher_func"]["workloads"].items() if w["family"] != "memory"}


def _workload_tables(report: dict[str, Any], heading: str) -> tuple[list[str], list[str]]:
    """Each timed workload's heading and table; the footnotes (reasons) they cite."""
    all_cases, runs = cases(report), report["higher_func"].get("workload_runs", {})
    out: list[str] = []
    reasons: list[str] = []
    for key, workload in _timed(report).items():
        out += [f"{heading} {key}: {workload['title']}", ""]
        if key in runs:
            load = runs[key]["load_average_at_start"]
            loaded = bool(load) and load[0] > 1.0  # more than one core's worth of other work
            note = " (a loaded machine: trust the ratios, not the seconds)" if loaded else ""
            out += [
                f"_Re-measured {runs[key]['date_utc']}, {runs[key]['mode']} run, load average "
                f"at start {load}{note}._",
                "",
            ]
        out += [table(CASE_HEADER, _case_rows(all_cases[key], reasons)), ""]
    return out, reasons


def _footnotes(heading: str, reasons: list[str]) -> list[str]:
    return [heading, "", *(f"{i}. {r}" for i, r in enumerate(reasons, 1)), ""] if reasons else []


def terminal_report(report: dict[str, Any]) -> str:
    """Every table of the page, for the terminal."""
    tables, reasons = _workload_tables(report, "Workload")
    memory = _memory_table(report)
    if memory:
        tables += ["Peak memory (MB) of one meta-iteration, workload 6", "", memory, ""]
    tables += ["Targets (ratios from this run)", "", _targets_table(report), ""]
    return "\n".join([*tables, *_footnotes("Skipped or failed:", reasons), NOISE_NOTE])


# --------------------------------------------------------------------------- the page


def markdown_report(report: dict[str, Any], chart: str | None, chart_note: str) -> str:
    """``docs/performance.md``: ``performance.template.md`` with this report's figures."""
    info, meta, commit = report["machine_info"], report["higher_func"], report["commit_info"]
    cpu = f"{info['cpu'].get('brand_raw')} ({info['cpu'].get('count')} logical CPUs, "
    dirty = " (with uncommitted changes)" if commit.get("dirty") else ""
    where = {
        "date": date(report["datetime"]),
        "run": f"{meta['mode']} ({meta['elapsed_s']} s)",
        "commit": f"{commit.get('id', 'not recorded')}{dirty}",
        "CPU": f"{cpu}{info['machine']})",
        "torch threads": info["torch_threads"],
        "load average at start": info["load_average_at_start"],
        "device": info["device"] + (f" ({info['gpu']})" if "gpu" in info else ""),
        "platform": f"{info['system']} {info['release']}",
        "Python": info["python_version"],
        "libraries": ", ".join(f"{k} {v}" for k, v in info["libraries"].items()),
    }
    tables, reasons = _workload_tables(report, "### Workload")
    long_unrolls = json.loads(LONG_UNROLLS.read_text())["results"]
    page = string.Template(TEMPLATE.read_text()).substitute(
        environment=table(["", ""], [[k, str(v)] for k, v in where.items()]),
        noise_note=NOISE_NOTE,
        chart=f"![speed-up over higher and peak memory]({chart})" if chart else f"_{chart_note}_",
        remeasured=REMEASURED_NOTE if meta.get("workload_runs") else "",
        workload_tables="\n".join(tables),
        memory_method=info["memory_method"],
        memory_table=_memory_table(report) or "_Not measured in this run._",
        plan_thresholds=PLAN_THRESHOLDS.read_text().rstrip(),
        kernel_costs=KERNEL_COSTS.read_text().rstrip(),
        long_unrolls=long_unrolls_table.markdown(long_unrolls, list(long_unrolls_table.STEPS)),
        gpu="\n".join(gpu_section(GPU_REPORT)),
        targets=_targets_table(report),
        implementations="\n".join(f"- **{k}**: {v}" for k, v in meta["implementations"].items()),
        mode=meta["mode"],
        rounds=", ".join(f"{k} {v}" for k, v in meta["settings"]["rounds"].items()),
        threads=meta["settings"]["threads"],
        compile_cache=meta["settings"]["compile_cache"],
        failures="\n".join(_footnotes("## Skipped or failed", reasons)),
    )
    return re.sub(r"\n{3,}", "\n\n", page).rstrip() + "\n"


def gpu_section(path: Path) -> list[str]:
    """The tables of a ``gpu`` preset run (``.ci/gpu-check``), when it has been saved."""
    if not path.exists():
        return []
    gpu = json.loads(path.read_text())
    info, meta = gpu["machine_info"], gpu["higher_func"]
    on_gpu = info["device"].startswith("cuda")
    tables, reasons = _workload_tables(gpu, "### GPU workload")
    memory = _memory_table(gpu)
    return [
        "## On a GPU" if on_gpu else f"## The gpu preset on the {info['device']} (no GPU figures)",
        "",
        f"The `{meta['mode']}` preset (`.ci/gpu-check`, {meta['elapsed_s']} s) on "
        f"{info.get('gpu', info['device'])}, {date(gpu['datetime'])}, torch "
        f"{info['libraries']['torch']}: a run of its own, so compare ratios, not seconds, "
        f"with the tables above. Peak memory: {info['memory_method']}.",
        "",
        *tables,
        *(["### GPU peak memory (workload 6)", "", memory, ""] if memory else []),
        *["### GPU targets", "", _targets_table(gpu), ""],
        *_footnotes("### GPU: skipped or failed", reasons),
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
    all_cases, all_impls = cases(report), list(report["higher_func"]["implementations"])
    timed = list(_timed(report))
    impls = [i for i in all_impls if i != BASELINE]
    colour = {impl: f"C{n % 10}" for n, impl in enumerate(all_impls)}  # tab10 has ten
    fig = plt.figure(figsize=(10, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.15, 1))
    speed = fig.add_subplot(grid[0, :])
    width = 0.8 / max(len(impls), 1)
    for n, impl in enumerate(impls):
        values = []
        for key in timed:
            base = all_cases[key].get(BASELINE, {}).get("median_s")
            mine = all_cases[key].get(impl, {}).get("median_s")
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
        keys = [k for k in all_cases if k.startswith(f"6-{mode}-")]
        steps = [int(k.rsplit("-", 1)[1]) for k in keys]
        for impl in all_impls:
            peaks = [all_cases[k].get(impl, {}).get("peak_bytes") for k in keys]
            if steps and all(p is not None for p in peaks):
                megabytes = [p / MB for p in peaks]
                memory.plot(steps, megabytes, marker="o", label=impl, color=colour[impl])
        memory.set_xlabel("inner steps")
        memory.set_ylabel("peak memory growth (MB)")
        memory.set_title(f"Memory of one meta-iteration, {name}")
        memory.legend(fontsize=9)
    info = report["machine_info"]
    title = f"{info['cpu'].get('brand_raw')}, torch {info['libraries']['torch']}"
    fig.suptitle(f"{title}, {date(report['datetime'])}", fontsize=10)
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
