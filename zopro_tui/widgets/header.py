"""The dashboard header: run, method, status, stage, position, steps/s, ETA, elapsed; then the curve view."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from engine.rundir.report import STATUS_STYLE, fmt_duration
from engine.rundir.report import position as run_position
from zopro_tui.view import CurveView
from zopro_tui.watched import WatchedRun


def status_line(
    run: WatchedRun, readonly: bool = False, starting_pid: int | None = None, start_failure: str | None = None
) -> Text:
    """`start_failure`: the run's process (started from this TUI) exited before writing its run directory."""
    info = run.info
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(run.name, style="bold")
    if run.method != "?":
        line.append(f"  {run.method}")
    line.append("  ")
    status = run.status
    if (info is None or status == "created") and start_failure:
        line.append("failed to start", style=STATUS_STYLE["failed"])
        line.append(f"  {start_failure}", style="red")
        return line
    if info is None or status == "created":
        status = "starting" + (f" (pid {starting_pid}, loading the model)" if starting_pid else "")
    line.append(status, style=STATUS_STYLE.get(status, "bold"))
    if info is not None and info.warning_count:
        line.append(f" !{info.warning_count}", style="bold yellow")
    if info is not None and info.status != "created":
        line.append(f"  {run_position(info)}")
        if info.total_steps:
            line.append(f"  step {info.global_step}/{info.total_steps}")
        rate = run.steps_per_second()
        if rate:
            line.append(f"  {rate:.2f} steps/s")
        eta = run.eta()
        if eta is not None:
            line.append(f"  ETA {fmt_duration(eta)}")
        line.append(f"  elapsed {fmt_duration(info.elapsed)}")
    if readonly:
        line.append("  read-only", style="reverse")
    return line


def view_line(run: WatchedRun, view: CurveView) -> Text:
    line = Text(no_wrap=True, overflow="ellipsis", style="dim")
    info = run.info
    if info is not None and info.error:
        line.append(f"error: {info.error}  ", style="bold red")
    if run.preview is not None:
        line.append(
            f"reading history {run.history_progress:.0%} (drawn from a sample until then)  ",
            style="bold yellow",
        )
    if run.timeline.spans and run.live:  # the stages done, the one running, the rest of this iteration
        elapsed = info.elapsed if info is not None else None
        line.append_text(run.timeline.render(info.iterations if info else None, False, elapsed))
        line.append("  ·  ")
    line.append(view.describe())
    line.append(f"  ·  {len(run.store):,} metric events")
    return line


class RunHeader(Static):
    """Two lines at the top of the dashboard."""

    def show(
        self,
        run: WatchedRun,
        view: CurveView,
        readonly: bool,
        starting_pid: int | None,
        start_failure: str | None = None,
    ) -> None:
        text = Text("\n").join(
            [status_line(run, readonly, starting_pid, start_failure), view_line(run, view)]
        )
        text.no_wrap, text.overflow = True, "ellipsis"
        self.update(text, layout=False)
