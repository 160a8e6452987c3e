"""Griffe extension for the API pages: read ``Example:`` sections as code examples.

Griffe's Google-style parser recognises only the plural ``Examples:`` as a section of
``>>>`` code examples and renders the singular ``Example:`` as a Markdown admonition, where
doctest output such as ``[29.0, 30.0]`` turns into broken links. Several ``curvops`` docstrings
use the singular title; this extension renames it before the docstrings are parsed.
"""

from __future__ import annotations

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: D102
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
