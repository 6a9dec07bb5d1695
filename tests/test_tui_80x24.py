"""A newcomer's terminal: snapshots at 80x24 and 120x40 of real run directories in every state a first run
goes through (SFT, the reward stage, policy optimisation, stopped after a pause, finished) and of the runs
list with long names, and the checks behind them (one iteration count, fitted columns, the help screen).

The run directories are copies the real engine wrote (tests/fixtures/run_stages/, recorded by its
record.py). A live one gets this test's pid and a fresh heartbeat, so that it reads as running, and the
reader's clock is frozen, so that elapsed time and ETA are the same on every machine. Update after a
deliberate change with `pytest tests/test_tui_80x24.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from rich.console import Console

import engine.rundir.reader as reader
from tests.conftest import REPO
from zopro_tui.app import ZoproApp
from zopro_tui.screens.dashboard import DashboardScreen
from zopro_tui.screens.help import HelpScreen, bindings_table

STAGES = REPO / "tests" / "fixtures" / "run_stages"
SIZES = [(80, 24), (120, 40)]
LONG_NAMES = {  # differ only at the start or the end, as real run folders do
    "finished": "tiny-compare-rloo-lr1e-3-seed0-20261206-120455",
    "stopped": "tiny-compare-rloo-lr1e-3-seed0-20261206-131502",
    "policy": "sweep-of-a-long-recipe-name-rloo.lr=3e-3-seed=1",
}


class FrozenClock:
    """The reader's `time` module with `time()` fixed: elapsed and ETA of a live run stop moving."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A function that copies a recorded run directory under tmp_path/runs (relative paths on screen)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    frozen: list[float] = []

    def copy(stage: str, name: str = "fast-rloo") -> Path:
        target = Path("runs") / name
        shutil.copytree(STAGES / stage / "fast-rloo", target)
        status = json.loads((target / "status.json").read_text())
        if status["state"] in ("running", "paused"):  # the recorded process is gone: this test is its writer
            now = status["updated"] + 2.0
            status["pid"] = os.getpid()
            (target / "status.json").write_text(json.dumps(status))
            (target / "heartbeat").write_text(f"{now}\n")
            frozen.append(now)
            monkeypatch.setattr(reader, "time", FrozenClock(now))
        return target

    yield copy
    monkeypatch.undo()
    time.tzset()


async def settle(pilot, ready, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError("the run was not read in time")
        await pilot.pause(0.1)
    screen = pilot.app.screen
    if hasattr(screen, "redraw"):
        screen.redraw(force=True)
    await pilot.pause(0.3)


def screen_text(app) -> str:
    """What the terminal shows, as lines of plain text."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def dashboard_ready(app) -> bool:
    screen = app.screen
    return isinstance(screen, DashboardScreen) and screen.run.caught_up and screen.run.info is not None


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("stage", ["sft", "reward", "policy", "stopped"])
def test_dashboard_of_a_real_run(snap_compare, runs, stage, size):
    """The running stage's charts first, the panels that cannot have data yet aside; after a stop the
    run_stopped event (not the output log); iterations counted from 1 in the header and the events."""
    run = runs(stage)
    app = ZoproApp(Path("runs"), attach=run)

    async def ready(pilot):
        await settle(pilot, lambda: dashboard_ready(app))

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_runs_list_with_long_names(snap_compare, runs, size):
    for stage, name in LONG_NAMES.items():
        runs(stage, name)
    app = ZoproApp(Path("runs"))

    async def ready(pilot):
        def listed() -> bool:
            table = app.screen.query_one("#runs")
            return table.row_count == len(LONG_NAMES) and not table._require_update_dimensions

        await settle(pilot, listed)

    assert snap_compare(app, terminal_size=size, run_before=ready)


async def test_the_runs_list_fits_80_columns_and_keeps_names_apart(runs):
    for stage, name in LONG_NAMES.items():
        runs(stage, name)
    app = ZoproApp(Path("runs"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, lambda: app.screen.query_one("#runs").row_count == len(LONG_NAMES))
        table = app.screen.query_one("#runs")
        headers = [str(column.label) for column in table.ordered_columns]
        assert headers == ["run", "status", "position", "gold", "win", "time +left"], (
            "method and fixed RM go first"
        )
        width = sum(column.get_render_width(table) for column in table.ordered_columns)
        assert width <= 80, f"{width} columns of cells at 80: {headers}"
        names = [str(table.get_row_at(row)[0]).strip() for row in range(table.row_count)]
        assert len(set(names)) == len(names) and all("…" in name for name in names), names
        golds = [str(table.get_row_at(row)[headers.index("gold")]) for row in range(table.row_count)]
        assert all(gold == "-" or len(gold.split(".")[-1]) == 3 for gold in golds), golds  # never cut
        footer = app.screen.query_one("Footer")
        assert "Help" in " ".join(str(key.description) for key in footer.query("FooterKey"))


async def test_help_at_80x24_says_how_to_close_it_and_lists_the_list_keys(runs):
    runs("finished")
    app = ZoproApp(Path("runs"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, lambda: app.screen.query_one("#runs").row_count == 1)
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        assert isinstance(app.screen, HelpScreen)
        assert "esc, ? or q: close" in screen_text(app), "in sight at 80x24 without scrolling"
        console = Console(width=100, file=io.StringIO())
        console.print(bindings_table(app.screen.below))
        keys = {
            line.split()[0]: " ".join(line.split()[1:])
            for line in console.file.getvalue().splitlines()
            if line.split()
        }
        assert keys.get("enter") == "Open" and keys.get("j") == "Down" and keys.get("k") == "Up", keys
        await pilot.press("q")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, HelpScreen)


async def test_the_new_run_picker_preselects_the_embedded_default(runs):
    runs("finished")
    app = ZoproApp(Path("runs"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, lambda: app.screen.query_one("#runs").row_count == 1)
        await pilot.press("n")
        await pilot.pause(0.3)
        modal = app.screen
        assert modal.chosen is not None and modal.chosen.name == "tiny.toml"
        picker = modal.query_one("#recipes")
        assert modal.recipes[picker.highlighted].name == "tiny.toml"
        assert "Start a run now" in str(modal.query_one(".dialog-title").render())


def test_stage_messages_and_the_events_pane_count_iterations_from_one():
    from engine.rundir.reader import read_events
    from zopro_tui.widgets.events import describe_event

    events = read_events(STAGES / "finished" / "fast-rloo")
    starts = [e for e in events if e["type"] == "stage_start" and e["iteration"] is not None]
    assert starts[0]["iteration"] == 0 and starts[0]["message"] == "iteration 1/3: policy optimisation"
    assert [describe_event(e, 3) for e in starts] == [e["message"] for e in starts]
    evals = [e for e in events if e["type"] == "eval"]
    assert all("eval/reward_initial" in e["metrics"] for e in evals), "the fixed-RM score at every evaluation"
    end = [e for e in events if e["type"] == "run_end"][-1]
    assert end["global_step"] == [e for e in events if e["type"] == "run_start"][0]["total_steps"]


async def test_a_warning_is_told_once_with_the_stop_dialog_open(runs):
    """The run's own dashboard tells its warnings; the app-wide alert stays quiet for that run even under
    a dialog (the stop confirmation) and whether its path is written relative or absolute."""
    from engine.rundir.alerts import Alert
    from zopro_tui import alerts
    from zopro_tui.screens.modals import ConfirmModal

    run = runs("stopped")
    other = runs("finished", "other-run")
    app = ZoproApp(Path("runs"), attach=run)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, lambda: dashboard_ready(app))
        app.push_screen(ConfirmModal("Stop?"))
        await pilot.pause(0.2)
        before = len(app._notifications)
        for path in (run, run.resolve()):
            alerts.notify(app, Alert(path, "warning", "warning: gold_drop", "held-out gold fell", "warning"))
        await pilot.pause(0.2)
        assert len(app._notifications) == before, "the dashboard under the dialog tells its own"
        alerts.notify(app, Alert(other, "warning", "warning: gold_drop", "held-out gold fell", "warning"))
        await pilot.pause(0.2)
        assert len(app._notifications) == before + 1, "another run's warning is told"
