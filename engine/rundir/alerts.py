"""Alerts: which runs need a look (failed, stale, warnings raised), for `zopro ls` and the TUI.

`alert_line(info)` says in one line what is wrong with a run, or None; `AlertTracker` compares one listing
of the runs with the previous one and returns what became news (a run failed, went stale, or raised new
warnings), so a reader can notify once per change, wherever its user is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.rundir.reader import STALE_AFTER_SECONDS, RunInfo, pid_alive, process_suspended


def stale_reason(info: RunInfo, now: float | None = None) -> str:
    now = time.time() if now is None else now
    if info.heartbeat is not None and now - info.heartbeat >= STALE_AFTER_SECONDS:
        silent = int(now - info.heartbeat)
        reason = f"no heartbeat for {silent // 60} min {silent % 60} s" if silent >= 60 else "no heartbeat"
    else:
        reason = "no heartbeat"
    if info.pid and not pid_alive(info.pid):
        reason += f", its process (pid {info.pid}) is gone"
    return reason


def alert_line(info: RunInfo, now: float | None = None) -> tuple[str, str] | None:
    """(kind, one line) for a run that failed, went stale or raised warnings; None for a healthy one."""
    if info.status == "failed":
        return "failed", f"{info.name} failed: {info.error or 'see its events.jsonl'}"
    if info.status == "stale" and process_suspended(info.pid):
        return "stale", (
            f"{info.name} is stale: its process (pid {info.pid}) is stopped (SIGSTOP or Ctrl-Z), not crashed; "
            f"`kill -CONT {info.pid}` (or `fg` in its terminal) lets it go on"
        )
    if info.status == "stale":
        return "stale", (
            f"{info.name} is stale ({stale_reason(info, now)}); it may have crashed: "
            f"`zopro run --resume {info.path}` continues it"
        )
    if info.status == "unreadable":
        return "unreadable", f"{info.name} cannot be read: {info.error or ''}"
    if info.warning_count:
        last = info.warnings[-1] if info.warnings else {}
        plural = "s" if info.warning_count > 1 else ""
        return "warning", (
            f"{info.name} raised {info.warning_count} warning{plural}; the last "
            f"[{last.get('code', '?')}]: {last.get('message', '')}"
        )
    return None


@dataclass
class Alert:
    path: object
    kind: str  # failed, stale, warning
    title: str
    message: str
    severity: str  # error, warning


class AlertTracker:
    """What changed since the previous listing: a run that became failed or stale, or raised warnings.

    The first listing only sets the baseline (a failure from yesterday is in `zopro ls`, not news)."""

    def __init__(self) -> None:
        self.known: dict[object, tuple[str, int]] | None = None

    def update(self, runs: list[RunInfo]) -> list[Alert]:
        now = {info.path: (info.status, info.warning_count) for info in runs}
        if self.known is None:
            self.known = now
            return []
        alerts = []
        for info in runs:
            status, warnings = now[info.path]
            before_status, before_warnings = self.known.get(info.path, ("created", 0))
            if status in ("failed", "stale") and before_status != status:
                line = alert_line(info)
                alerts.append(
                    Alert(
                        info.path,
                        status,
                        f"{info.name} {status}",
                        line[1] if line else status,
                        "error" if status == "failed" else "warning",
                    )
                )
            elif warnings > before_warnings:
                last = info.warnings[-1] if info.warnings else {}
                alerts.append(
                    Alert(
                        info.path,
                        "warning",
                        f"warning: {last.get('code', '?')}",
                        f"{info.name}: {last.get('message', '')}",
                        "warning",
                    )
                )
        self.known = now
        return alerts
