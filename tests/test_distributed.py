"""Meta-training on torch.distributed equals one process running every task.

``examples/distributed_maml.py`` is launched twice: with ``torchrun`` as 2 CPU processes on
the gloo backend (each rank adapting to its share of the tasks, meta-gradients all-reduced),
and as one plain process with no process group at all (the reference). After a few
meta-steps of Adam the meta-parameters must agree in float64 to rounding.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_maml.py"
# 5 tasks over 2 ranks: shares of 3 and 2, so uneven shares are covered too.
ARGS = ["--iterations", "3", "--tasks", "5", "--shots", "4", "--inner-steps", "2"]
ARGS += ["--dtype", "float64", "--meta-lr", "0.01"]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)  # the reference must not find a process group
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow  # three interpreters start torch: 20-40 s on a 2-core machine
def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    output = run([sys.executable, str(EXAMPLE), *ARGS, "--save", str(single)], tmp_path)
    assert "1 process(es)" in output
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    output = run(
        [*torchrun, str(EXAMPLE), *ARGS, "--backend", "gloo", "--save", str(multi)], tmp_path
    )
    assert "2 process(es)" in output

    reference, distributed = torch.load(single), torch.load(multi)
    initial = _initial_parameters()
    assert reference.keys() == distributed.keys() == initial.keys()
    for name, value in reference.items():
        assert value.dtype == torch.float64
        # The meta-steps moved the parameters, so agreement is not trivially the init.
        assert not torch.allclose(value, initial[name], rtol=0, atol=1e-6), name
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12)


def _initial_parameters() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from _common import sinusoid_mlp
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    torch.manual_seed(0)  # the example's --seed default
    return {k: v.double() for k, v in sinusoid_mlp().state_dict().items()}
