"""The documentation's code runs, and its links to examples and pages point somewhere.

Every ```` ```python ```` block of a page runs, in order, in one namespace per page (so a
page reads as one program). Blocks fenced as ```` ```py ```` are illustrations that are not
run (they need torchrun, a GPU or a long training run); keep them few.
"""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest
import torch

import higher_func

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in DOCS.glob("*.md") if PYTHON_BLOCK.search(p.read_text())),
]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_python_blocks_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    torch.manual_seed(0)
    for number, block in enumerate(PYTHON_BLOCK.findall(page.read_text()), 1):
        try:
            exec(compile(block, f"{page.name} block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name}, python block {number} failed:\n{block}") from error


def test_pages_name_examples_and_files_that_exist() -> None:
    for page in DOCS.rglob("*.md"):
        for path in re.findall(r"\b(examples/[\w/]+\.py|tests/[\w/]+\.py)\b", page.read_text()):
            assert (ROOT / path).exists(), f"{page.name} mentions {path}, which does not exist"


def test_tests_named_in_the_docs_exist() -> None:
    """A claim "test X checks this" must name a real test (``file::name``, or ``::name`` for
    the same file as the previous reference on that line)."""
    for page in DOCS.rglob("*.md"):
        for line in page.read_text().splitlines():
            current = None
            for path, name in re.findall(r"(tests/\w+\.py)?::(test_\w+)", line):
                current = path or current
                assert current, f"{page.name}: ::{name} without a file before it"
                source = (ROOT / current).read_text()
                assert f"def {name}(" in source, f"{page.name}: {current}::{name} does not exist"


def test_every_page_is_in_the_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert page.relative_to(DOCS).as_posix() in config, f"{page} is not in mkdocs.yml's nav"


def test_every_public_name_has_a_runnable_example() -> None:
    """Every public name's docstring holds a ``>>>`` example (run by ``--doctest-modules``)."""
    missing = []
    for module in (
        higher_func,
        higher_func.optim,
        higher_func.func,
        higher_func.implicit,
        higher_func.patch,
        higher_func.utils,
    ):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue
            if ">>>" not in (inspect.getdoc(obj) or ""):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"public names without a >>> example: {missing}"
