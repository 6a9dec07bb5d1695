"""The help screen: every key of the screen below it, from its declared bindings, and what the views mean."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

NOTES = {
    "RunsScreen": "Runs under the root folder, refreshed every second. Status is derived from the run directory:\n"
    "running, paused, finished, failed, stopped, or stale (no heartbeat for a minute, or the\n"
    "process is gone). Runs started here run detached: quitting leaves them running.",
    "DashboardScreen": "Curves are drawn from every point: each screen column shows the min and max of its points,\n"
    "so spikes stay visible. With smoothing on, raw values are dim under the EMA line.\n"
    "The cursor (h/l) reads every chart at the same x; +/- zoom around it; 0 resets.\n"
    "Controls write requests into the run's control/ folder; the engine acts between steps.",
    "CompareScreen": "Runs overlaid on one x axis: step, wall time, or forward passes (compute), so zeroth-order\n"
    "and first-order runs compare at equal compute. The table reads each run's latest values.",
    "SweepScreen": "A sweep as one thing: its points sorted by a final metric (m; r reverses), with standard errors\n"
    "where the evaluation logged them, and that metric against a swept key (k; log10 when the values\n"
    "span a decade). enter opens a point's dashboard, o overlays every point in the compare screen.",
    "QueueScreen": "Recipes run one after another by a detached worker (zopro queue work): quitting the TUI or\n"
    "losing SSH leaves it working. a queues a recipe, K/J reorder pending entries, d cancels\n"
    "(a running entry stops after a checkpoint).",
}


def key_label(binding: Binding) -> str:
    keys = []
    for key in binding.key.split(","):
        keys.append(
            {
                "question_mark": "?",
                "plus": "+",
                "minus": "-",
                "equals_sign": "=",
                "slash": "/",
                "space": "space",
                "escape": "esc",
                "enter": "enter",
                "pageup": "pgup",
                "pagedown": "pgdn",
            }.get(key, key)
        )
    return " ".join(keys)


def bindings_table(screen: Screen) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    seen: set[str] = set()
    focused = screen.focused
    own = list(getattr(type(focused), "BINDINGS", [])) if focused is not None else []
    sources = [("this screen", own + list(screen.BINDINGS)), ("everywhere", screen.app.BINDINGS)]
    for title, bindings in sources:
        table.add_row(Text(title, style="bold underline"), "")
        for binding in bindings:
            if not isinstance(binding, Binding) or not binding.description or binding.description in seen:
                continue
            seen.add(binding.description)
            table.add_row(key_label(binding), binding.description)
        table.add_row("", "")
    table.add_row("ctrl+p", "command palette: every action by name")
    table.add_row("tab", "move the focus")
    return table


class HelpScreen(ModalScreen[None]):
    """Keys of the screen it was opened from."""

    BINDINGS = [
        Binding("escape,question_mark,q", "close", "Close"),
        Binding("j,down", "scroll(1)", "Scroll down", show=False),
        Binding("k,up", "scroll(-1)", "Scroll up", show=False),
    ]

    def __init__(self, below: Screen):
        super().__init__()
        self.below = below

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="help") as scroll:
            scroll.border_subtitle = (
                "esc, ? or q: close · j/k scroll"  # in sight at 80x24, never scrolled away
            )
            yield Static(
                Text.assemble(
                    (
                        f"zopro-tui · keys of the "
                        f"{self.below.__class__.__name__.removesuffix('Screen').lower()} screen",
                        "bold",
                    ),
                    ("   esc, ? or q: close", "dim"),
                )
            )
            yield Static(bindings_table(self.below))
            note = NOTES.get(self.below.__class__.__name__)
            if note:
                yield Static(Text(note, style="dim"))
            yield Static(Text("esc, ? or q: close", style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)

    def action_scroll(self, lines: int) -> None:
        help_box = self.query_one("#help", VerticalScroll)
        help_box.scroll_to(y=help_box.scroll_y + lines, animate=False)
