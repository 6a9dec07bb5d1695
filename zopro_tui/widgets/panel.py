"""Dashboard panels: the focusable titled frame, and the panel of charts (curves, interplay, zeroth-order)."""

from __future__ import annotations

import math

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.widget import Widget
from textual.widgets import Static

from zopro_tui.catalogue import ChartSpec, TrajectorySpec
from zopro_tui.series import MetricStore
from zopro_tui.view import CurveView
from zopro_tui.watched import WatchedRun
from zopro_tui.widgets.chart import PALETTE, ChartData, ChartSeries, CurveChart

MIN_CHART_WIDTH = 34
MIN_CHART_HEIGHT = 6
SMOOTH_FROM_POINTS = 20  # EMA only on series long enough for it to mean something (not 4 evaluations)


class Panel(Widget, can_focus=True):
    """A titled, focusable panel of the dashboard; the screen calls `show_run` when the run changed."""

    BINDINGS = [
        Binding("pageup,ctrl+u", "scroll_panel(-1)", "Scroll up", show=False),
        Binding("pagedown,ctrl+d", "scroll_panel(1)", "Scroll down", show=False),
    ]

    FEEDS: frozenset[str] = frozenset({"series"})  # what changes of the run this panel draws

    def __init__(self, title: str, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.border_title = title

    def show_run(self, run: WatchedRun, view: CurveView, data_range: tuple[float, float] | None) -> None:
        """Redraw from the run (its store, status, samples...) and the shared curve view."""

    def action_scroll_panel(self, direction: int) -> None:
        """Page through a panel that scrolls (samples, events); nothing for the others."""


def chart_series(
    store: MetricStore, spec: ChartSpec, view: CurveView, colors: tuple[str, ...] = PALETTE
) -> list[ChartSeries]:
    """The series of one chart spec that have points, with EMA when smoothing is on and with the standard
    error of each point when the run logs one beside the metric (`eval/gold_se` beside `eval/gold`)."""
    series = []
    for index, (name, label) in enumerate(spec.metrics):
        series.append(metric_series(store, name, label or name, view, colors[index % len(colors)]))
    return [s for s in series if len(s.x)]


def metric_series(store: MetricStore, name: str, label: str, view: CurveView, color: str) -> ChartSeries:
    """One metric of a run as a chart series on the view's axis (no points: an empty series)."""
    x, y = store.series(name, view.axis)
    smoothed = (
        store.smoothed(name, view.smoothing) if view.smoothing and len(y) >= SMOOTH_FROM_POINTS else None
    )
    return ChartSeries(label, x, y, color, smoothed, se=store.aligned(f"{name}_se", name))


class ChartGridPanel(Panel):
    """Several charts in a grid that fits the panel: as many as fit at a readable size, those with data
    before those still waiting, and in their order among each. Until any of its metrics appears, the panel
    says in one line what it waits for."""

    def __init__(
        self,
        title: str,
        specs: tuple[ChartSpec, ...],
        trajectory: TrajectorySpec | None = None,
        *,
        waiting: str = "",
        id: str | None = None,
        classes: str | None = None,
    ):
        super().__init__(title, id=id, classes=classes)
        self.specs = specs
        self.trajectory = trajectory
        self.waiting = waiting
        self.with_data: tuple[bool, ...] = ()  # per chart: has it points to draw
        self.stage = ""  # the run's current stage: its own charts (ChartSpec.stages) go first
        self.charts = [CurveChart(ChartData(spec.title, waiting=spec.waiting)) for spec in specs]
        if trajectory is not None:
            self.charts.append(CurveChart(ChartData(trajectory.title, waiting=trajectory.waiting, xy=True)))

    def compose(self) -> ComposeResult:
        yield Static(Text(self.waiting, style="dim italic"), classes="panel-waiting")
        with Grid(classes="charts"):
            yield from self.charts

    def on_mount(self) -> None:
        self.query_one(Grid).display = not self.waiting

    def on_resize(self) -> None:
        self.fit_charts()

    def fit_charts(self) -> None:
        width, height = self.content_size.width, self.content_size.height
        order = self.chart_order()
        count = max(1, len(order))
        columns_that_fit = max(1, min(count, width // MIN_CHART_WIDTH))
        rows_that_fit = max(1, height // MIN_CHART_HEIGHT)
        visible = max(1, min(count, rows_that_fit * columns_that_fit))
        rows = math.ceil(visible / columns_that_fit)
        columns = math.ceil(visible / rows)  # 4 charts in 2 x 2 rather than 3 + 1
        grid = self.query_one(Grid)
        grid.styles.grid_size_columns = columns
        grid.styles.grid_size_rows = rows
        first = set(order[:visible])
        for index, chart in enumerate(self.charts):
            chart.display = index in first
        for index in reversed(order[:visible]):  # drawn in that order: the running stage's charts first
            grid.move_child(self.charts[index], before=0)

    def chart_order(self) -> list[int]:
        """The charts to show, most wanted first: those of the stage running now (SFT loss during SFT), the
        others with data, those still waiting. A stage's own charts (ChartSpec.stages) only while it runs,
        when nothing else has data yet, or when the panel is zoomed (z); while only they have data, the charts
        that wait for the policy step aside."""
        count = len(self.charts)
        with_data = self.with_data or (False,) * count
        stage_of = [spec.stages for spec in self.specs] + [()] * (count - len(self.specs))
        now = [i for i in range(count) if with_data[i] and self.stage and self.stage in stage_of[i]]
        main = [i for i in range(count) if with_data[i] and not stage_of[i]]
        earlier = [i for i in range(count) if with_data[i] and stage_of[i] and i not in now]
        waiting = [i for i in range(count) if not with_data[i] and not stage_of[i]]
        zoomed = self.is_mounted and getattr(self.screen, "zoomed", None) == self.id
        if zoomed:
            return now + main + earlier + waiting
        if (
            not main
        ):  # before the first policy update: the stages' own charts, not charts that cannot have data
            return (now + earlier) or waiting
        return now + main + waiting

    def show_run(self, run: WatchedRun, view: CurveView, data_range: tuple[float, float] | None) -> None:
        store = run.series
        window = view.visible(data_range)
        with_data = []
        for spec, chart in zip(self.specs, self.charts, strict=False):
            series = chart_series(store, spec, view)
            with_data.append(bool(series))
            chart.show(
                ChartData(
                    spec.title,
                    series,
                    # a stage's own chart (SFT, reward model) spans its stage, not the policy's steps
                    x_window=None if spec.stages and view.window is None else window,
                    cursor=view.cursor,
                    x_kind=view.axis,
                    waiting=spec.waiting,
                )
            )
        if self.trajectory is not None:
            paths = []
            for index, (name_x, name_y, label) in enumerate(self.trajectory.paths):
                x, y = store.pairs(name_x, name_y)
                if len(x):
                    paths.append(ChartSeries(label, x, y, PALETTE[index]))
            with_data.append(bool(paths))
            self.charts[-1].show(
                ChartData(self.trajectory.title, paths, waiting=self.trajectory.waiting, xy=True)
            )
        stage = run.info.stage if run.info is not None and run.live else ""
        if tuple(with_data) != self.with_data or stage != self.stage:
            self.with_data, self.stage = tuple(with_data), stage
            self.fit_charts()
        waiting = bool(self.waiting) and not any(with_data)
        self.query_one(".panel-waiting", Static).display = waiting
        self.query_one(Grid).display = not waiting
