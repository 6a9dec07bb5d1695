"""The sweep screen: a whole sweep as one thing. A table of its points (their settings, status and final
scores with standard errors) sorted by a chosen final metric, and a plot of that metric against a swept key
(one line per combination of the other keys). `o` overlays every point's curves in the compare screen."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from engine.jobs.sweep import Sweep, SweepError, load_sweep, point_state
from engine.rundir.reader import RunInfo
from engine.rundir.report import STATUS_STYLE, fmt_duration, fmt_value, fmt_with_se
from zopro_tui.messages import SweepRead
from zopro_tui.polling import poll
from zopro_tui.widgets.chart import PALETTE, ChartData, ChartSeries, CurveChart
from zopro_tui.widgets.tables import add_columns

# (label, latest metric, higher is better)
SORT_METRICS = (
    ("final gold", "eval/gold", True),
    ("win vs SFT", "eval/win_rate_vs_sft", True),
    ("fixed-RM score", "eval/reward_initial", True),  # the RM score under the never-refined reward model
    ("KL", "eval/kl", False),
)


def read_points(sweep: Sweep) -> SweepRead:
    states, infos = {}, {}
    for point in sweep.points:
        state, info = point_state(sweep, point)
        states[point["name"]] = state
        if info is not None:
            infos[point["name"]] = info
    return SweepRead(sweep.path, states, infos)


def axis_values(values: list) -> tuple[list[float], str]:
    """Numbers to plot a swept key's values at, and how: as they are, log10 (values spanning a decade or
    more, like learning rates) or their position in the grid (strings such as sampler names)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        numbers = [float(v) for v in values]
        positive = [v for v in numbers if v > 0]
        if len(positive) == len(numbers) and len(numbers) > 1 and max(numbers) / min(numbers) >= 10:
            return [math.log10(v) for v in numbers], "log10"
        return numbers, ""
    return [float(i) for i in range(len(values))], "position"


class SweepScreen(Screen):
    """A sweep: points sorted by a final metric, and that metric against a swept key."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("m", "next_metric", "Sort metric"),
        Binding("k", "next_key", "Swept key"),
        Binding("r", "reverse", "Reverse", show=False),
        Binding("o", "overlay", "Overlay curves"),
    ]

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.sweep: Sweep | None = None
        self.error: str | None = None
        try:
            self.sweep = load_sweep(self.path)
        except SweepError as error:
            self.error = str(error)
        self.metric = 0
        self.key = 0
        self.descending = SORT_METRICS[0][2]
        self.states: dict[str, str] = {}
        self.infos: dict[str, RunInfo] = {}
        self.chart = CurveChart(ChartData("", waiting="no point has finished an evaluation yet"))

    @property
    def keys(self) -> list[str]:
        return list(self.sweep.grid) if self.sweep else []

    def compose(self) -> ComposeResult:
        yield Static(id="sweep-title")
        yield self.chart
        table = DataTable(id="sweep-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.sweep is not None:
            self.run_worker(self.read_sweep, thread=True, group="sweep-reader", exit_on_error=False)
        self.show()

    def read_sweep(self) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        poll(
            lambda: self.post_message(read_points(self.sweep)),
            2.0,
            lambda: worker.is_cancelled or self.sweep is None,
        )

    @on(SweepRead)
    def on_sweep_read(self, message: SweepRead) -> None:
        changed = message.states != self.states or {k: v.to_json() for k, v in message.infos.items()} != {
            k: v.to_json() for k, v in self.infos.items()
        }
        self.states, self.infos = message.states, message.infos
        if changed:
            self.show()

    # -- what is shown ---------------------------------------------------------------------------------------
    def latest(self, point: dict) -> dict:
        info = self.infos.get(point["name"])
        return info.latest if info is not None else {}

    def sorted_points(self) -> list[dict]:
        assert self.sweep is not None
        name = SORT_METRICS[self.metric][1]
        have = [p for p in self.sweep.points if isinstance(self.latest(p).get(name), (int, float))]
        missing = [p for p in self.sweep.points if p not in have]
        have.sort(key=lambda p: self.latest(p)[name], reverse=self.descending)
        return have + missing

    def show(self) -> None:
        title = self.query_one("#sweep-title", Static)
        if self.sweep is None:
            title.update(Text(f"sweep {self.path.name}: {self.error}", style="bold red"))
            return
        label, name, _ = SORT_METRICS[self.metric]
        done = sum(1 for s in self.states.values() if s == "finished")
        grid = " × ".join(f"{key} ({len(values)})" for key, values in self.sweep.grid.items())
        title.update(
            Text.assemble(
                ("sweep ", "bold"),
                (self.sweep.path.name, "bold"),
                f"  {grid}  ·  {done}/{len(self.sweep.points)} done  ·  sorted by {label} "
                f"{'↓' if self.descending else '↑'}",
            )
        )
        self.show_table(name)
        self.show_chart(label, name)

    def show_table(self, name: str) -> None:
        assert self.sweep is not None
        table = self.query_one("#sweep-table", DataTable)
        table.clear(columns=True)
        add_columns(
            table,
            [
                ("#", "#"),
                *((f"key:{key}", key.rsplit(".", 1)[-1]) for key in self.keys),
                ("status", "status"),
                ("gold", "gold"),
                ("win", "win vs SFT"),
                ("kl", "KL"),
                ("wall", "wall"),
                ("warnings", "warnings"),
            ],
        )
        with_se = self.size.width >= 100
        for point in self.sorted_points():
            latest = self.latest(point)
            info = self.infos.get(point["name"])
            state = self.states.get(point["name"], "pending")

            def score(metric: str, latest: dict = latest) -> Text:
                se = latest.get(f"{metric}_se") if with_se else None
                bold = "bold" if metric == name else ""
                return Text(fmt_with_se(latest.get(metric), se), justify="right", style=bold)

            table.add_row(
                point["name"].split("-", 1)[0],
                *(Text(str(point["values"].get(key, "-")), justify="right") for key in self.keys),
                Text(state, style=STATUS_STYLE.get(state, "dim")),
                score("eval/gold"),
                score("eval/win_rate_vs_sft"),
                Text(
                    fmt_value(latest.get("eval/kl")),
                    justify="right",
                    style="bold" if name == "eval/kl" else "",
                ),
                fmt_duration(info.elapsed if info else None),
                Text(str(info.warning_count) if info and info.warning_count else "-", style="bold yellow"),
                key=point["name"],
            )

    def show_chart(self, label: str, name: str) -> None:
        """The metric against the chosen swept key: one line per combination of the other keys."""
        assert self.sweep is not None
        if not self.keys:
            return
        key = self.keys[self.key % len(self.keys)]
        grid_values = self.sweep.grid[key]
        xs, how = axis_values(grid_values)
        position = {str(v): x for v, x in zip(grid_values, xs, strict=True)}
        others = [k for k in self.keys if k != key]
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for point in self.sweep.points:
            value = self.latest(point).get(name)
            if not isinstance(value, (int, float)):
                continue
            rest = ", ".join(f"{k.rsplit('.', 1)[-1]}={point['values'].get(k)}" for k in others) or label
            se = self.latest(point).get(f"{name}_se")
            x = position.get(str(point["values"].get(key)))
            if x is not None:
                lines.setdefault(rest, []).append(
                    (x, float(value), float(se) if se is not None else math.nan)
                )
        series = []
        for index, (rest, points) in enumerate(sorted(lines.items())):
            points.sort()
            x, y, se = (np.array(column, dtype=float) for column in zip(*points, strict=True))
            series.append(ChartSeries(rest, x, y, PALETTE[index % len(PALETTE)], se=se))
        axis = {
            "log10": f"log10 {key}",
            "position": f"{key}: " + ", ".join(f"{i}={v}" for i, v in enumerate(grid_values)),
        }
        title = f"{label} vs {axis.get(how, key)}"
        self.chart.show(
            ChartData(
                title,
                series,
                x_kind="value",
                waiting=f"{title}: no point has {name} yet",
                title_first=True,
            )
        )

    # -- actions ---------------------------------------------------------------------------------------------
    def action_next_metric(self) -> None:
        self.metric = (self.metric + 1) % len(SORT_METRICS)
        self.descending = SORT_METRICS[self.metric][2]
        self.show()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self.show()

    def action_next_key(self) -> None:
        if self.keys:
            self.key = (self.key + 1) % len(self.keys)
            self.show()

    def action_overlay(self) -> None:
        if self.sweep is None:
            return
        dirs = [
            self.sweep.point_dir(p)
            for p in self.sweep.points
            if self.states.get(p["name"], "pending") != "pending"
        ]
        if len(dirs) < 2:
            self.notify("fewer than two points have started; nothing to overlay yet", severity="warning")
            return
        self.app.open_compare(dirs)

    @on(DataTable.RowSelected, "#sweep-table")
    def open_point(self, event: DataTable.RowSelected) -> None:
        if self.sweep is None or not event.row_key.value:
            return
        folder = self.sweep.path / event.row_key.value
        if self.states.get(event.row_key.value, "pending") == "pending":
            self.notify(f"{event.row_key.value} has not started yet", severity="warning")
            return
        self.app.open_run(folder)

    def action_back(self) -> None:
        self.app.pop_screen()
