"""The case table of docs/models.md: real models on every path, measured.

For each tiny random-init model of ``tests/real_model_cases.py`` (transformers, timm,
torch's own attention, LSTM and spectral-norm models), in float64, 2 tasks, 2 SGD steps:

* drop-in: ``innerloop_ctx`` second order against a hand-written MAML on math attention;
  "fused kernels": whether it also runs with ``set_double_backward_attention(False)``;
* functional: ``FunctionalModel`` + ``meta_loss`` (one task at a time) against the same;
* batched: ``MetaObjective`` (``batching="auto"``: vmap, or the loop it falls back to)
  against the per-task drop-in path, and whether ``batching="vmap"`` alone works;
* compiled (``--compile``): ``compiled(objective.value_and_grad, backend=...)`` against
  the eager batched path.

Each entry is "max |difference|" over the query losses and the meta-gradients, or the
error.  Run ``PYTHONPATH=. python benchmarks/real_models.py [--compile] [--backend aot_eager]``;
cases whose package cannot be imported are listed as skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import real_model_cases as cases

import higher_func as hf


def _try(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"fails: {type(error).__name__}: {text[:90]}"


def _diff(actual: tuple[Any, list], expected: tuple[Any, list]) -> float:
    return cases.max_abs_diff([actual[0], *actual[1]], [expected[0], *expected[1]])


def _per_task(fn: Callable[[cases.Case, int], tuple[Any, list]], case: cases.Case) -> tuple:
    results = [fn(case, t) for t in range(cases.TASKS)]
    losses = torch.stack([loss for loss, _ in results])
    grads = [torch.stack(g).sum(0) for g in zip(*(g for _, g in results), strict=True)]
    return losses, grads


def measure(case: cases.Case, compile_backend: str | None) -> dict[str, str]:
    row: dict[str, str] = {"model": case.name}
    reference = _per_task(cases.reference_meta_gradient, case)
    start = time.perf_counter()
    drop_in = _per_task(cases.drop_in_meta_gradient, case)
    row["drop-in s"] = f"{time.perf_counter() - start:.2f}"
    row["drop-in"] = f"{_diff(drop_in, reference):.1e}"

    def fused() -> str:
        with hf.set_double_backward_attention(False):
            _per_task(cases.drop_in_meta_gradient, case)
        return "runs"

    row["drop-in, fused kernels"] = _try(fused)
    row["functional"] = _try(
        lambda: f"{_diff(_per_task(cases.functional_meta_gradient, case), reference):.1e}"
    )

    def batched() -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            result = cases.batched_meta_gradient(case, "auto")
            row["batched s"] = f"{time.perf_counter() - start:.2f}"
        fell_back = any("loop" in str(w.message) for w in caught)
        how = "loop (auto)" if fell_back else "vmap"
        return f"{how} {_diff(result, drop_in):.1e}"

    row["batched"] = _try(batched)
    row["vmap only"] = _try(lambda: (cases.batched_meta_gradient(case, "vmap"), "runs")[1])
    if compile_backend is not None:
        row["compiled"] = _try(lambda: _compiled(case, compile_backend))
    return row


def _compiled(case: cases.Case, backend: str) -> str:
    opt = torch.optim.SGD(case.model.parameters(), lr=cases.LR)
    objective = hf.MetaObjective(case.model, opt, case.loss, steps=cases.STEPS)
    support, query = case.tasks(batched=True)
    value, grads = objective.value_and_grad(support, query)
    torch._dynamo.reset()  # each model compiled afresh (value_and_grad is one code object)
    start = time.perf_counter()
    fast = hf.func.compiled(objective.value_and_grad, backend=backend)
    compiled_value, compiled_grads = fast(support, query)
    seconds = time.perf_counter() - start
    difference = cases.max_abs_diff(
        [compiled_value, *compiled_grads.values()], [value, *grads.values()]
    )
    return f"{difference:.1e} ({seconds:.0f} s to compile)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also the compiled path (slow)")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend")
    parser.add_argument("--only", default="", help="comma-separated case names (builders)")
    args = parser.parse_args()
    wanted = {name for name in args.only.split(",") if name}
    rows, skipped = [], []
    for package, builders in cases.TABLE_BUILDERS.items():
        module, reason = (torch, "") if package == "torch" else cases.import_or_reason(package)
        for builder in builders:
            if wanted and builder.__name__ not in wanted:
                continue
            if module is None:
                skipped.append(f"{builder.__name__}: {reason}")
                continue
            torch.manual_seed(0)
            rows.append(measure(builder(module), args.backend if args.compile else None))
            print(rows[-1], file=sys.stderr, flush=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(f"torch {torch.__version__}, float64, {cases.TASKS} tasks, {cases.STEPS} SGD steps\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row.get(column, "") for column in columns) + " |")
    for line in skipped:
        print(f"\nskipped {line}")


if __name__ == "__main__":
    main()
