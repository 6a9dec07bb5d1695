"""Two evaluations' answers to the same held-out prompts side by side (SFT against the newest by default),
from the run's samples files: the evaluation samples the same prompts on the same noise every time, so the
rows differ only by the policy. Opened with `a` from the samples panel."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from engine.rundir.answers import evaluation_answers, side_by_side
from engine.rundir.report import fmt_value
from zopro_tui.widgets.text import printable


class AnswersScreen(Screen[None]):
    """prompt | one evaluation's answer, RM, gold | another's answer, RM, gold."""

    BINDINGS = [
        Binding("left_square_bracket", "cycle(0)", "Left: another evaluation"),
        Binding("right_square_bracket", "cycle(1)", "Right: another evaluation"),
        Binding("escape,a", "back", "Back"),
    ]

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.answers: dict[str, list[dict]] = {}
        self.chosen: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static(id="answers-title")
        table = DataTable(zebra_stripes=True, cursor_type="row")
        yield table
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, key, width in (
            ("prompt", "prompt", 24),
            ("answer", "left", None),
            ("RM", "left_rm", 6),
            ("gold", "left_gold", 5),
            ("answer", "right", None),
            ("RM", "right_rm", 6),
            ("gold", "right_gold", 5),
        ):
            table.add_column(label, key=key, width=width)
        self.reload()
        self.set_interval(2.0, self.reload)

    def reload(self) -> None:
        answers = evaluation_answers(self.run_dir)
        if answers == self.answers:
            return
        self.answers = answers
        labels = list(answers)
        if not self.chosen or any(label not in answers for label in self.chosen):
            self.chosen = [labels[0], labels[-1]] if labels else []
        self.draw()

    def draw(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        title = self.query_one("#answers-title", Static)
        if not self.chosen:
            title.update(
                Text(f"{self.run_dir.name}: no held-out answers yet (written at each evaluation)", "dim")
            )
            return
        left, right = self.chosen
        title.update(
            Text.assemble(
                (self.run_dir.name, "bold"),
                "  held-out answers, same prompts and noise:  ",
                (left, "bold cyan"),
                "  vs  ",
                (right, "bold magenta"),
                ("   [ and ] pick the evaluations", "dim"),
            )
        )
        for prompt, one, other in side_by_side(self.answers[left], self.answers[right]):
            table.add_row(printable(prompt, 60), *_cells(one), *_cells(other))

    def action_cycle(self, side: int) -> None:
        labels = list(self.answers)
        if not labels:
            return
        self.chosen[side] = labels[(labels.index(self.chosen[side]) + 1) % len(labels)]
        self.draw()

    def action_back(self) -> None:
        self.app.pop_screen()


def _cells(row: dict | None) -> tuple:
    if row is None:
        return ("-", "", "")
    return (
        printable(row.get("response")),
        Text(fmt_value(row.get("score")), justify="right"),
        Text(fmt_value(row.get("gold"), 2), justify="right"),
    )
