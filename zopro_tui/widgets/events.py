"""The events pane: stage changes, evaluations, checkpoints, pauses, warnings and errors, newest last."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import RichLog

from engine.rundir.report import fmt_duration, fmt_value
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
LOG_WARNING_WORDS = ("warning", "error", "traceback", "exception")


def describe_event(event: dict) -> str:
    """One line for an event, without the time."""
    kind = event.get("type", "?")
    if kind == "stage_start":
        return event.get("message") or f"stage {event.get('stage')}"
    if kind == "stage_end":
        peak = event.get("peak_rss_mib")
        return f"{event.get('stage')} done in {fmt_duration(event.get('wall_s'))}" + (
            f", peak {peak:.0f} MiB" if isinstance(peak, (int, float)) else ""
        )
    if kind == "checkpoint":
        return f"checkpoint {event.get('name', '')}"
    if kind == "judge":
        return f"judge ({event.get('judge', '')}): {event.get('judged', '?')} judged of {event.get('kept', '?')} kept"
    if kind == "samples":
        return f"{event.get('count', '?')} {event.get('kind', '')} samples"
    if kind == "resume":
        return f"resumed from checkpoint {event.get('checkpoint')}: events from seq {event.get('rewind_to_seq')} replayed"
    if kind == "run_end":
        return f"run {event.get('status', 'ended')}" + (f": {event['error']}" if event.get("error") else "")
    if kind == "error":
        return f"error: {event.get('message', '')}"
    if kind == "warning":
        return f"warning [{event.get('code', '?')}]: {event.get('message', '')}"
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
        for event in events[self._events_shown :]:
            if event.get("type") in QUIET_EVENTS:
                continue
            line = Text(no_wrap=event.get("type") not in ALERT_EVENTS)  # a warning is read whole
            line.append(f"{fmt_duration(event.get('elapsed')):>7} ", style="dim")
            line.append(describe_event(event), style=EVENT_STYLES.get(event.get("type", ""), ""))
            log.write(line)
        self._events_shown = len(events)
        self._last_seq = events[-1].get("seq") if events else None
        new_lines = min(run.log_total - self._log_shown, len(run.log_lines))
        for text in list(run.log_lines)[len(run.log_lines) - new_lines :] if new_lines > 0 else []:
            lowered = text.lower()
            if any(word in lowered for word in LOG_WARNING_WORDS):
                log.write(Text(f"    log {text}", style="yellow" if "warn" in lowered else "red"))
        self._log_shown = run.log_total

    def action_scroll_panel(self, direction: int) -> None:
        log = self.query_one(RichLog)
        log.scroll_to(y=log.scroll_y + direction * max(1, log.size.height - 1), animate=False)
