"""The workbench driven only by keys, over real run directories and a real detached training process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from textual.widgets import RichLog

from engine.rundir.report import export_metrics
from tests.conftest import FAST_RECIPE, REPO
from zopro_tui.app import ZoproApp
from zopro_tui.screens.compare import CompareScreen
from zopro_tui.screens.dashboard import DashboardScreen
from zopro_tui.screens.help import HelpScreen
from zopro_tui.screens.modals import ConfirmModal
from zopro_tui.screens.runs import RunsScreen, RunsTable
from zopro_tui.widgets.panel import ChartGridPanel

FIXTURE_ROOT = REPO / "tests" / "fixtures" / "run_tiny"
FIXTURE_RUN = FIXTURE_ROOT / "fast-seed0"


async def wait_for(pilot, condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Let the app run until `condition()` holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.2)


async def choose_recipe(pilot, app: ZoproApp, name: str) -> None:
    """In the open recipe picker, move to the first recipe (the embedded default is preselected) and check
    it is `name`, the test's own."""
    await pilot.press("home")
    await pilot.pause(0.1)
    assert app.screen.chosen is not None and app.screen.chosen.name == name, app.screen.chosen


def dashboard(app: ZoproApp) -> DashboardScreen:
    screen = app.screen
    assert isinstance(screen, DashboardScreen), f"expected the dashboard, got {type(screen).__name__}"
    return screen


def live_copy(tmp_path: Path, state: str = "running", **status: object) -> Path:
    """A copy of the fixture run that reads as live: fresh heartbeat, and this test process as its writer."""
    run = tmp_path / "runs" / "live"
    shutil.copytree(FIXTURE_RUN, run)
    data = json.loads((run / "status.json").read_text())
    data.update(state=state, pid=os.getpid(), updated=time.time(), **status)
    (run / "status.json").write_text(json.dumps(data))
    (run / "heartbeat").write_text(f"{time.time()}\n")
    return run


# -- the whole story, with a real detached run (about 40 s: a real training process) -----------------------------
@pytest.mark.slow
async def test_start_watch_pause_resume_detach_and_reattach(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "fast.toml").write_text(FAST_RECIPE)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs"
    process: subprocess.Popen | None = None
    try:
        app = ZoproApp(root, export_dir=tmp_path)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunsScreen)
            await pilot.press("n")
            await pilot.pause(0.3)
            await choose_recipe(pilot, app, "fast.toml")
            await pilot.press("enter")
            # long enough to pause in the middle of the policy stage
            await pilot.press(*"train.iterations=40", "space", *"train.updates_per_iteration=20", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 10, "the dashboard")
            screen = dashboard(app)
            run_dir = screen.run.path
            process = app.launched[run_dir].process
            curves = screen.query_one("#curves", ChartGridPanel)

            def reward_points() -> int:
                series = curves.charts[0].data.series
                return len(series[0].x) if series else 0

            await wait_for(
                pilot, lambda: reward_points() >= 2, 150, "the first reward-model points on the chart"
            )

            await pilot.press("p")
            await wait_for(pilot, lambda: screen.run.status == "paused", 60, "the run to pause")
            paused_at = screen.run.info.global_step
            await pilot.pause(2.5)
            assert screen.run.status == "paused"
            assert screen.run.info.global_step == paused_at, "steps advanced while paused"

            await pilot.press("r")
            await wait_for(pilot, lambda: screen.run.info.global_step > paused_at, 60, "steps after resume")
            await pilot.press("q")
        assert process.poll() is None, "quitting the TUI must leave the run running"
        assert app.return_value and str(run_dir) in app.return_value and "keep" in app.return_value

        attached = ZoproApp(root, attach=run_dir, export_dir=tmp_path)
        async with attached.run_test(size=(120, 36)) as pilot:
            await wait_for(pilot, lambda: isinstance(attached.screen, DashboardScreen), 5, "the dashboard")
            screen = dashboard(attached)
            await wait_for(
                pilot, lambda: screen.run.status == "running", 20, "the attached run to read as running"
            )
            seen = screen.run.store.count("objective/scores")
            await wait_for(pilot, lambda: screen.run.store.count("objective/scores") > seen, 60, "new points")
            await pilot.press("s")
            await pilot.pause(0.3)
            await pilot.press("y")
            await wait_for(pilot, lambda: screen.run.status == "stopped", 90, "the run to stop")
        assert process.wait(timeout=60) == 0
    finally:
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# -- quick ones, over the fixture runs --------------------------------------------------------------------------
async def test_runs_screen_lists_filters_marks_and_compares():
    app = ZoproApp(FIXTURE_ROOT)
    async with app.run_test(size=(120, 30)) as pilot:
        table = app.screen.query_one(RunsTable)
        await wait_for(pilot, lambda: table.row_count == 2, 10, "two runs in the table")
        await pilot.press("slash", *"seed1", "enter")
        await pilot.pause(0.2)
        assert table.row_count == 1
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert table.row_count == 2
        await pilot.press("c")  # nothing marked: a warning, no screen
        await pilot.pause(0.2)
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("space", "j", "space", "c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), 5, "the compare screen")
        compare = app.screen
        await wait_for(
            pilot, lambda: all(run.caught_up for run in compare.runs.values()), 10, "both runs read"
        )
        compare.redraw(force=True)
        await pilot.pause(0.2)
        assert len(compare.charts[0].data.series) == 2, "both runs overlaid"
        assert compare.query_one("#compare-table").row_count == 2
        await pilot.press("x")
        assert compare.view.axis == "time"
        await pilot.press("escape", "k", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "a dashboard")


async def test_dashboard_keys_axis_smoothing_cursor_zoom_panels_help(tmp_path):
    app = ZoproApp(FIXTURE_ROOT, attach=FIXTURE_RUN, export_dir=tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        screen = dashboard(app)
        await wait_for(pilot, lambda: screen.run.caught_up and screen.run.samples, 10, "the fixture read")
        assert not screen.query_one("#zo").display, "no zeroth-order panel for a first-order run"
        await pilot.press("x", "x")
        assert screen.view.axis == "compute"
        await pilot.press("x", "e")
        assert screen.view.axis == "step" and screen.view.smoothing > 0
        await pilot.press("h", "h")
        low, high = screen.data_range()
        assert screen.view.cursor is not None and low <= screen.view.cursor < high
        await pilot.press("plus")
        assert screen.view.window is not None and screen.view.window[1] - screen.view.window[0] < high - low
        await pilot.press("0", "G")
        assert screen.view.window is None and screen.view.cursor is None
        await pilot.press("z")
        assert screen.zoomed == "curves"
        await pilot.press("j")
        assert screen.zoomed == "interplay"
        await pilot.press("escape")
        assert screen.zoomed is None
        await pilot.press("5")
        assert screen.zoomed == "samples" and screen.query_one("#samples").display
        await pilot.press("5", "question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "S", "E")
        await wait_for(
            pilot, lambda: len(list(tmp_path.glob("*-metrics.*"))) == 2, 10, "the exported metrics"
        )
        assert list(tmp_path.glob("zopro-dashboard-*.svg")), "the screen saved as SVG"
        assert (tmp_path / "fast-seed0-metrics.csv").read_text() == export_metrics(FIXTURE_RUN, "csv")


def screen_text(app: ZoproApp) -> str:
    """The current screen as the terminal shows it, as text (how App.export_screenshot renders it)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


@pytest.mark.parametrize("size", [(20, 6), (80, 24), (200, 60)])
async def test_every_screen_draws_at_any_size(size):
    """Each key lands on the screen or panel it names, and that screen draws its own words inside the
    terminal's size, from 20 x 6 up."""
    width, height = size
    app = ZoproApp(FIXTURE_ROOT, attach=FIXTURE_RUN)
    async with app.run_test(size=size) as pilot:

        async def shows(keys: tuple[str, ...], kind: type, zoomed: str | None, *words: str) -> None:
            await pilot.press(*keys)

            def drawn() -> bool:
                screen, text = app.screen, screen_text(app)
                return (
                    isinstance(screen, kind)
                    and getattr(screen, "zoomed", None) == zoomed
                    and all(word in text for word in words)
                )

            await wait_for(pilot, drawn, 10, f"{kind.__name__} zoomed={zoomed} showing {words} after {keys}")
            lines = screen_text(app).rstrip("\n").split("\n")
            assert len(lines) == height and all(cell_len(line) <= width for line in lines), lines

        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        await wait_for(pilot, lambda: dashboard(app).run.caught_up, 10, "the fixture read")
        await shows((), DashboardScreen, None, "fast-seed0", "curves")
        await shows(("z",), DashboardScreen, "curves", "curves")
        await shows(("j",), DashboardScreen, "interplay", "policy-reward")
        await shows(("escape",), DashboardScreen, None, "fast-seed0", "curves")
        await shows(("l", "plus"), DashboardScreen, None, "fast-seed0")
        await shows(("6",), DashboardScreen, "events", "events")
        await shows(("question_mark",), HelpScreen, None, "zopro-tu")
        await shows(("escape", "escape", "escape"), RunsScreen, None, "fast-seed1", "fast-seed0")
        await shows(("space", "j", "space", "c"), CompareScreen, None, "compare", "fast-seed1")
        await shows(("h", "x"), CompareScreen, None, "compare")
        await shows(("escape",), RunsScreen, None, "fast-seed1")


async def test_controls_write_requests_and_readonly_hides_them(tmp_path):
    """Each wait is for the thing the key causes (a request file, the dialog, a zoom pressed after the keys
    under test, which the screen handles after them), never a fixed sleep."""
    run = live_copy(tmp_path)
    control = run / "control"
    app = ZoproApp(tmp_path / "runs", attach=run)
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        screen = dashboard(app)
        await wait_for(pilot, lambda: screen.run.status == "running", 10, "a live run")
        await pilot.press("p", "c")
        await wait_for(
            pilot,
            lambda: (control / "pause").exists() and (control / "checkpoint").exists(),
            5,
            "the requests",
        )
        (control / "checkpoint").unlink()
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), 5, "the stop dialog")
        await pilot.press("n")  # not confirmed: nothing written
        await wait_for(pilot, lambda: app.screen is screen, 5, "the dialog to close")
        await pilot.press("c")  # handled after the dialog's answer: once it is written, "n" has been too
        await wait_for(pilot, lambda: (control / "checkpoint").exists(), 5, "the checkpoint after the dialog")
        assert not (control / "stop").exists()
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal), 5, "the stop dialog")
        await pilot.press("y")  # confirmed: written
        await wait_for(pilot, lambda: (control / "stop").exists(), 5, "the stop request")

    shutil.rmtree(control)
    readonly = ZoproApp(tmp_path / "runs", attach=run, readonly=True)
    async with readonly.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: isinstance(readonly.screen, DashboardScreen), 5, "the dashboard")
        screen = dashboard(readonly)
        await wait_for(pilot, lambda: screen.run.status == "running", 10, "a live run")
        await pilot.press("p", "s", "y", "c", "6")  # the zoom comes after the others: all were handled
        await wait_for(pilot, lambda: screen.zoomed == "events", 5, "the zoom pressed after the controls")
        assert readonly.screen is screen  # no stop dialog
        assert not control.exists()
        assert screen.check_action("control", ("pause",)) is False


async def test_a_run_that_fails_while_watched_shows_a_toast_and_its_error(tmp_path):
    run = live_copy(tmp_path)
    app = ZoproApp(tmp_path / "runs", attach=run)
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        screen = dashboard(app)
        await wait_for(pilot, lambda: screen.run.status == "running", 10, "a live run")
        status = json.loads((run / "status.json").read_text())
        status.update(state="failed", error="NaN in the policy loss at update 3")
        (run / "status.json").write_text(json.dumps(status))
        await wait_for(pilot, lambda: screen.run.status == "failed", 10, "the failure")
        header = screen.query_one("#run-header")
        await wait_for(
            pilot, lambda: "NaN in the policy loss" in str(header.render()), 5, "the error in the header"
        )
        await wait_for(
            pilot,
            lambda: any("NaN in the policy loss" in n.message for n in app._notifications),
            5,
            "the failure toast",
        )


def test_tui_imports_no_training_stack():
    code = "import sys, zopro_tui.app; bad = {'torch', 'transformers', 'datasets', 'peft'} & set(sys.modules); print(bad)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "set()"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["nowhere"], "does not exist"),
        ([str(FIXTURE_ROOT)], "is not a run directory"),
        ([str(REPO / "recipes" / "tiny.toml"), "--set", "train.iterations=0"], "train.iterations"),
        ([str(FIXTURE_RUN), "--set", "seed=1"], "applies to a recipe"),
    ],
)
def test_bad_targets_get_one_sentence_and_exit_2(args, says):
    result = subprocess.run(
        [sys.executable, "-m", "zopro_tui.app", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_a_warning_while_watched_is_highlighted_notified_and_marked(tmp_path):
    run = live_copy(tmp_path)
    app = ZoproApp(tmp_path / "runs", attach=run)
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        screen = dashboard(app)
        await wait_for(pilot, lambda: screen.run.caught_up and screen.run.live, 10, "the caught-up live run")
        assert not any(n.severity == "warning" for n in app._notifications)
        message = "held-out KL to the reference jumped from 0.91 to 14.40 nats (x15.8) in one iteration"
        warning = {"code": "kl_jump", "message": message, "iteration": 2, "step": 0}
        with open(run / "events.jsonl", "a") as events:
            events.write(
                json.dumps(
                    {
                        "seq": 88,
                        "type": "warning",
                        "time": time.time(),
                        "stage": "eval",
                        "global_step": 60,
                        "elapsed": 17.0,
                        "kl": 14.4,
                        "kl_before": 0.91,
                        **warning,
                    }
                )
                + "\n"
            )
        status = json.loads((run / "status.json").read_text())
        status.update(warnings=[warning], warning_count=1, updated=time.time())
        (run / "status.json").write_text(json.dumps(status))
        await wait_for(
            pilot,
            lambda: any(n.severity == "warning" and message in n.message for n in app._notifications),
            10,
            "the warning toast",
        )
        screen.redraw(force=True)
        await pilot.pause(0.2)
        pane = screen.query_one("#events").query_one(RichLog)
        lines = [strip.text for strip in pane.lines]
        assert any("warning [kl_jump]" in line for line in lines), lines[-5:]
        header = screen.query_one("#run-header")
        await wait_for(pilot, lambda: "!1" in str(header.render()), 5, "the warning count in the header")
