"""The events pane: stage changes, evaluations, checkpoints, pauses, warnings and errors, newest last."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import RichLog

from engine.rundir.report import fmt_duration, fmt_value, stage_end_text
from engine.rundir.wording import STAGE_TITLES, checkpoint_phrase, iteration_text, stage_message
from zopro_tui.view import CurveView
from zopro_tui.watched import WatchedRun
from zopro_tui.widgets.panel import Panel

EVENT_STYLES = {
    "error": "bold red",
    "run_end": "bold",
    "stage_start": "cyan",
    "checkpoint": "dim",
    "paused": "yellow",
    "resumed": "green",
    "resume": "magenta",
    "eval": "green",
    "warning": "bold yellow",
    "rollback": "bold yellow",
}
QUIET_EVENTS = ("samples",)
ALERT_EVENTS = ("warning", "rollback", "error")  # written every few updates: the samples panel shows them
# The launch log holds the run's whole output (progress lines, summary tables); the pane shows only the lines
# that say something went wrong, which no event says (a traceback, an error before the run directory).
LOG_PROBLEM_STARTS = ("error:", "training failed:", "traceback", "stopped:")
LOG_PROBLEM_WORDS = ("error:", "exception:")
TABLE_CHARACTERS = set("│┃┏┡└┌├╇━─┗┛┓┩")


def log_problem(text: str) -> bool:
    """A line of the launch log worth showing among the events: an error or a traceback, not a table row
    nor a line that repeats an event (warnings are events: the runner prints them too)."""
    lowered = text.strip().lower()
    if not lowered or TABLE_CHARACTERS & set(text) or lowered.startswith("warning"):
        return False
    return lowered.startswith(LOG_PROBLEM_STARTS) or any(word in lowered for word in LOG_PROBLEM_WORDS)


def describe_event(event: dict, iterations: int | None = None, run_dir: str | None = None) -> str:
    """One line for an event, without the time; iterations counted from 1 as everywhere (`iteration 2/4`)."""
    kind = event.get("type", "?")
    if kind == "stage_start":
        stage = event.get("stage", "")
        if stage in STAGE_TITLES:
            return stage_message(stage, event.get("iteration"), iterations)
        return event.get("message") or f"stage {stage}"
    if kind == "stage_end":
        return stage_end_text(event)
    if kind == "checkpoint":
        return checkpoint_phrase(event.get("name")).replace("the checkpoint", "checkpoint", 1)
    if kind == "judge":
        return f"judge ({event.get('judge', '')}): {event.get('judged', '?')} judged of {event.get('kept', '?')} kept"
    if kind == "samples":
        return f"{event.get('count', '?')} {event.get('kind', '')} samples"
    if kind == "resume":
        return f"resumed from {checkpoint_phrase(event.get('checkpoint'))}"
    if kind == "resumed":
        paused = event.get("paused_s")
        return "resumed" + (
            f" after {fmt_duration(paused)} paused" if isinstance(paused, (int, float)) else ""
        )
    if kind == "run_end":
        status = event.get("status", "ended")
        text = f"run {status}" + (f" ({event['reason']})" if event.get("reason") else "")
        if status == "stopped" and run_dir:
            text += f": continue with zopro run --resume {run_dir}"
        return text + (f": {event['error']}" if event.get("error") else "")
    if kind == "error":
        return f"error: {event.get('message', '')}"
    if kind == "warning":
        where = iteration_text(event.get("iteration"), iterations)
        return f"warning [{event.get('code', '?')}]{' ' + where if where else ''}: {event.get('message', '')}"
    if kind == "rollback":
        return f"rolled back to checkpoint {event.get('checkpoint', '?')}: {event.get('reason', '')}"
    if kind == "eval":
        metrics = event.get("metrics", {})
        return (
            f"held-out eval: gold {fmt_value(metrics.get('eval/gold'))}, "
            f"win vs SFT {fmt_value(metrics.get('eval/win_rate_vs_sft'))}, KL {fmt_value(metrics.get('eval/kl'))}"
        )
    if kind == "run_start":
        return "run started"
    return kind


class EventsPanel(Panel):
    """Events of the run and warning lines of its launch log, as a scrolling log."""

    FEEDS = frozenset({"series", "log"})

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__("events", id=id, classes=classes)
        self._events_shown = 0
        self._log_shown = 0
        self._last_seq: int | None = None

    def compose(self) -> ComposeResult:
        log = RichLog(
            max_lines=1000, wrap=True, min_width=20, markup=False, highlight=False, auto_scroll=True
        )
        log.can_focus = False
        yield log

    def show_run(self, run: WatchedRun, view: CurveView, data_range: tuple[float, float] | None) -> None:
        log = self.query_one(RichLog)
        events = run.store.events
        if len(events) < self._events_shown or (
            events and self._events_shown and events[self._events_shown - 1].get("seq") != self._last_seq
        ):
            log.clear()  # a rewind: start over
            self._events_shown = 0
        iterations = run.info.iterations if run.info is not None else None
        new = [event for event in events[self._events_shown :] if event.get("type") not in QUIET_EVENTS]
        lines = []
        for event in new[-log.max_lines :] if log.max_lines else new:  # the log keeps no more lines than that
            line = Text(no_wrap=event.get("type") not in (*ALERT_EVENTS, "run_end"))  # read whole
            line.append(f"{fmt_duration(event.get('elapsed')):>7} ", style="dim")
            line.append(
                describe_event(event, iterations, str(run.path)),
                style=EVENT_STYLES.get(event.get("type", ""), ""),
            )
            lines.append(line)
        if lines:  # one write (one render and one scroll) for a whole history's events
            log.write(Group(*lines))
        self._events_shown = len(events)
        self._last_seq = events[-1].get("seq") if events else None
        new_lines = min(run.log_total - self._log_shown, len(run.log_lines))
        for text in list(run.log_lines)[len(run.log_lines) - new_lines :] if new_lines > 0 else []:
            if log_problem(text):
                log.write(Text(f"    log {text}", style="red"))
        self._log_shown = run.log_total

    def action_scroll_panel(self, direction: int) -> None:
        log = self.query_one(RichLog)
        log.scroll_to(y=log.scroll_y + direction * max(1, log.size.height - 1), animate=False)
