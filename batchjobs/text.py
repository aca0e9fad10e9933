"""Plain-text tables for operators: columns padded to line up, no trailing blanks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The header line, then a line per row, each cell left-aligned in its column."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
