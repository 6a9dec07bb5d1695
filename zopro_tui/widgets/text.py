"""Model text in a terminal cell."""

from __future__ import annotations


def printable(text: object, limit: int = 400) -> str:
    """Model output made safe for a terminal cell, on one line: a line break shows as '⏎', runs of
    spaces fold, other control characters become '·' (`zopro status --samples` prints answers whole)."""
    value = "" if text is None else str(text)
    lines = (" ".join(line.split()) for line in value.strip().splitlines())
    flat = " ⏎ ".join(line for line in lines if line)
    return "".join(ch if ch.isprintable() else "·" for ch in flat[:limit])
