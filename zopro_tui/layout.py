"""Which dashboard panels fit a terminal of a given size, and where: fewer panels as the terminal shrinks."""

from __future__ import annotations

from dataclasses import dataclass

PANELS = ("curves", "interplay", "zo", "hardware", "samples", "events")
PANEL_TITLES = {
    "curves": "curves",
    "interplay": "policy-reward interplay",
    "zo": "zeroth-order",
    "samples": "samples",
    "events": "events",
    "hardware": "hardware",
}


@dataclass(frozen=True)
class DashboardLayout:
    """A grid of `columns` x `rows` equal cells; each shown panel spans (columns, rows) of them. Textual
    places grid children in DOM order (PANELS), always forward, so the spans are chosen to tile that way."""

    columns: int
    rows: int
    spans: dict[str, tuple[int, int]]

    def shows(self, panel: str) -> bool:
        return panel in self.spans


def plan_layout(width: int, height: int, zeroth_order: bool, zoomed: str | None = None) -> DashboardLayout:
    """The layout for a screen of width x height cells (the whole terminal)."""
    if zoomed is not None:
        return DashboardLayout(1, 1, {zoomed: (1, 1)})
    if width >= 140 and height >= 40:
        if zeroth_order:
            spans = {
                "curves": (2, 4),
                "interplay": (1, 2),
                "zo": (1, 2),
                "hardware": (1, 1),
                "samples": (2, 2),
                "events": (1, 1),
            }
        else:
            spans = {
                "curves": (2, 4),
                "interplay": (1, 2),
                "hardware": (1, 2),
                "samples": (2, 2),
                "events": (1, 2),
            }
        return DashboardLayout(3, 6, spans)
    if width >= 100 and height >= 30:
        side = "zo" if zeroth_order else "interplay"
        return DashboardLayout(2, 3, {"curves": (2, 2), side: (1, 1), "events": (1, 1)})
    if height >= 18:
        return DashboardLayout(1, 3, {"curves": (1, 2), "events": (1, 1)})
    return DashboardLayout(1, 1, {"curves": (1, 1)})


def panel_order(zeroth_order: bool) -> list[str]:
    """The panels a run has, in order (no zeroth-order panel for first-order runs)."""
    return [panel for panel in PANELS if zeroth_order or panel != "zo"]
