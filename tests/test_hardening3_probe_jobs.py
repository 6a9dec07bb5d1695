"""Hardening, third pass (issue 20): the probe beyond the issue's list, sweeps, the queue and signals. A
sweep or queue folder received from someone else never makes zopro write or remove outside it."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from rich.console import Console

from engine.jobs import queue
from engine.jobs.sweep import SweepError, create_sweep, list_sweeps, load_sweep, write_summary
from engine.rundir.writer import RunDirError, RunWriter
from tests.conftest import FAST_RECIPE, zopro_popen
from tests.runs import wait_for
from tests.test_hardening3_security import make_victim, picture

FIXTURE = Path(__file__).parent / "fixtures" / "run_tiny" / "fast-seed0"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    return make_victim(tmp_path / "victim")


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_RECIPE)
    return path


def a_sweep(recipe: Path, folder: Path, parallel: int = 1):
    return create_sweep(
        recipe, ["reward.lr=0.001,0.002"], [], root=folder.parent, sweep_dir=folder, parallel=parallel
    )


def damage(sweep_dir: Path, change) -> None:
    data = json.loads((sweep_dir / "sweep.json").read_text())
    change(data)
    (sweep_dir / "sweep.json").write_text(json.dumps(data))


def quiet_consoles() -> tuple[Console, Console, io.StringIO]:
    errors = io.StringIO()
    return Console(file=io.StringIO()), Console(file=errors, width=200), errors


# -- sweep.json ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d["points"].append(dict(d["points"][0])), id="p26-duplicate-name"),
        pytest.param(lambda d: d["points"][0].update(name="sweep.json"), id="p27-named-sweep-json"),
        pytest.param(lambda d: d["points"][0].update(name="recipe.toml"), id="p28-named-recipe"),
        pytest.param(lambda d: d["points"][0].update(name="a\nb\0"), id="p29-control-characters"),
        pytest.param(lambda d: d["points"][0].update(name="n" * 300), id="p30-too-long"),
        pytest.param(lambda d: d["points"][0].update(overrides="reward.lr=1"), id="p32-overrides-not-a-list"),
        pytest.param(lambda d: d.update(points={"a": 1}), id="p33-points-not-a-list"),
    ],
)
def test_p26_to_p33_a_damaged_sweep_json_is_one_sentence(tmp_path, recipe, change):
    sweep = a_sweep(recipe, tmp_path / "sweep")
    damage(sweep.path, change)
    with pytest.raises(SweepError, match="sweep.json"):
        load_sweep(sweep.path)
    assert [s.status for s in list_sweeps(tmp_path)] == ["unreadable"]


def test_p31_a_fifo_sweep_json_hangs_nothing(tmp_path, recipe):
    sweep = a_sweep(recipe, tmp_path / "sweep")
    (sweep.path / "sweep.json").unlink()
    os.mkfifo(sweep.path / "sweep.json")
    assert list_sweeps(tmp_path) == []
    with pytest.raises(SweepError, match="not a sweep directory"):
        load_sweep(sweep.path)


# -- sweep folders ----------------------------------------------------------------------------------------
def test_p34_a_linked_point_folder_is_skipped_not_written(tmp_path, recipe, victim):
    from engine.cli.sweep import run_sweep

    sweep = create_sweep(recipe, ["reward.lr=0.001"], [], root=tmp_path, sweep_dir=tmp_path / "sweep")
    (sweep.path / sweep.points[0]["name"]).symlink_to(victim)
    before = picture(victim)
    console, err, errors = quiet_consoles()
    assert run_sweep(load_sweep(sweep.path), quiet=True, console=console, err=err) == 1
    assert "symbolic link" in errors.getvalue() and picture(victim) == before


def test_p35_linked_point_logs_are_refused_not_appended_to(tmp_path, recipe, victim):
    from engine.cli.sweep import run_sweep

    sweep = a_sweep(recipe, tmp_path / "sweep", parallel=2)
    for point in sweep.points:
        (sweep.path / f"{point['name']}.log").symlink_to(victim / "notes.txt")
    before = picture(victim)
    console, err, errors = quiet_consoles()
    assert run_sweep(load_sweep(sweep.path), quiet=True, console=console, err=err) == 1
    assert errors.getvalue().count("symbolic link") == 2 and picture(victim) == before


def test_p36_a_linked_summary_is_replaced(tmp_path, recipe, victim):
    sweep = a_sweep(recipe, tmp_path / "sweep")
    (sweep.path / "summary.json").unlink()
    (sweep.path / "summary.json").symlink_to(victim / "notes.txt")
    before = picture(victim)
    write_summary(sweep)
    assert picture(victim) == before and not (sweep.path / "summary.json").is_symlink()


def test_p37_p38_a_point_folder_holding_other_files_is_refused_one_killed_while_loading_is_taken(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    with pytest.raises(RunDirError, match="already holds files"):
        RunWriter(other).claim(new=True)
    assert (other / "thesis.tex").read_text() == "mine"
    killed = tmp_path / "killed"
    RunWriter(killed).open().close()  # lock, heartbeat, empty events.jsonl, control/, checkpoints/, samples/
    RunWriter(killed).claim(new=True).close()


# -- the queue --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", [".queue", ".queue/items", ".queue/items.lock", ".queue/recipes/0001.toml"])
def test_p39_p40_p44_p45_links_in_the_queue_folder_are_never_written_through(tmp_path, recipe, victim, where):
    root = tmp_path / "runs"
    (root / ".queue" / "items").mkdir(parents=True)
    (root / ".queue" / "recipes").mkdir()
    link = root / where
    if link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(victim if where.count("/") < 2 and not where.endswith(".lock") else victim / "notes.txt")
    before = picture(victim)
    try:
        queue.add(root, recipe, [], [])
    except queue.QueueError as error:
        assert "symbolic link" in str(error)
    assert picture(victim) == before


def test_p41_a_linked_entry_is_neither_read_nor_written_through(tmp_path, recipe, victim):
    root = tmp_path / "runs"
    item = queue.add(root, recipe, [], [])
    path = root / ".queue" / "items" / f"{item.id}.json"
    (victim / "item.json").write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(victim / "item.json")
    before = picture(victim)
    damaged: list[str] = []
    assert queue.load_items(root, damaged) == [] and "symbolic link" in damaged[0]
    with pytest.raises(queue.QueueError, match="no queue entry"):
        queue.cancel(root, item.id)
    assert picture(victim) == before


@pytest.mark.parametrize("name", ["worker.lock", "worker.log"])
def test_p42_p43_a_linked_worker_lock_or_log_starts_no_worker(tmp_path, victim, name):
    root = tmp_path / "runs"
    (root / ".queue").mkdir(parents=True)
    (root / ".queue" / name).symlink_to(victim / "notes.txt")
    before = picture(victim)
    with pytest.raises(OSError, match="symbolic link"):
        queue.start_worker(root)
    assert picture(victim) == before and not queue.worker_running(root)


def test_p46_p47_entries_named_or_pointing_elsewhere_are_skipped(tmp_path, recipe):
    root = tmp_path / "runs"
    first, second = queue.add(root, recipe, [], []), queue.add(root, recipe, [], [])
    items = root / ".queue" / "items"
    (items / f"{first.id}.json").rename(items / "0009.json")  # its id no longer matches its name
    data = json.loads((items / f"{second.id}.json").read_text())
    (items / f"{second.id}.json").write_text(json.dumps({**data, "recipe": str(tmp_path / "x.toml")}))
    damaged: list[str] = []
    assert queue.load_items(root, damaged) == [] and len(damaged) == 2


def test_p48_cancelling_an_unknown_entry_is_one_sentence(tmp_path):
    with pytest.raises(queue.QueueError, match="no queue entry '7'"):
        queue.cancel(tmp_path / "runs", "7")


def test_p49_an_entry_whose_run_finished_after_its_worker_died_is_recorded_finished(tmp_path, recipe):
    root = tmp_path / "runs"
    item = queue.add(root, recipe, [], [])
    shutil.copytree(FIXTURE, item.target)
    path = root / ".queue" / "items" / f"{item.id}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "state": "running", "pid": 2**22 + 17}))
    logged: list[str] = []
    assert queue.work(root, log=logged.append) == 0
    assert queue.find(root, item.id).state == "finished" and "had finished" in logged[-1]


def test_p53_a_fifo_worker_lock_is_no_worker_and_no_hang(tmp_path):
    root = tmp_path / "runs"
    (root / ".queue").mkdir(parents=True)
    os.mkfifo(root / ".queue" / "worker.lock")
    assert not queue.worker_running(root)


# -- signals --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_p54_ctrl_c_or_sigterm_while_the_model_loads_leaves_nothing_behind(tmp_path, recipe, sent, code):
    run = tmp_path / "new-run"
    process = zopro_popen("run", str(recipe), "--run-dir", str(run), "-q")
    wait_for(lambda: (run / "lock").exists() or process.poll() is not None, every=0.01)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert not run.exists(), "the folder it made (and its lock) should be gone"


def test_p54_a_ctrl_c_that_model_loading_swallows_still_ends_the_start():
    """Library code that loads a model may catch everything; the interrupt is remembered and the start ends
    when loading returns (the race behind a rare exit 0 of the test above)."""
    from engine.cli.runner import SignalsBeforeTheRun

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signals = SignalsBeforeTheRun()
    try:
        signals.install()
        os.kill(os.getpid(), signal.SIGINT)  # while the lock is taken: remembered, not raised
        wait_for(lambda: signals.received is not None, timeout=10, every=0.01)
        assert signals.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signals.arm()  # ... and raised once the code that lets the lock go is around it
        signals.received = None
        signals.check()  # nothing received: the start goes on
        try:  # what a loader that swallows every exception does
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:  # noqa: BLE001, S110
            pass
        assert signals.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signals.check()
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_p61_own_data_linked_to_a_device_is_one_sentence(tmp_path):
    from engine.data.preference_data import DataError, PreferenceSource, load_preferences

    (tmp_path / "own.jsonl").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="not a plain file"):
        load_preferences(PreferenceSource(format="preference_table", path=str(tmp_path / "own.jsonl")))
