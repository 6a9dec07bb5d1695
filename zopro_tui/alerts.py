"""App-wide alerts: a run under the root folder (or in a sweep there) that fails, goes stale or raises a
warning gets a notification wherever the user is in the TUI (the dashboard of that very run already says so
itself). A background worker lists the runs and posts; the app notifies."""

from __future__ import annotations

from pathlib import Path

from engine.rundir.alerts import Alert, AlertTracker
from engine.rundir.reader import list_runs
from zopro_tui.polling import poll

POLL_SECONDS = 2.0


def all_runs(root: Path):
    from engine.jobs.sweep import list_sweeps

    runs = list_runs(root)
    for sweep in list_sweeps(root):
        runs.extend(sweep.runs)
    return runs


def watch(root: Path, post, cancelled, poll_seconds: float = POLL_SECONDS) -> None:
    """The body of a worker thread: post each new Alert until cancelled."""
    tracker = AlertTracker()

    def read_and_post() -> None:
        try:
            alerts = tracker.update(all_runs(root))
        except Exception:  # noqa: BLE001 - alerts are a convenience; the runs list says the rest
            alerts = []
        for alert in alerts:
            post(alert)

    poll(read_and_post, poll_seconds, cancelled)


def notify(app, alert: Alert) -> None:
    """Notify unless that run's own dashboard is open, on top or under a dialog (it tells its own): one
    notification per warning, however the run's path was written (relative, absolute)."""
    for screen in app.screen_stack:
        watched = getattr(getattr(screen, "run", None), "path", None)
        if watched is not None and Path(watched).resolve() == Path(alert.path).resolve():
            return
    app.notify(alert.message, title=alert.title, severity=alert.severity, timeout=10)
