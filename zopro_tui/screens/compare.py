"""The compare screen: two or more runs overlaid on one x axis (step, wall time, forward passes), and a table
of their final scores, KL, wall time, compute and peak memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from engine.rundir.columns import Column, middle_ellipsis
from engine.rundir.report import STATUS_STYLE, fmt_duration, fmt_value, fmt_with_se, status_text
from zopro_tui.catalogue import COMPARE_CHARTS
from zopro_tui.messages import SeriesRead, StatusRead
from zopro_tui.reading import follow_run
from zopro_tui.view import CURSOR_BINDINGS, CurveView, CurveViewActions
from zopro_tui.watched import WatchedRun
from zopro_tui.widgets.chart import LABEL_WIDTH, PALETTE, ChartData, CurveChart
from zopro_tui.widgets.panel import metric_series
from zopro_tui.widgets.tables import Fit, fit_table

REDRAW_SECONDS = 0.25
TABLE_SE_FROM_WIDTH = 110  # narrower, gold and win drop their standard errors so every column still fits
TABLE_COLUMNS = [  # rank: 1 matters most; narrower than all of them, the highest rank goes first
    Column("run", "run", 1, shrink_to=12),
    Column("method", "method", 3),
    Column("status", "status", 7),
    Column("gold", "gold", 2),
    Column("win", "win", 8),
    Column("kl", "KL", 9),
    Column("wall", "wall", 10),
    Column("forward", "fwd passes", 4),
    Column("update", "s/update", 5),
    Column("peak", "peak MiB", 6),
]


def mean_update_seconds(run: WatchedRun) -> float | None:
    _, values = run.store.series("time/update_s")
    return float(np.mean(values)) if len(values) else run.store.latest.get("time/update_s")


class CompareScreen(CurveViewActions, Screen):
    """Runs side by side: same axes, same cursor, one colour per run."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("x", "next_axis", "X axis"),
        Binding("e", "smoothing", "Smoothing"),
        Binding("plus,equals_sign", "zoom_x(0.5)", "Zoom in"),
        *CURSOR_BINDINGS,
    ]

    view: reactive[CurveView] = reactive(CurveView, init=False)

    def __init__(self, run_dirs: list[Path]):
        super().__init__()
        self.runs = {Path(path): WatchedRun(Path(path)) for path in run_dirs}
        self.run_colors = {path: PALETTE[i % len(PALETTE)] for i, path in enumerate(self.runs)}
        self.charts = [CurveChart(ChartData(spec.title, waiting=spec.waiting)) for spec in COMPARE_CHARTS]
        self._dirty = True
        self._fit: Fit | None = None  # the table's columns shown, fitted to the width, and their widths

    def compose(self) -> ComposeResult:
        yield Static(id="compare-title")
        with Grid(id="compare-charts"):
            yield from self.charts
        table = DataTable(id="compare-table", cursor_type="none", zebra_stripes=True)
        table.can_focus = False
        yield table
        yield Footer(compact=True)

    def on_mount(self) -> None:
        for path in self.runs:
            self.run_worker(
                lambda path=path: self.read_run(path),
                thread=True,
                group="compare-readers",
                exit_on_error=False,
            )
        self.set_interval(REDRAW_SECONDS, self.redraw)
        self.fit_charts()
        self.redraw(force=True)

    def read_run(self, path: Path) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        follow_run(path, self.post_message, lambda: worker.is_cancelled, extras=False)

    def on_resize(self) -> None:
        self.fit_charts()
        self.show_table()

    def fit_charts(self) -> None:
        """Two columns of charts when wide enough; as many rows of 8+ lines as fit above the table."""
        width, height = self.size.width, self.size.height
        columns = 2 if width >= 90 else 1
        table_rows = len(self.runs) + 3
        rows = max(1, (height - 2 - table_rows) // 8)
        visible = max(1, min(len(self.charts), rows * columns))
        grid = self.query_one("#compare-charts", Grid)
        grid.styles.grid_size_columns = min(columns, visible)
        grid.styles.grid_size_rows = -(-visible // min(columns, visible))
        for index, chart in enumerate(self.charts):
            chart.display = index < visible
        self._dirty = True

    @on(SeriesRead)
    def on_series(self, message: SeriesRead) -> None:
        run = self.runs.get(message.run_dir)
        if run is not None:
            run.apply_series(message)
            self._dirty = True

    @on(StatusRead)
    def on_status(self, message: StatusRead) -> None:
        run = self.runs.get(message.run_dir)
        if run is not None:
            run.apply_status(message.info)
            self._dirty = True

    def data_range(self) -> tuple[float, float] | None:
        names = [name for spec in COMPARE_CHARTS for name, _ in spec.metrics]
        ranges = [r for r in (run.series.x_range(self.view.axis, names) for run in self.runs.values()) if r]
        if not ranges:
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def redraw(self, force: bool = False) -> None:
        if not (self._dirty or force):
            return
        self._dirty = False
        view = self.view
        window = view.visible(self.data_range())
        for spec, chart in zip(COMPARE_CHARTS, self.charts, strict=True):
            name = spec.metrics[0][0]
            series = [
                metric_series(run.series, name, run.name, view, self.run_colors[path])
                for path, run in self.runs.items()
            ]
            series = [s for s in series if len(s.x)]
            chart.show(
                ChartData(
                    spec.title,
                    series,
                    x_window=window,
                    cursor=view.cursor,
                    x_kind=view.axis,
                    waiting=spec.waiting,
                    title_first=True,
                )
            )
        self.show_title()
        self.show_table()

    def show_title(self) -> None:
        title = Text.assemble(("compare", "bold"), f"  {len(self.runs)} runs  ·  {self.view.describe()}  ·  ")
        for path, run in self.runs.items():
            title.append("━ ", style=self.run_colors[path])
            title.append(f"{run.name}  ")
        self.query_one("#compare-title", Static).update(title)

    def show_table(self) -> None:
        """One row per run, the columns fitted to the width as the runs list's are: long names shortened in
        the middle, then the columns that matter least dropped."""
        table = self.query_one("#compare-table", DataTable)
        with_se = self.size.width >= TABLE_SE_FROM_WIDTH

        def score(latest: dict, name: str) -> Text:
            se = latest.get(f"{name}_se") if with_se else None
            return Text(fmt_with_se(latest.get(name), se), justify="right")

        rows = []
        for run in self.runs.values():
            latest = run.store.latest or (run.info.latest if run.info else {})
            info = run.info
            peak = latest.get("mem/cuda_peak_mib") or latest.get("mem/peak_rss_mib")
            rows.append(
                {
                    "run": run.name,
                    "method": run.method,
                    "status": status_text(info)
                    if info is not None
                    else Text(run.status, style=STATUS_STYLE.get(run.status, "")),
                    "gold": score(latest, "eval/gold"),
                    "win": score(latest, "eval/win_rate_vs_sft"),
                    "kl": Text(fmt_value(latest.get("eval/kl", latest.get("objective/kl"))), justify="right"),
                    "wall": fmt_duration(info.elapsed if info else None),
                    "forward": Text(fmt_value(latest.get("compute/forward_passes")), justify="right"),
                    "update": Text(fmt_value(mean_update_seconds(run)), justify="right"),
                    "peak": Text(fmt_value(peak, 0) if peak is not None else "-", justify="right"),
                }
            )
        natural = {
            column.key: max((Text(str(row[column.key])).cell_len for row in rows), default=0)
            for column in TABLE_COLUMNS
        }
        self._fit = fit_table(
            table, TABLE_COLUMNS, natural, self.size.width or self.app.size.width, self._fit
        )
        shown, widths = self._fit
        for (path, run), row in zip(self.runs.items(), rows, strict=True):
            cells = []
            for column in shown:
                cell = row[column.key]
                if column.key == "run":
                    cell = Text(middle_ellipsis(run.name, widths["run"]), style=self.run_colors[path])
                cells.append(cell)
            table.add_row(*cells)

    def watch_view(self) -> None:
        self.redraw(force=True)

    def plot_columns(self) -> int:
        charts = [chart for chart in self.charts if chart.display and chart.size.width]
        return max(1, (charts[0].size.width - LABEL_WIDTH) * 2) if charts else 100

    def action_back(self) -> None:
        self.app.pop_screen()
