"""Fitting a table of runs into the width there is: names shortened in the middle (two runs that differ only
at the end stay apart), then the columns that matter least dropped first. `zopro ls` and the TUI's runs
screen fit the same way."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

ELLIPSIS = "…"


def printable(text: str) -> str:
    """`text` with its control characters (an escape sequence in a folder name) shown as `?`, so that a name
    never reaches the terminal raw."""
    return "".join("?" if unicodedata.category(char) == "Cc" else char for char in text)


def middle_ellipsis(text: str, width: int) -> str:
    """`tiny-compare-rl…-120455` for a name longer than `width`: the start and the end kept, which tell runs
    apart (the recipe's name and the time); control characters shown as `?` (`printable`)."""
    text = printable(text)
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    if width == 1:
        return ELLIPSIS
    tail = (width - 1) // 2
    head = width - 1 - tail
    return text[:head] + ELLIPSIS + text[len(text) - tail :]


@dataclass(frozen=True)
class Column:
    """A column: its key, its header, its rank (1 matters most; the highest rank is dropped first) and, for the
    one column that may shrink (the name), the narrowest it may become."""

    key: str
    header: str
    rank: int
    shrink_to: int | None = None


def fit_columns(
    columns: list[Column], widths: dict[str, int], available: int, gap: int = 1
) -> tuple[list[Column], dict[str, int]]:
    """The columns that fit in `available` cells (`gap` between neighbours) and their widths: `widths` holds
    each column's natural width (its widest cell or header). The shrinkable column gives way first, down to
    its `shrink_to`; then columns are dropped, the highest rank first, keeping the order of the rest."""
    shown = list(columns)
    sized = natural_widths(columns, widths)

    def total() -> int:
        return sum(sized[column.key] for column in shown) + gap * max(0, len(shown) - 1)

    for column in shown:
        if column.shrink_to is not None and total() > available:
            sized[column.key] = max(column.shrink_to, sized[column.key] - (total() - available))
    while total() > available and len(shown) > 1:
        shown.remove(max(shown, key=lambda column: column.rank))
    for column in shown:  # what a dropped column freed goes back to the shrunk one
        if column.shrink_to is not None:
            slack = available - total()
            sized[column.key] = min(
                natural_widths(columns, widths)[column.key], sized[column.key] + max(0, slack)
            )
    for column in shown:  # the last resort: the shrinkable column below its floor
        if column.shrink_to is not None and total() > available:
            sized[column.key] = max(len(column.header), sized[column.key] - (total() - available))
    return shown, {column.key: sized[column.key] for column in shown}


def natural_widths(columns: list[Column], widths: dict[str, int]) -> dict[str, int]:
    return {column.key: max(widths.get(column.key, 0), len(column.header)) for column in columns}
