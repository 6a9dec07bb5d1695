"""The run dashboard: header, curves, interplay, zeroth-order, samples, events and hardware of one run, live.

Two background workers read (the run directory; the run's process) and only post messages; the handlers
here own the run's state. Panels redraw at most four times a second, and less often when a redraw is slow
(a huge run), so the dashboard stays light next to the training it watches.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import get_current_worker

from engine.rundir.controls import send_control
from engine.rundir.files import RunDirError
from zopro_tui.catalogue import (
    CURVE_CHARTS,
    INTERPLAY_CHARTS,
    INTERPLAY_WAITING,
    REWARD_CHARTS,
    STAGE_CHARTS,
    TRAJECTORY,
    ZO_CHARTS,
    ZO_WAITING,
)
from zopro_tui.layout import PANELS, panel_order, plan_layout
from zopro_tui.messages import HardwareRead, LogRead, SamplesRead, SeriesRead, StatusRead
from zopro_tui.polling import poll
from zopro_tui.reading import ProcessSampler, follow_run
from zopro_tui.screens.modals import ConfirmModal
from zopro_tui.view import CURSOR_BINDINGS, CurveView, CurveViewActions
from zopro_tui.watched import WatchedRun
from zopro_tui.widgets.chart import LABEL_WIDTH, CurveChart
from zopro_tui.widgets.events import EventsPanel
from zopro_tui.widgets.hardware import HardwarePanel
from zopro_tui.widgets.header import RunHeader
from zopro_tui.widgets.panel import ChartGridPanel, Panel
from zopro_tui.widgets.samples import SamplesPanel

REDRAW_SECONDS = 0.5  # new data redraws at most twice a second; keys redraw at once
ALL_PARTS = frozenset({"series", "status", "clock", "samples", "log", "hardware"})
CPU_BUDGET = 0.03  # live redraws slow down when the TUI uses more than this share of a core


class RedrawPace:
    """How long to wait before the next live redraw: 0.25 s, longer while the UI thread has been using more
    than CPU_BUDGET of a core (a huge run, a slow terminal), so the TUI never competes with training."""

    WARM_UP_SECONDS = 3.0  # opening a run (first layout, first full draw) is not the steady state

    def __init__(self) -> None:
        self.interval = REDRAW_SECONDS
        self._cpu = time.thread_time()
        self._wall = self._started = time.monotonic()

    def next_interval(self) -> float:
        cpu, wall = time.thread_time(), time.monotonic()
        share = (cpu - self._cpu) / max(wall - self._wall, 1e-3)
        self._cpu, self._wall = cpu, wall
        if wall - self._started < self.WARM_UP_SECONDS:
            return REDRAW_SECONDS
        if share > CPU_BUDGET:
            self.interval = min(2.0, self.interval * min(4.0, share / CPU_BUDGET))
        else:
            self.interval = max(REDRAW_SECONDS, self.interval * 0.7)
        return self.interval


CONTROL_NOTES = {
    "pause": "pause requested: the run pauses after its current step",
    "resume": "resume requested",
    "checkpoint": "checkpoint requested: written after the current step",
    "stop": "stop requested: the run checkpoints and stops after its current step",
}


class DashboardScreen(CurveViewActions, Screen):
    """Everything about one run, live from its run directory."""

    BINDINGS = [
        Binding("p", "control('pause')", "Pause"),
        Binding("r", "control('resume')", "Resume"),
        Binding("s", "stop", "Stop"),
        Binding("c", "control('checkpoint')", "Ckpt", tooltip="Checkpoint now"),
        Binding("z", "toggle_zoom", "Zoom"),
        Binding("x", "next_axis", "X axis"),
        Binding("e", "smoothing", "Smooth"),
        Binding("escape", "back", "Back", show=False),
        Binding("j,down", "focus_panel(1)", "Next panel", show=False),
        Binding("k,up", "focus_panel(-1)", "Previous panel", show=False),
        Binding("plus,equals_sign", "zoom_x(0.5)", "Zoom in (x)", show=False),
        *CURSOR_BINDINGS,
        Binding("E", "export_metrics", "Export metrics CSV/JSON", show=False),
        *[Binding(str(n), f"show_panel({n - 1})", f"Panel {n}", show=False) for n in range(1, 7)],
    ]

    view: reactive[CurveView] = reactive(CurveView, init=False)
    zoomed: reactive[str | None] = reactive(None, init=False)

    def __init__(self, run_dir: Path, *, readonly: bool = False):
        super().__init__()
        self.run = WatchedRun(Path(run_dir))
        self.readonly = readonly
        self._dirty: set[str] = set(ALL_PARTS)  # what changed since the last redraw
        self._next_redraw = 0.0
        self.pace = RedrawPace()
        self.first_picture = threading.Event()  # set once the first data is on screen
        self._hardware_target: tuple[int | None, str | None] = (None, None)
        self._told: set[object] = set()
        self._old_warnings: list[dict] = []  # warnings read while catching up with the run's history
        self._idle: frozenset[str] = frozenset()  # chart panels without data yet, laid out aside

    # -- composition and layout ----------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield RunHeader(id="run-header")
        with Grid(id="panels"):
            yield ChartGridPanel("curves", CURVE_CHARTS, id="curves")
            yield ChartGridPanel(
                "policy-reward interplay",
                INTERPLAY_CHARTS,
                TRAJECTORY,
                waiting=INTERPLAY_WAITING,
                id="interplay",
            )
            yield ChartGridPanel("zeroth-order", ZO_CHARTS, waiting=ZO_WAITING, id="zo")
            yield HardwarePanel(id="hardware")
            yield SamplesPanel(id="samples")
            yield EventsPanel(id="events")
        yield Footer(compact=True, show_command_palette=False)  # ? Help stays visible at 80 columns

    def on_mount(self) -> None:
        self.title = self.run.name
        self.apply_layout()
        self.query_one("#curves").focus()
        self.read_run()
        self.sample_hardware()
        self.set_interval(REDRAW_SECONDS, self.redraw)
        self.redraw()

    def on_resize(self) -> None:
        self.apply_layout()

    def panels(self) -> list[Panel]:
        return list(self.query_one("#panels").query_children(Panel))

    def idle_panels(self) -> frozenset[str]:
        """The chart panels that cannot have data yet (no interplay before the first iteration ends, no
        zeroth-order diagnostics before the first zeroth-order update): they step aside."""
        store = self.run.series
        idle = set()
        for panel, specs in (("interplay", INTERPLAY_CHARTS), ("zo", ZO_CHARTS)):
            names = [name for spec in specs for name, _ in spec.metrics]
            if not any(len(store.values.get(name, ())) for name in names):
                idle.add(panel)
        return frozenset(idle)

    def apply_layout(self) -> None:
        self._idle = self.idle_panels()
        layout = plan_layout(
            self.size.width, self.size.height, self.run.zeroth_order, self.zoomed, idle=self._idle
        )
        grid = self.query_one("#panels", Grid)
        grid.styles.grid_size_columns = layout.columns
        grid.styles.grid_size_rows = layout.rows
        for panel in self.panels():
            span = layout.spans.get(panel.id or "")
            panel.display = span is not None
            if span is not None:
                panel.styles.column_span, panel.styles.row_span = span
        focused = self.focused
        if focused is None or not focused.display:
            visible = [panel for panel in self.panels() if panel.display]
            if visible:
                visible[0].focus()
        self._dirty |= ALL_PARTS

    # -- workers: they read and post, nothing else -----------------------------------------------------
    @work(thread=True, exclusive=True, group="run-reader", exit_on_error=False)
    def read_run(self) -> None:
        worker = get_current_worker()
        follow_run(self.run.path, self.post_message, lambda: worker.is_cancelled, shown=self.first_picture)

    @work(thread=True, exclusive=True, group="hardware", exit_on_error=False)
    def sample_hardware(self) -> None:
        worker = get_current_worker()
        sampler = ProcessSampler()

        def sample() -> None:
            pid, host = self._hardware_target
            self.post_message(HardwareRead(self.run.path, sampler.sample(pid, host)))

        poll(sample, 2.0, lambda: worker.is_cancelled)

    # -- handlers: they own the state ------------------------------------------------------------------
    @on(SeriesRead)
    def on_series(self, message: SeriesRead) -> None:
        was_zo = self.run.zeroth_order
        first_picture = message.preview or (message.caught_up and not self.run.caught_up)
        if not message.preview:
            self.tell_warnings(message, live=self.run.caught_up)
        self.run.apply_series(message)
        if self.run.zeroth_order != was_zo:
            self.apply_layout()
        self._dirty.add("series")
        if self.idle_panels() != self._idle:
            self.apply_layout()
        if first_picture:
            self.redraw(force=True)  # the sample of a big log, or the end of the catch-up: show it now
            self.call_after_refresh(self.first_picture.set)

    @on(StatusRead)
    def on_status(self, message: StatusRead) -> None:
        before = self.run.info.status if self.run.info else None
        changed = message.info != self.run.info
        was_zo = self.run.zeroth_order
        self.run.apply_status(message.info)
        info = message.info
        self._hardware_target = (info.pid if self.run.live else None, info.host)
        if info.status != before:
            self.refresh_bindings()
            self.tell_status_change(before, info.status)
        if self.run.zeroth_order != was_zo:
            self.apply_layout()
        launched = self.app.launched.get(self.run.path) if hasattr(self.app, "launched") else None
        if launched is not None and not launched.alive() and info.status in ("created",):
            if "died" not in self._told:
                self.redraw(force=True)  # the header stops saying "starting" at once
            self.tell_once(
                "died",
                f"the run's process exited before writing its run directory; see {launched.log_path}",
                "error",
            )
        if changed:
            self._dirty.add("status")
        if before is not None and info.status != before:
            self.redraw(force=True)  # a run that pauses, ends or fails says so at once
        elif self.run.live:
            self._dirty.add("clock")  # elapsed and ETA move on

    @on(SamplesRead)
    def on_samples(self, message: SamplesRead) -> None:
        self.run.samples, self.run.samples_source = message.rows, message.source
        self._dirty.add("samples")

    @on(LogRead)
    def on_log(self, message: LogRead) -> None:
        self.run.apply_log(message.lines)
        self._dirty.add("log")

    @on(HardwareRead)
    def on_hardware(self, message: HardwareRead) -> None:
        changed = message.reading != self.run.hardware
        self.run.apply_hardware(message.reading)
        if changed:
            self._dirty.add("hardware")

    def first_time(self, key: object) -> bool:
        """Whether `key` was not told yet (and now counts as told)."""
        if key in self._told:
            return False
        self._told.add(key)
        return True

    def tell_once(self, key: str, message: str, severity: str = "information") -> None:
        if key not in self._told:
            self._told.add(key)
            self.notify(message, severity=severity, timeout=10 if severity == "error" else 5)

    def tell_warnings(self, message: SeriesRead, live: bool) -> None:
        """A notification for each warning the run emits while watched; the ones already in its history
        become one notification once the catch-up ends."""
        warnings = [
            event for batch in message.batches for event in batch.events if event.get("type") == "warning"
        ]
        if live:
            for event in warnings:
                if not self.first_time(("warning", event.get("seq"), event.get("code"))):
                    continue  # a resumed run's replay, or a batch read twice: told once
                self.notify(
                    f"{self.run.name}: {event.get('message', '')}",
                    title=f"warning: {event.get('code', '?')}",
                    severity="warning",
                    timeout=10,
                )
            return
        self._old_warnings.extend(warnings)
        if message.caught_up and self._old_warnings:
            last = self._old_warnings[-1]
            count = len(self._old_warnings)
            self._old_warnings = []
            self.tell_once(
                "old-warnings",
                f"{self.run.name} raised {count} warning{'s' if count > 1 else ''}; the last: "
                f"[{last.get('code', '?')}] {last.get('message', '')}",
                "warning",
            )

    def tell_status_change(self, before: str | None, now: str) -> None:
        info = self.run.info
        if now == "failed":
            self.tell_once("failed", f"{self.run.name} failed: {info.error if info else ''}", "error")
        elif now == "stale":
            self.tell_once(
                "stale",
                f"{self.run.name} is stale: no heartbeat for a minute or its process is gone",
                "warning",
            )
        elif before in ("running", "paused") and now in ("finished", "stopped"):
            self.tell_once(now, f"{self.run.name} {now}")
        elif before == "running" and now == "paused":
            self.notify(f"{self.run.name} paused")

    # -- drawing -----------------------------------------------------------------------------------------
    def data_range(self) -> tuple[float, float] | None:
        names = [name for spec in REWARD_CHARTS + INTERPLAY_CHARTS + ZO_CHARTS for name, _ in spec.metrics]
        stages = [name for spec in STAGE_CHARTS for name, _ in spec.metrics]  # before the first update
        return self.run.series.x_range(self.view.axis, names) or self.run.series.x_range(
            self.view.axis, stages
        )

    def redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (self._dirty or force) or (not force and now < self._next_redraw):
            return
        dirty = ALL_PARTS if force else self._dirty
        self._dirty = set()
        starting_pid = start_failure = None
        launched = getattr(self.app, "launched", {}).get(self.run.path)
        if launched is not None and launched.alive():
            starting_pid = launched.pid
        elif launched is not None:
            last = next((line for line in reversed(self.run.log_lines) if line.strip()), "")
            start_failure = (
                f"(exit {launched.process.returncode}) {last}".strip() + f"  log: {launched.log_path}"
            )
        self.query_one(RunHeader).show(self.run, self.view, self.readonly, starting_pid, start_failure)
        data_range = self.data_range()
        for panel in self.panels():
            if panel.display and panel.FEEDS & dirty:
                panel.show_run(self.run, self.view, data_range)
        self._next_redraw = now + self.pace.next_interval()

    def watch_view(self) -> None:
        self.redraw(force=True)

    def watch_zoomed(self) -> None:
        self.apply_layout()
        if self.zoomed:
            self.query_one(f"#{self.zoomed}").focus()
        self.redraw(force=True)

    # -- actions -----------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("control", "stop"):
            if self.readonly or not self.run.live:
                return False
            if action == "control" and parameters:
                if parameters[0] == "pause" and self.run.status == "paused":
                    return False
                if parameters[0] == "resume" and self.run.status != "paused":
                    return False
        return True

    def action_back(self) -> None:
        if self.zoomed:
            self.zoomed = None
        else:
            self.app.pop_screen()

    def action_toggle_zoom(self) -> None:
        focused = self.focused
        panel = focused if isinstance(focused, Panel) else None
        if self.zoomed:
            self.zoomed = None
        elif panel is not None:
            self.zoomed = panel.id

    def action_show_panel(self, index: int) -> None:
        """Zoom into panel 1-6 (curves, interplay, zeroth-order, hardware, samples, events); again: the grid."""
        if index >= len(PANELS):
            return
        name = PANELS[index]
        if name not in panel_order(self.run.zeroth_order):
            self.notify("no zeroth-order panel: this is a first-order run", timeout=3)
            return
        self.zoomed = None if self.zoomed == name else name

    def action_focus_panel(self, step: int) -> None:
        order = panel_order(self.run.zeroth_order)
        if self.zoomed:
            current = order.index(self.zoomed) if self.zoomed in order else 0
            self.zoomed = order[(current + step) % len(order)]
            return
        visible = [panel for panel in self.panels() if panel.display]
        if not visible:
            return
        current = visible.index(self.focused) if self.focused in visible else -1
        visible[(current + step) % len(visible)].focus()

    def plot_columns(self) -> int:
        charts = [chart for chart in self.query(CurveChart) if chart.display and chart.size.width]
        return max(1, (charts[0].size.width - LABEL_WIDTH) * 2) if charts else 100

    def action_control(self, request: str) -> None:
        if self.readonly:
            return
        try:
            send_control(self.run.path, request)
        except (RunDirError, OSError) as error:
            self.notify(f"could not write the {request} request: {error}", severity="error")
            return
        self.notify(CONTROL_NOTES[request], timeout=3)

    def action_stop(self) -> None:
        if self.readonly:
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.action_control("stop")

        self.app.push_screen(
            ConfirmModal(
                f"Stop {self.run.name}?",
                f"It writes a checkpoint and stops. Continue later with\nzopro run --resume {self.run.path}",
            ),
            confirmed,
        )

    def action_export_metrics(self) -> None:
        self.app.export_metrics(self.run.path)
