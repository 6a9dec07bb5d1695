"""Snapshots of the runs list, the dashboard and the compare screen at 80x24 and 160x48, over the fixture runs.

The fixture runs are finished, so every figure on screen (elapsed, steps/s, scores) comes from their files,
not from the clock. Update after a deliberate change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from zopro_tui.app import ZoproApp
from zopro_tui.screens.compare import CompareScreen
from zopro_tui.screens.dashboard import DashboardScreen

ROOT = Path("tests/fixtures/run_tiny")  # relative, so the title reads the same on every machine
SIZES = [(80, 24), (160, 48)]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TZ", "UTC")  # the runs screen shows start times in local time
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def settle(pilot, ready, timeout: float = 10) -> None:
    """Wait until the background readers delivered everything, then draw once more."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError("the fixture was not read in time")
        await pilot.pause(0.1)
    screen = pilot.app.screen
    if hasattr(screen, "redraw"):
        screen.redraw(force=True)
    await pilot.pause(0.2)


def runs_table_sized(app) -> bool:
    """Both runs in the table, and its columns widened to them (the table sizes its columns lazily)."""
    table = app.screen.query_one("#runs")
    return table.row_count == 2 and not table._require_update_dimensions  # DataTable resizes on its Idle


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_runs_screen(snap_compare, size):
    async def ready(pilot):
        await settle(pilot, lambda: runs_table_sized(pilot.app))

    assert snap_compare(ZoproApp(ROOT), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dashboard(snap_compare, size):
    app = ZoproApp(ROOT, attach=ROOT / "fast-seed0")

    async def ready(pilot):
        def loaded() -> bool:
            screen = app.screen
            return isinstance(screen, DashboardScreen) and screen.run.caught_up and bool(screen.run.samples)

        await settle(pilot, loaded)

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_compare_screen(snap_compare, size):
    app = ZoproApp(ROOT)

    async def ready(pilot):
        await settle(pilot, lambda: runs_table_sized(app))
        await pilot.press("space", "j", "space", "c")

        def loaded() -> bool:
            screen = app.screen
            return isinstance(screen, CompareScreen) and all(run.caught_up for run in screen.runs.values())

        await settle(pilot, loaded)

    assert snap_compare(app, terminal_size=size, run_before=ready)
