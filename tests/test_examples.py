"""Every example runs at its tiny size, documents its options, and needs no optional extra.

Each example is run as a user runs it (``python examples/NAME.py --tiny``) in a fresh
process and a temporary directory. Slow-marked: starting torch in a new interpreter takes
seconds per example, so these run in CI's second pass and in ``tox -e examples``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# example -> (a line its tiny run prints, the plot it saves or None)
CASES = {
    "maml_sinusoid": ("held-out task, after", "maml_sinusoid.png"),
    "maml_omniglot": ("held-out query accuracy", "maml_omniglot.png"),
    "meta_sgd": ("learned lr of", "meta_sgd.png"),
    "hyperparameter_optimization": ("validation loss", "hyperparameter_optimization.png"),
    "optimize_inputs": ("test MSE", "optimize_inputs.png"),
    "lr_schedule": ("learned schedule", "lr_schedule.png"),
    "batched_compiled_maml": ("seconds per meta-iteration", None),
    "distributed_maml": ("1 process(es)", None),
    "imaml": ("peak live tensor MiB", "imaml.png"),
    "implicit_hyperparameters": ("Neumann hypergradient", "implicit_hyperparameters.png"),
}

pytestmark = pytest.mark.slow


def run_example(arguments: list[str], cwd: Path, prelude: str = "") -> str:
    """Run ``python [-c prelude+runpy] examples/...`` and return its output; fail loudly."""
    # The examples' folder and this checkout's root: the examples run the code under test.
    path = os.pathsep.join([str(EXAMPLES), str(EXAMPLES.parent)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.pop("WORLD_SIZE", None)
    script, *rest = arguments
    if prelude:
        code = (
            f"{prelude}\nimport runpy, sys\nsys.argv = {[script, *rest]!r}\n"
            f"runpy.run_path({script!r}, run_name='__main__')"
        )
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, *arguments]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(arguments)} exited {done.returncode}:\n{output}"
    return output


def test_every_example_is_covered() -> None:
    found = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    assert found - {"quickstart"} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiny_run(name: str, tmp_path: Path) -> None:
    expected_line, plot = CASES[name]
    output = run_example([str(EXAMPLES / f"{name}.py"), "--tiny"], tmp_path)
    assert expected_line in output
    if plot is not None and HAS_MATPLOTLIB:
        assert (tmp_path / plot).stat().st_size > 0, f"{name} saved no {plot}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_help_documents_options(name: str, tmp_path: Path) -> None:
    output = run_example([str(EXAMPLES / f"{name}.py"), "--help"], tmp_path)
    assert "--tiny" in output and "usage:" in output
    assert "(default:" in output, f"{name} --help does not show the defaults"


def test_runs_without_the_optional_extras(tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import matplotlib` / `import tqdm` raise ImportError.
    block = "import sys\nfor m in ('matplotlib', 'tqdm', 'tqdm.auto'): sys.modules[m] = None"
    script = str(EXAMPLES / "maml_sinusoid.py")
    output = run_example([script, "--tiny"], tmp_path, prelude=block)
    assert "matplotlib is not installed" in output
    assert not (tmp_path / "maml_sinusoid.png").exists()


def test_omniglot_reads_a_folder_of_images(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path / "images_background" / "Alphabet"
    for c in range(6):  # 6 classes of 4 drawings each, Omniglot's layout
        folder = root / f"character{c:02d}"
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = bytes(
                255 if (x + y + 3 * c + i) % (c + 3) else 0 for y in range(105) for x in range(105)
            )
            image_module.frombytes("L", (105, 105), pixels).save(folder / f"{c}_{i}.png")
    arguments = ["--tiny", "--ways", "2", "--shots", "1", "--queries", "2", "--test-classes", "2"]
    output = run_example(
        [str(EXAMPLES / "maml_omniglot.py"), *arguments, "--data-dir", str(tmp_path)], tmp_path
    )
    assert "read 6 classes" in output and "4 to meta-train, 2 held out" in output
    assert "held-out query accuracy" in output
