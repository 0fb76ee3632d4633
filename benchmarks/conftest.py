"""pytest-benchmark set-up: options, and running one implementation on one workload.

Not collected by the default ``python -m pytest`` (``testpaths`` is ``tests`` and
``higher_func``).  Run ``python -m pytest benchmarks`` (``tox -e bench``); options:
``--bench-device cuda``, ``--bench-compile`` (include the compiled paths, 30-140 s of
compiling each on a 2-core CPU), ``--bench-compile-conv`` (compile the conv workload too:
more than 10 minutes), ``--bench-threads N`` (default 1), ``--bench-rounds N`` (default 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import harness
import implementations
import pytest
import torch
import workloads


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("higher_func benchmarks")
    group.addoption("--bench-device", default="cpu", help="cpu (default) or cuda")
    group.addoption("--bench-compile", action="store_true", help="run the compiled paths")
    group.addoption(
        "--bench-compile-conv", action="store_true", help="also compile the conv workload"
    )
    group.addoption("--bench-threads", type=int, default=1, help="torch threads (0: default)")
    group.addoption("--bench-rounds", type=int, default=3, help="timed rounds per case")


@pytest.fixture(scope="session")
def suite(request: pytest.FixtureRequest) -> dict[str, workloads.Workload]:
    device = request.config.getoption("--bench-device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: torch.cuda.is_available() is False")
    implementations.COMPILE_CONV = request.config.getoption("--bench-compile-conv")
    threads = request.config.getoption("--bench-threads")
    if threads:
        torch.set_num_threads(threads)
    return {w.key: w for w in workloads.suite(device)}


@pytest.fixture
def run_case(
    benchmark: Any, suite: dict[str, workloads.Workload], request: pytest.FixtureRequest
) -> Callable[[str, str], None]:
    """``run_case(workload_key, implementation_key)``: warm up, then time with pytest-benchmark.

    Skips with the implementation's message when it cannot run (library missing, workload
    not applicable, compiled path without ``--bench-compile``).  Records the first
    iteration's time and the peak memory in the benchmark's ``extra_info``.
    """
    config = request.config

    def run(workload_key: str, implementation_key: str) -> None:
        workload = suite[workload_key]
        impl = implementations.by_key()[implementation_key]
        if impl.compiled and not config.getoption("--bench-compile"):
            pytest.skip("compiled path: pass --bench-compile (compiling takes 30-140 s each)")
        try:
            runner = impl.build(workload)
        except implementations.Unavailable as error:
            pytest.skip(f"{implementation_key}: {error}")
        device = config.getoption("--bench-device")
        first = harness.seconds(runner.iteration)
        benchmark.group = f"workload {workload_key}: {workload.problem.title}"
        benchmark.extra_info["first_iteration_s"] = first
        benchmark.extra_info["peak_bytes"] = harness.peak_memory(runner.iteration, device)
        benchmark.extra_info["memory_method"] = harness.memory_method(device)
        rounds = 1 if workload.family == "memory" else config.getoption("--bench-rounds")

        def iteration() -> None:
            runner.iteration()
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        benchmark.pedantic(iteration, rounds=rounds, iterations=1, warmup_rounds=0)

    return run
