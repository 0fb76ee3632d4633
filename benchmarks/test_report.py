"""The harness and the report themselves: interleaving, agreement, targets, JSON, the page.

Fast (no workload is timed for real); run with ``python -m pytest benchmarks/test_report.py``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import harness
import pytest
import render
import report
import torch
from implementations import Implementation, Runner
from pytest_benchmark.storage.file import FileStorage
from workloads import Workload

SAVED = Path(__file__).resolve().parent / "results" / "latest.json"


def fake(key: str, log: list[str], values: list[float], fail_at: int | None = None):
    """An implementation whose iterations log their key (and fail at call ``fail_at``)."""
    calls = []

    def iteration() -> None:
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("boom")
        log.append(key)

    runner = Runner(iteration, check_values=lambda: [torch.tensor(values, dtype=torch.float64)])
    return Implementation(key, key, {"maml": lambda problem: runner})


def test_rounds_interleave_with_a_rotating_start_and_alternating_order() -> None:
    log: list[str] = []
    impls = [fake(k, log, [1.0]) for k in "abc"]
    cases = harness.run_workload(
        Workload("w", "maml", None), impls, rounds=6, device="cpu", reference="a"
    )
    rounds = [log[3 + 3 * r : 6 + 3 * r] for r in range(6)]  # after one warm-up call each
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) >= 4  # not one fixed order
    predecessors = {k: {r[r.index(k) - 1] for r in rounds if r.index(k)} for k in "abc"}
    assert all(len(p) == 2 for p in predecessors.values())  # each follows both others
    assert all(case.stats.rounds == 6 for case in cases.values())


def test_agreement_is_measured_against_the_reference() -> None:
    log: list[str] = []
    impls = [fake("ref", log, [2.0, -4.0]), fake("off", log, [2.0, -4.004])]
    cases = harness.run_workload(
        Workload("w", "maml", None), impls, rounds=1, device="cpu", reference="ref"
    )
    assert cases["ref"].extra_info["deviation_from_reference"] == 0.0
    assert cases["off"].extra_info["deviation_from_reference"] == pytest.approx(1e-3)


def test_a_failing_implementation_is_reported_and_no_longer_timed() -> None:
    log: list[str] = []
    impls = [fake("ok", log, [1.0]), fake("bad", log, [1.0], fail_at=3)]
    cases = harness.run_workload(
        Workload("w", "maml", None), impls, rounds=4, device="cpu", reference="ok"
    )
    assert cases["bad"].status == "failed"
    assert re.match(
        r"failed at round 1: RuntimeError: boom \(test_report.py:\d+\)", cases["bad"].message
    )
    assert cases["ok"].stats.rounds == 4


def _report(medians: dict[tuple[str, str], float], peaks: dict[tuple[str, str], int]) -> dict:
    keys = {w for w, _ in medians} | {w for w, _ in peaks}
    benchmarks = [
        {
            "params": {"workload": w, "implementation": i},
            "name": i,
            "stats": {"median": medians.get((w, i), 1.0)},
            "extra_info": {"peak_bytes": peaks.get((w, i))},
        }
        for w, i in {*medians, *peaks}
    ]
    return {
        "benchmarks": benchmarks,
        "higher_func": {
            "workloads": {
                k: {"title": k, "family": "memory" if k.startswith("6-") else "maml"}
                for k in sorted(keys)
            },
            "implementations": dict.fromkeys(["higher", report.DROP_IN, report.LOOP], ""),
            "not_run": [],
        },
    }


def test_targets_are_issue_11s_with_their_status() -> None:
    medians = {
        ("1", "higher"): 1.25,
        ("1", report.DROP_IN): 1.0,  # 1.25x: below the sinusoid's 1.3x
        ("3", "higher"): 1.05,
        ("3", report.DROP_IN): 1.0,  # 1.05x: at least 1.0x
        ("7", "higher"): 1.2,
        ("7", report.DROP_IN): 1.12,
        ("7", report.LOOP): 1.0,  # 1.12x the hand-written loop's time: above 1.1x
        ("8", report.DROP_IN): 1.0,  # higher and the loop were not measured
    }
    peaks = {("6-tracked-5", "higher"): 100, ("6-tracked-5", report.DROP_IN): 90}
    targets = {t["target"]: t for t in report.check_targets(_report(medians, peaks))}
    status = {name: (t["goal"], t["status"]) for name, t in targets.items()}
    assert status == {
        "workload 1: innerloop_ctx vs higher (x faster)": (">= 1.3", "not met"),
        "workload 3: innerloop_ctx vs higher (x faster)": (">= 1.0", "met"),
        "workload 7: innerloop_ctx vs higher (x faster)": (">= 1.0", "met"),
        "workload 8: innerloop_ctx vs higher (x faster)": (">= 1.0", "not measured"),
        "workload 7: innerloop_ctx / torch.func loop (time)": ("<= 1.1", "not met"),
        "workload 8: innerloop_ctx / torch.func loop (time)": ("<= 1.1", "not measured"),
        "memory: innerloop_ctx / higher, peak, tracked, 5 steps": ("<= 1.0", "met"),
    }
    assert targets["workload 1: innerloop_ctx vs higher (x faster)"]["measured"] == 1.25


def test_the_saved_report_is_pytest_benchmark_json(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, logger=logging.getLogger("test"))
    loaded = list(storage.load_benchmarks(str(SAVED)))
    saved = json.loads(SAVED.read_text())
    assert len(loaded) == len(saved["benchmarks"]) > 100
    assert all(b["median"] > 0 and b["group"].startswith("workload ") for b in loaded)


def test_the_saved_report_renders_every_section() -> None:
    saved = json.loads(SAVED.read_text())
    page = render.markdown_report(saved, "performance.png", "")
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Where these figures come from",
        "## At a glance",
        "## Time per meta-iteration",
        "## Peak memory (workload 6)",
        "## When a parameter group is stepped flat",
        "## How a rule's kernel runs while autograd records",
        "## Long unrolls",
        "## Targets and status",
        "## Implementations",
        "## Method",
        "## Skipped or failed",
    ]
    assert "$" not in page.replace("$PWD", "")  # every template field was filled in
    timed = [k for k, w in saved["higher_func"]["workloads"].items() if w["family"] != "memory"]
    assert [f"### Workload {k}:" in page for k in timed] == [True] * len(timed)
    for target in saved["higher_func"]["targets"]:
        assert f"| {target['target']} " in page


def test_a_merge_replaces_the_remeasured_workloads_and_marks_their_run() -> None:
    saved = json.loads(SAVED.read_text())
    new: dict[str, Any] = {
        "benchmarks": [b for b in saved["benchmarks"] if b["params"]["workload"] == "1"][:2],
        "datetime": "2030-01-02T03:04:00+00:00",
        "machine_info": {"load_average_at_start": [0.5], "libraries": {"torch": "x"}},
        "higher_func": {
            "mode": "quick",
            "workloads": {"1": saved["higher_func"]["workloads"]["1"]},
            "implementations": {},
            "not_run": [],
        },
    }
    out = report.merged(saved, new)
    ones = [b for b in out["benchmarks"] if b["params"]["workload"] == "1"]
    assert [b["name"] for b in ones] == [b["name"] for b in new["benchmarks"]]
    assert (
        len(out["benchmarks"])
        == len(saved["benchmarks"])
        - len([b for b in saved["benchmarks"] if b["params"]["workload"] == "1"])
        + 2
    )
    assert out["higher_func"]["workload_runs"]["1"]["date_utc"] == "2030-01-02 03:04 UTC"
    assert out["higher_func"]["targets"] != []


def test_the_gpu_preset_starts_no_workload_after_its_time_limit(monkeypatch) -> None:
    monkeypatch.setitem(report.PRESETS, "gpu", report.PRESETS["gpu"]._replace(time_limit_s=-1))
    options = "--preset gpu --workloads 1 --implementations higher --threads 0 --warm-compile-cache"
    args = report.parse_args(options.split())
    out = report.run(args)
    assert out["benchmarks"] == []
    (case,) = out["higher_func"]["not_run"]
    assert case["status"] == "skipped" and "time limit" in case["message"]
