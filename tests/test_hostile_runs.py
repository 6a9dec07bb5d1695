"""Hostile run directories next to good ones: every reader (`zopro ls/status/export`, the TUI) reports the bad
run as bad, in a line or a marked row, and every other run stays usable; a TUI-started run runs the
installed engine whatever folder the user stands in, and a start that fails says so in the header."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli.app import app
from engine.rundir.reader import EventTail, list_runs, read_events
from tests.conftest import FAST_RECIPE, REPO
from zopro_tui.app import ZoproApp
from zopro_tui.launch import launch, plan_run
from zopro_tui.reading import RunReader
from zopro_tui.screens.dashboard import DashboardScreen
from zopro_tui.screens.runs import RunsScreen
from zopro_tui.series_parser import sample_events

FIXTURE = REPO / "tests" / "fixtures" / "run_tiny" / "fast-seed0"

BAD_STATUS = ["[1, 2]", '"running"', "42", "null", "{", '{"state": ["x"]}', b"\xff\xfe{}", "[" * 100000]


def good_and_bad(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "runs"
    good, bad = root / "good", root / "bad"
    shutil.copytree(FIXTURE, good)
    shutil.copytree(FIXTURE, bad)
    return good, bad


@pytest.mark.parametrize("text", BAD_STATUS, ids=range(len(BAD_STATUS)))
def test_a_status_that_is_not_an_object_marks_only_that_run(tmp_path, text):
    good, bad = good_and_bad(tmp_path)
    (bad / "status.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    runs = {info.name: info for info in list_runs(good.parent)}
    assert runs["good"].status == "finished" and runs["bad"].status == "unreadable"
    assert "status.json" in runs["bad"].error
    result = CliRunner().invoke(app, ["ls", "--root", str(good.parent)])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "good" in result.stdout and "unreadable" in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and "bad" in result.stderr
    status = CliRunner().invoke(app, ["status", str(bad)])
    assert status.exit_code == 2 and len(status.stderr.strip().splitlines()) == 1


BAD_LINES = [
    b"42",
    b'"a string"',
    b"[1, 2]",
    b"null",
    b'{"seq": "x", "type": "metrics", "metrics": {}}',
    b'{"seq": 3, "type": 7}',
    b'{"seq": 3, "type": "metrics", "metrics": "lots"}',
    b'{"seq": 3, "type": "metrics", "iteration": "two", "metrics": {}}',
    b'{"seq": 3, "type": "resume", "rewind_to_seq": "zero"}',
    b'{"seq": 3, "type": "metrics", "elapsed": [], "metrics": {}}',
    b'{"seq": 3, "type": "metrics", "stage": {}, "metrics": {}}',
    b'{"seq": true, "type": "metrics", "metrics": {}}',
    b"\xff\xfe\x00 not utf-8",
    b'{"type": "metrics", "metrics": {"objective/scores": "\xff"}}',
    b"[" * 100000 + b"]" * 100000,
]


def test_event_lines_of_the_wrong_shape_are_skipped_and_counted(tmp_path):
    _, bad = good_and_bad(tmp_path)
    lines = (bad / "events.jsonl").read_bytes().splitlines(keepends=True)
    wanted = len([e for e in read_events(bad) if e["type"] == "metrics"])
    middle = len(lines) // 2
    (bad / "events.jsonl").write_bytes(
        b"".join(lines[:middle]) + b"\n".join(BAD_LINES) + b"\n" + b"".join(lines[middle:])
    )
    tail = EventTail(bad / "events.jsonl")
    events = tail.read_new()
    assert tail.bad_lines == len(BAD_LINES) and all(isinstance(e, dict) for e in events)
    assert len([e for e in read_events(bad) if e["type"] == "metrics"]) == wanted
    for command in (
        ["status", str(bad)],
        ["status", str(bad), "--json"],
        ["export", str(bad)],
        ["export", str(bad), "-f", "json"],
    ):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
        assert f"skipped {len(BAD_LINES)} line(s)" in result.stderr
    json.loads(CliRunner().invoke(app, ["status", str(bad), "--json"]).stdout)


def test_events_that_are_a_folder_are_one_sentence_and_the_run_is_marked(tmp_path):
    good, bad = good_and_bad(tmp_path)
    (bad / "events.jsonl").unlink()
    (bad / "events.jsonl").mkdir()
    runs = {info.name: info for info in list_runs(good.parent)}
    assert runs["bad"].status == "unreadable" and runs["good"].status == "finished"
    for command in (["status", str(bad)], ["export", str(bad)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "events.jsonl" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_60_mb_unterminated_line_neither_spins_nor_is_held(tmp_path):
    _, bad = good_and_bad(tmp_path)
    with open(bad / "events.jsonl", "ab") as events:
        events.write(b'{"type": "metrics", "junk": "' + b"x" * (60 << 20))
    started = time.monotonic()
    events = sample_events(bad / "events.jsonl", 3000)
    assert time.monotonic() - started < 20
    assert events and all(isinstance(e, dict) for e in events)
    reader = RunReader(bad)
    for _ in range(40):
        reader.read_series()
        if not reader.behind:
            break
    assert not reader.behind, "the reader keeps re-reading the same unterminated line"
    assert reader.tail.bad_lines == 1


async def test_tui_lists_every_run_and_follows_one_with_bad_lines(tmp_path):
    good, bad = good_and_bad(tmp_path)
    lines = (bad / "events.jsonl").read_bytes().splitlines(keepends=True)
    (bad / "events.jsonl").write_bytes(
        b"".join(lines[:5]) + b"\n".join(BAD_LINES) + b"\n" + b"".join(lines[5:])
    )
    broken = good.parent / "broken"
    shutil.copytree(FIXTURE, broken)
    (broken / "status.json").write_text("[1]")
    tui = ZoproApp(good.parent)
    async with tui.run_test(size=(120, 36)) as pilot:
        await _until(pilot, lambda: tui.screen.query_one("#runs").row_count == 3, "three rows")
        assert isinstance(tui.screen, RunsScreen)
    attached = ZoproApp(good.parent, attach=bad)
    async with attached.run_test(size=(120, 36)) as pilot:
        await _until(pilot, lambda: isinstance(attached.screen, DashboardScreen), "the dashboard")
        screen = attached.screen
        await _until(pilot, lambda: screen.run.caught_up and len(screen.run.store) > 0, "the metrics")
        assert screen.run.status == "finished"


async def _until(pilot, condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.1)


def test_a_tui_run_never_imports_an_engine_folder_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "engine").mkdir()
    marker = tmp_path / "hijacked"
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "cli.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    plan = plan_run(recipe, ["model.base=/nonexistent/model"], tmp_path / "runs")
    started = launch(plan)
    assert started.process.wait(timeout=120) == 2
    assert not marker.exists(), "the engine/ folder in the current directory was run"
    assert "model.base" in started.log_path.read_text()


async def test_a_tui_run_that_fails_while_loading_says_so_in_the_header(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "fast.toml").write_text(FAST_RECIPE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    tui = ZoproApp(tmp_path / "runs")
    async with tui.run_test(size=(140, 36)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("n")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.press(*"model.base=/nonexistent/model", "enter")
        await _until(pilot, lambda: isinstance(tui.screen, DashboardScreen), "the dashboard")
        screen = tui.screen
        launched = tui.launched[screen.run.path]
        await _until(pilot, lambda: not launched.alive(), "the run's process to exit", timeout=120)

        def header() -> str:
            return str(screen.query_one("#run-header").render())

        await _until(pilot, lambda: "failed to start" in header() and "model.base" in header(), "the failure")
        assert "loading the model" not in header()


def test_a_control_request_to_a_run_still_starting_creates_nothing(tmp_path):
    from engine.rundir.controls import send_control
    from engine.rundir.files import RunDirError

    starting = tmp_path / "runs" / "starting"  # the TUI shows it while the engine loads the model
    with pytest.raises(RunDirError, match="not a run directory yet"):
        send_control(starting, "pause")
    assert not starting.exists(), "the run would then find its --run-dir taken and refuse to start"
