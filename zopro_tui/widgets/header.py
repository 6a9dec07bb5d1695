"""The dashboard header: run, method, status, stage, position, steps/s, ETA, elapsed; then the curve view."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from engine.rundir.columns import middle_ellipsis
from engine.rundir.report import STATUS_STYLE, fmt_duration
from engine.rundir.report import position as run_position
from zopro_tui.view import CurveView
from zopro_tui.watched import WatchedRun


def status_line(
    run: WatchedRun,
    readonly: bool = False,
    starting_pid: int | None = None,
    start_failure: str | None = None,
    width: int = 0,
) -> Text:
    """`start_failure`: the run's process (started from this TUI) exited before writing its run directory.
    With a `width`, the parts that matter least (steps/s, the method, the step count) go first to fit it."""
    info = run.info
    line = Text(no_wrap=True, overflow="ellipsis")
    status = run.status
    if (info is None or status == "created") and start_failure:
        line.append(run.name, style="bold")
        line.append("  ")
        line.append("failed to start", style=STATUS_STYLE["failed"])
        line.append(f"  {start_failure}", style="red")
        return line
    if info is None or status == "created":
        status = "starting" + (f" (pid {starting_pid}, loading the model)" if starting_pid else "")
    parts: list[tuple[int, Text]] = []  # (rank: the highest goes first when narrow, text)
    if run.method != "?":
        parts.append((2, Text(f"  {run.method}")))
    state = Text("  ")
    state.append(status, style=STATUS_STYLE.get(status, "bold"))
    if info is not None and info.warning_count:
        state.append(f" !{info.warning_count}", style="bold yellow")
    parts.append((0, state))
    if info is not None and info.status != "created":
        parts.append((0, Text(f"  {run_position(info)}")))
        if info.total_steps:
            parts.append((1, Text(f"  step {info.global_step}/{info.total_steps}")))
        eta = run.eta()
        if eta is not None:
            parts.append((0, Text(f"  ETA {fmt_duration(eta)}")))
        clock = Text(f"  elapsed {fmt_duration(info.elapsed)}")  # the run's one clock, as `zopro ls`
        if info.paused >= 1:
            clock.append(f" ({fmt_duration(info.paused)} paused)", style="yellow")
        parts.append((0, clock))
        rate = run.steps_per_second()
        if rate:
            parts.append((3, Text(f"  {rate:.2f} steps/s")))
    if readonly:
        parts.append((0, Text.assemble("  ", ("read-only", "reverse"))))
    while width and len(run.name) + sum(len(part) for _, part in parts) > width:
        rank = max(rank for rank, _ in parts)
        if rank == 0:
            break
        parts = [(r, part) for r, part in parts if r != rank]
    room = width - sum(len(part) for _, part in parts) if width else len(run.name)
    line.append(
        middle_ellipsis(run.name, max(12, room)), style="bold"
    )  # the rest of the line before the name
    for _, part in parts:
        line.append_text(part)
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
            [status_line(run, readonly, starting_pid, start_failure, self.size.width), view_line(run, view)]
        )
        text.no_wrap, text.overflow = True, "ellipsis"
        self.update(text, layout=False)
