"""The samples panel: the latest prompts, responses and their reward-model and gold scores."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable

from engine.rundir.report import fmt_value
from zopro_tui.view import CurveView
from zopro_tui.watched import WatchedRun
from zopro_tui.widgets.panel import Panel
from zopro_tui.widgets.text import printable


class SamplesPanel(Panel):
    """A table of the newest samples file (train rollouts or held-out evaluation)."""

    FEEDS = frozenset({"samples"})
    BINDINGS = [Binding("a", "answers_side_by_side", "Two evaluations' answers side by side")]

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__("samples", id=id, classes=classes)
        self._shown = ""
        self._run_dir: Path | None = None

    def compose(self) -> ComposeResult:
        table = DataTable(zebra_stripes=True, cursor_type="none", show_cursor=False)
        table.can_focus = False
        yield table

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("it", key="it", width=3)
        table.add_column("prompt", key="prompt")
        table.add_column("RM", key="score", width=6)
        table.add_column("gold", key="gold", width=5)
        table.add_column("response", key="response")
        table.display = False

    def show_run(self, run: WatchedRun, view: CurveView, data_range: tuple[float, float] | None) -> None:
        self._run_dir = run.path
        if run.samples_source == self._shown:
            return
        self._shown = run.samples_source
        table = self.query_one(DataTable)
        table.clear()
        for row in run.samples:
            iteration = row.get("iteration")
            table.add_row(
                "-" if iteration is None else str(iteration + 1),  # read from 1, as the header
                printable(row.get("prompt"), 36),
                Text(fmt_value(row.get("score")), justify="right"),
                Text(fmt_value(row.get("gold"), 2), justify="right"),
                printable(row.get("response")),
            )
        table.display = bool(run.samples)
        kind = run.samples[0].get("kind", "") if run.samples else ""
        step = run.samples_source.removeprefix("samples-").removesuffix(".jsonl").lstrip("0") or "0"
        self.border_title = f"samples ({kind}, step {step})" if run.samples else "samples"
        self.border_subtitle = "" if run.samples else "waiting for the first samples file"

    def action_answers_side_by_side(self) -> None:
        from zopro_tui.screens.answers import AnswersScreen

        if self._run_dir is not None:
            self.app.push_screen(AnswersScreen(self._run_dir))

    def render(self) -> Text:
        return Text("waiting for samples: written after the first evaluation", style="dim italic")

    def action_scroll_panel(self, direction: int) -> None:
        table = self.query_one(DataTable)
        table.scroll_to(y=table.scroll_y + direction * max(1, table.size.height - 2), animate=False)
