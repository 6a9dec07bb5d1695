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


def plan_layout(
    width: int, height: int, zeroth_order: bool, zoomed: str | None = None, idle: frozenset[str] = frozenset()
) -> DashboardLayout:
    """The layout for a screen of width x height cells (the whole terminal). `idle`: chart panels that
    cannot have data yet (interplay, zo before the policy stage); their room goes to the others."""
    if zoomed is not None:
        return DashboardLayout(1, 1, {zoomed: (1, 1)})
    if width >= 140 and height >= 40:
        side = [
            panel for panel in ("interplay", "zo") if panel not in idle and (zeroth_order or panel != "zo")
        ]
        if len(side) == 2:
            spans = {
                "curves": (2, 4),
                "interplay": (1, 2),
                "zo": (1, 2),
                "hardware": (1, 1),
                "samples": (2, 2),
                "events": (1, 1),
            }
        elif side:
            spans = {
                "curves": (2, 4),
                side[0]: (1, 2),
                "hardware": (1, 2),
                "samples": (2, 2),
                "events": (1, 2),
            }
        else:
            spans = {"curves": (2, 4), "hardware": (1, 4), "samples": (2, 2), "events": (1, 2)}
        return DashboardLayout(3, 6, spans)
    if width >= 100 and height >= 30:
        side = "zo" if zeroth_order else "interplay"
        if side in idle:
            return DashboardLayout(2, 3, {"curves": (2, 2), "events": (2, 1)})
        return DashboardLayout(2, 3, {"curves": (2, 2), side: (1, 1), "events": (1, 1)})
    if height >= 18:
        return DashboardLayout(1, 3, {"curves": (1, 2), "events": (1, 1)})
    return DashboardLayout(1, 1, {"curves": (1, 1)})


def panel_order(zeroth_order: bool) -> list[str]:
    """The panels a run has, in order (no zeroth-order panel for first-order runs)."""
    return [panel for panel in PANELS if zeroth_order or panel != "zo"]
