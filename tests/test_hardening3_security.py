"""Hardening, third pass (issue 20), items 1-6: nothing in a run, sweep or queue folder can make zopro write,
delete or signal outside it. Every victim lives outside the folder and must come through byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine.jobs import queue
from engine.jobs.sweep import create_sweep
from engine.rundir.files import RunDirError, atomic_write_text
from engine.rundir.writer import RunWriter, default_run_dir
from tests.conftest import FAST_RECIPE, zopro, zopro_popen
from tests.runs import wait_for


def make_victim(folder: Path) -> Path:
    """A folder of someone else's files, hidden ones and a plain mode included."""
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_bytes(b"precious\n")
    (folder / ".hidden").write_bytes(b"also precious\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.bin").write_bytes(bytes(range(256)))
    os.chmod(folder, 0o777)
    return folder


def picture(path: Path) -> dict:
    """Every entry under `path` (and `path` itself): its bytes (files) and mode, to compare before and after."""
    seen = {".": (None, os.lstat(path).st_mode)}
    for entry in sorted(path.rglob("*")):
        info = os.lstat(entry)
        data = entry.read_bytes() if entry.is_file() and not entry.is_symlink() else None
        seen[str(entry.relative_to(path))] = (data, info.st_mode)
    return seen


# -- 1. a damaged sweep.json never deletes folders elsewhere --------------------------------------------------
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "dot"])
def test_1_sweep_point_names_cannot_reach_outside_the_sweep(tmp_path, kind):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    sweep_dir = tmp_path / "shared" / "sweep"
    sweep = create_sweep(recipe, ["reward.lr=0.001,0.002"], [], root=tmp_path, sweep_dir=sweep_dir)
    victim = make_victim(tmp_path / "victim")
    name = {"absolute": str(victim), "dotdot": "../../victim", "dot": "."}[kind]
    data = json.loads((sweep_dir / "sweep.json").read_text())
    data["points"][0]["name"] = name
    (sweep_dir / "sweep.json").write_text(json.dumps(data))
    before, sweep_before = picture(victim), picture(sweep_dir)
    result = zopro("sweep", "--resume", str(sweep.path), "--quiet")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sweep.json" in result.stderr and "point 0" in result.stderr and "Traceback" not in result.stderr
    assert picture(victim) == before
    assert picture(sweep_dir) == sweep_before


# -- 2. checkpoints/ as a link: recovery never touches the target -------------------------------------------
def test_2_a_linked_checkpoints_folder_is_refused_and_its_target_untouched(tmp_path):
    victim = make_victim(tmp_path / "big-disk")
    (victim / ".tmp-iter-0000-1").mkdir()
    (victim / ".tmp-iter-0000-1" / "x").write_bytes(b"keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(victim)
    before = picture(victim)
    with pytest.raises(RunDirError, match="checkpoints.*symbolic link"):
        RunWriter(run).open()
    assert picture(victim) == before


# -- 3. no file or folder inside a run folder is written through a link -----------------------------------
@pytest.mark.parametrize("name", ["lock", "events.jsonl", "control", "samples", "heartbeat", "status.json"])
def test_3_links_inside_a_run_folder_are_never_written_through(tmp_path, name):
    victim = make_victim(tmp_path / "victim")
    run = tmp_path / "run"
    run.mkdir()
    target = victim if name in ("control", "samples") else victim / "notes.txt"
    if name == "control":
        (victim / "stop").write_bytes(b"someone's file named stop\n")
        (victim / "pause").write_bytes(b"someone's file named pause\n")
    (run / name).symlink_to(target)
    before = picture(victim)
    writer = RunWriter(run)
    try:
        writer.open()
    except RunDirError as error:
        assert name in str(error) and "symbolic link" in str(error)
    else:  # whole files are renamed into place: the link is replaced, the victim untouched
        assert name in ("heartbeat", "status.json")
        writer.update_status(state="running")
        writer.beat()
        assert writer.take_requests() == []
        writer.close()
        assert not (run / name).is_symlink()
    assert picture(victim) == before


def test_3_error_log_and_temporary_names_are_never_written_through(tmp_path):
    from rich.console import Console

    from engine.cli.runner import _record_bug
    from engine.recipe import load_recipe
    from engine.training.bookkeeping import RunBook

    victim = make_victim(tmp_path / "victim")
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    run = tmp_path / "run"
    writer = RunWriter(run).open()
    (run / "error.log").symlink_to(victim / "notes.txt")
    (run / f".status.json.tmp-{os.getpid()}").symlink_to(victim / "sub" / "deep.bin")
    before = picture(victim)
    book = RunBook(load_recipe(recipe), writer)
    try:
        raise RuntimeError("a bug")
    except RuntimeError as error:
        assert _record_bug(book, writer, error, Console(file=open(os.devnull, "w")), run) == 1
    writer.update_status(state="failed")
    atomic_write_text(run / "recipe.toml", "x = 1\n")
    writer.close()
    assert picture(victim) == before
    assert "a bug" in (run / "error.log").read_text() and not (run / "error.log").is_symlink()


def test_3_a_hard_link_to_a_file_elsewhere_is_never_appended_to(tmp_path):
    victim = make_victim(tmp_path / "victim")
    run = tmp_path / "run"
    run.mkdir()
    os.link(victim / "notes.txt", run / "events.jsonl")
    before = picture(victim)
    with pytest.raises(RunDirError, match="events.jsonl.*hard link"):
        RunWriter(run).open()
    assert picture(victim) == before


# -- 4. two new runs never share a folder ------------------------------------------------------------------
def test_4_a_new_run_checks_the_folder_under_its_lock(tmp_path):
    run = tmp_path / "run"
    first = RunWriter(run).claim(new=True)  # the lock is held from before the model loads
    with pytest.raises(RunDirError, match="already being written"):
        RunWriter(run).claim(new=True)
    first.open()
    atomic_write_text(run / "recipe.toml", "name = 'first'\n")
    first.close()
    with pytest.raises(RunDirError, match="already holds files"):
        RunWriter(run).claim(new=True)
    assert (run / "recipe.toml").read_text() == "name = 'first'\n"


def test_4_default_names_started_in_the_same_second_differ(tmp_path):
    chosen: list[Path] = []
    barrier = threading.Barrier(8)

    def pick() -> None:
        barrier.wait()
        chosen.append(default_run_dir(tmp_path / "runs", "fast", "rloo", reserve=True))

    threads = [threading.Thread(target=pick) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(chosen)) == 8 and all(path.is_dir() for path in chosen)


def loading_torch(pid: int) -> bool:
    """The process has started loading torch: `zopro run` does that only after it checked its folder."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_4_a_run_still_loading_its_model_holds_its_folder(tmp_path, fast_recipe):
    """B is held (SIGSTOP) while it loads the model; A, started meanwhile into the same folder, must be
    refused at once instead of training there and having B write over it afterwards."""
    run = tmp_path / "run"
    loading = zopro_popen("run", str(fast_recipe), "--run-dir", str(run), "-q")
    wait_for(lambda: loading_torch(loading.pid) or loading.poll() is not None, every=0.01)
    loading.send_signal(signal.SIGSTOP)
    try:
        second = zopro("run", str(fast_recipe), "--run-dir", str(run), "-q")
    finally:
        loading.send_signal(signal.SIGCONT)
    _, stderr = loading.communicate(timeout=600)
    assert second.returncode == 2 and "already being written" in second.stderr, second.stdout + second.stderr
    assert loading.returncode == 0, stderr
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in events if e["type"] == "run_start"] == [0]


# -- 5. concurrent `queue add`: every entry kept, one worker ---------------------------------------------------
def test_5_concurrent_queue_adds_keep_every_entry(tmp_path, monkeypatch):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    root = tmp_path / "runs"

    class SlowClock:  # widens the window between numbering an entry and writing it
        @staticmethod
        def time() -> float:
            time.sleep(0.2)
            return time.time()

    monkeypatch.setattr(queue, "time", SlowClock)
    added: list[str] = []
    threads = [
        threading.Thread(target=lambda: added.append(queue.add(root, recipe, [], []).id)) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(added) == [f"{n:04d}" for n in range(1, 7)]
    assert sorted(item.id for item in queue.load_items(root)) == sorted(added)


def test_5_two_adds_at_once_start_one_worker(tmp_path):
    root = tmp_path / "runs"
    pids = [queue.start_worker(root), queue.start_worker(root)]  # nothing is queued: each exits at once
    assert sum(pid is not None for pid in pids) == 1


# -- 6. cancel never signals a stranger that got a dead run's pid ------------------------------------------
@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_6_cancel_of_a_dead_workers_entry_signals_nobody(tmp_path, kind):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    root = tmp_path / "runs"
    item = queue.add(root, recipe, [], ["reward.lr=0.001,0.002"] if kind == "sweep" else [])
    stranger = subprocess.Popen(["sleep", "60"])  # has the pid the dead worker's run had
    try:
        target = Path(item.target)
        target.mkdir(parents=True)
        (target / "status.json").write_text(json.dumps({"state": "running", "pid": stranger.pid}))
        data = json.loads(queue._item_path(root, item.id).read_text())
        data.update(state="running", pid=stranger.pid)
        queue._item_path(root, item.id).write_text(json.dumps(data))
        cancelled = queue.cancel(root, item.id)
        time.sleep(0.3)
        assert stranger.poll() is None, "cancel signalled a process the queue never started"
        assert cancelled.state == "cancelled"
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait()
