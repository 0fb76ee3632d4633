"""Pieces the examples share: sinusoid tasks, and progress bars and plots that are optional.

tqdm and matplotlib are optional (``pip install "higher_func[examples]"``): without them the
examples run the same, print their numbers and skip the picture.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's layout and shows every option's default."""


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """``iterable`` with a tqdm progress bar on a terminal when tqdm is installed, else as is.

    Print with :func:`write` while the bar runs, so lines and bar do not interleave.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())


def write(line: str) -> None:
    """Print ``line`` above a running progress bar (``tqdm.write``), or plainly without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line)
        return
    tqdm.write(line)


def pyplot() -> Any | None:
    """matplotlib's ``pyplot`` on a file-only backend, or ``None`` (with a note) without it."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib).")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sinusoid_tasks(
    n_tasks: int, shots: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Tasks ``y = a sin(x + b)``: ``(support, query, (amplitude, phase))``.

    ``support`` and ``query`` are ``(x, y)`` pairs of shape ``(n_tasks, shots, 1)``, drawn from
    ``x ~ U(-5, 5)``, ``a ~ U(0.1, 5)`` and ``b ~ U(0, pi)`` as in the MAML paper.
    """
    amplitude = torch.empty(n_tasks, 1, 1, dtype=dtype).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n_tasks, 1, 1, dtype=dtype).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(n_tasks, 2 * shots, 1, dtype=dtype).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x + phase)
    return (x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:]), (amplitude, phase)


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """The MAML paper's regressor: 1 -> hidden -> hidden -> 1 with ReLUs."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )
