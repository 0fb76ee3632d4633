"""A griffe extension so the API pages render higher_func's docstrings as written.

The docstrings follow the Google style, with a few reStructuredText habits that read well in
``help()``: an ``Example:`` (or ``Example (caption):``) section of doctests, ``.. math::``
blocks, ``:func:`name``` roles, and ``Args:`` entries that document several names at once
on wrapped lines. Before griffe parses a docstring this rewrites them into what
mkdocstrings renders: an ``Examples:`` section (code, not quoted text), a display-math
block, inline code, and one line per entry. The source docstrings stay unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Examples?(?:\s*\((.*)\))?:\s*$", re.MULTILINE)
# An "Args:" entry whose list of names wraps: "a, b, c,\n        d: as in f."
_WRAPPED_NAMES = re.compile(r"^(\s*[\w, ]+,)\n\s+(?=[\w, ]+:)", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`~?([^`]+)`")
_MATH = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+\S.*\n?)+)", re.MULTILINE
)


def _math_block(match: re.Match[str]) -> str:
    indent = match["indent"]
    body = "\n".join(line.strip() for line in match["body"].splitlines())
    return f"{indent}$$\n{indent}{body}\n{indent}$$\n"


def _examples_heading(match: re.Match[str]) -> str:
    indent, caption = match[1], match[2]
    return f"{indent}Examples:" + (f"\n{indent}    {caption}:\n" if caption else "")


def _inline_code(match: re.Match[str]) -> str:
    shown = match[1].rsplit(".", 1)[-1] if match[0].count("`~") else match[1]
    return f"``{shown}``"


def rewrite(docstring: str) -> str:
    """The docstring with rST examples headings, roles and math turned into Markdown."""
    docstring = _EXAMPLE_HEADING.sub(_examples_heading, docstring)
    docstring = _WRAPPED_NAMES.sub(r"\1 ", docstring)
    docstring = _ROLE.sub(_inline_code, docstring)
    return _MATH.sub(_math_block, docstring)


class RestructuredTextHabits(griffe.Extension):
    """Rewrite every docstring with :func:`rewrite` as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
