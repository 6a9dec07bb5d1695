"""Hardening, third pass (issue 20): the probe beyond the issue's list, run folders and readers. Files from
elsewhere (links, hard links, FIFOs, devices, folders where files belong) never make zopro write outside the
run folder, remove what it did not create, obey what nobody sent, or hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.rundir.checkpoints import checkpoint_candidates
from engine.rundir.controls import send_control
from engine.rundir.files import RunDirError, atomic_write_json
from engine.rundir.reader import latest_samples, read_events, run_info
from engine.rundir.writer import RunWriter
from tests.test_hardening3_security import make_victim, picture


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    return make_victim(tmp_path / "victim")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    (folder / "control").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "samples").mkdir()
    return folder


def opened(run: Path) -> RunWriter:
    return RunWriter(run).open()


def refused(run: Path, *words: str) -> None:
    with pytest.raises(RunDirError) as caught:
        RunWriter(run).open()
    for word in words:
        assert word in str(caught.value)


# -- the writer: control/ ---------------------------------------------------------------------------------
def test_p01_a_linked_control_request_is_unlinked_not_obeyed(run, victim):
    before = picture(victim)
    (run / "control" / "pause").symlink_to(victim / "notes.txt")
    writer = opened(run)
    writer.close()
    assert writer.dropped_requests == [] and not os.path.lexists(run / "control" / "pause")
    assert picture(victim) == before


def test_p02_a_folder_named_stop_in_control_is_neither_obeyed_nor_removed(run):
    (run / "control" / "stop").mkdir()
    (run / "control" / "stop" / "keep.txt").write_text("mine")
    writer = opened(run)
    assert writer.take_requests() == []
    writer.close()
    assert (run / "control" / "stop" / "keep.txt").read_text() == "mine"


# -- the writer: checkpoints/ -------------------------------------------------------------------------------
def test_p03_a_linked_latest_pointer_is_replaced_not_written_through(run, victim):
    before = picture(victim)
    (run / "checkpoints" / "latest").symlink_to(victim / "notes.txt")
    writer = opened(run)
    with writer.checkpoint("sft") as folder:
        (folder / "state.json").write_text("{}")
    writer.close()
    assert (run / "checkpoints" / "latest").read_text() == "sft\n" and picture(victim) == before


def test_p04_a_linked_checkpoint_is_not_read_and_is_replaced_not_emptied(run, victim):
    (victim / "state.json").write_text('{"event_seq": 99}')
    before = picture(victim)
    (run / "checkpoints" / "iter-0000").symlink_to(victim)
    assert checkpoint_candidates(run) == []
    writer = opened(run)
    with writer.checkpoint("iter-0000") as folder:
        (folder / "state.json").write_text("{}")
    writer.close()
    assert not (run / "checkpoints" / "iter-0000").is_symlink() and picture(victim) == before


def test_p05_a_linked_moved_aside_checkpoint_is_not_restored(run, victim):
    (victim / "state.json").write_text("{}")
    before = picture(victim)
    (run / "checkpoints" / ".old-iter-0000-1").symlink_to(victim)
    opened(run).close()
    assert not os.path.lexists(run / "checkpoints" / "iter-0000")
    assert not os.path.lexists(run / "checkpoints" / ".old-iter-0000-1") and picture(victim) == before


def test_p06_a_linked_partial_checkpoint_is_unlinked_not_emptied(run, victim):
    before = picture(victim)
    (run / "checkpoints" / ".tmp-sft-1").symlink_to(victim)
    opened(run).close()
    assert not os.path.lexists(run / "checkpoints" / ".tmp-sft-1") and picture(victim) == before


def test_p07_a_linked_samples_file_is_replaced(run, victim):
    before = picture(victim)
    (run / "samples" / "samples-00000004.jsonl").symlink_to(victim / "notes.txt")
    writer = opened(run)
    writer.write_samples(4, [{"prompt": "p", "response": "r"}])
    writer.close()
    assert picture(victim) == before and latest_samples(run) == [{"prompt": "p", "response": "r"}]


# -- the writer: things that are not plain files ----------------------------------------------------------
@pytest.mark.parametrize("name", ["events.jsonl", "lock"])
def test_p08_p09_a_fifo_for_an_in_place_file_is_refused_without_hanging(run, name):
    os.mkfifo(run / name)
    refused(run, name, "not a plain file")


@pytest.mark.parametrize("name", ["lock", "heartbeat", "events.jsonl"])
def test_p10_p11_a_folder_where_a_file_belongs_is_one_sentence(run, name):
    (run / name).mkdir()
    refused(run, name)


def test_p12_samples_as_a_file_is_one_sentence(run):
    (run / "samples").rmdir()
    (run / "samples").write_text("x")
    refused(run, "samples")


def test_p13_the_run_folder_itself_may_be_a_link_the_user_chose(tmp_path):
    disk = tmp_path / "bigger-disk" / "run"
    disk.mkdir(parents=True)
    (tmp_path / "run").symlink_to(disk)
    writer = opened(tmp_path / "run")
    writer.emit("run_start", stage="sft", iteration=None, step=0)
    writer.close()
    assert (disk / "events.jsonl").stat().st_size > 0


def test_p14_a_run_folder_that_links_to_itself_is_one_sentence(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(RunDirError, match="loop"):
        RunWriter(tmp_path / "loop").claim(new=True)


def test_p15_a_hard_linked_lock_is_refused(run, victim):
    before = picture(victim)
    os.link(victim / "notes.txt", run / "lock")
    refused(run, "lock", "hard link")
    assert picture(victim) == before


@pytest.mark.parametrize("name", ["heartbeat", "meta.json"])
def test_p16_p17_a_link_at_a_temporary_name_is_never_written_through(run, victim, name):
    before = picture(victim)
    (run / f".{name}.tmp-{os.getpid()}").symlink_to(victim / "notes.txt")
    writer = opened(run)
    writer.beat()
    atomic_write_json(run / "meta.json", {"pid": 1})
    writer.close()
    assert picture(victim) == before


def test_p18_a_latest_pointer_out_of_the_folder_is_ignored(run, victim):
    (victim / "state.json").write_text('{"event_seq": 5}')
    (run / "checkpoints" / "latest").write_text("../../victim\n")
    assert checkpoint_candidates(run) == []


def test_p19_p20_fifos_among_the_checkpoints_do_not_hang_the_search(run):
    os.mkfifo(run / "checkpoints" / "latest")
    (run / "checkpoints" / "iter-0000").mkdir()
    os.mkfifo(run / "checkpoints" / "iter-0000" / "state.json")
    (run / "checkpoints" / "sft").mkdir()
    (run / "checkpoints" / "sft" / "state.json").write_text('{"event_seq": 3}')
    assert [p.name for p in checkpoint_candidates(run)] == ["sft"]


# -- readers ---------------------------------------------------------------------------------------------------
def test_p21_a_huge_status_json_is_read_only_in_part(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "status.json", "wb") as handle:
        handle.write(b'{"state": "running", "junk": "' + b"x" * (100 << 20) + b'"}')
    info = run_info(run)
    assert info.status == "unreadable" and "JSON" in info.error


def test_p22_events_linked_to_a_device_are_not_read_forever(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").symlink_to("/dev/zero")
    problems: list[str] = []
    assert read_events(run, problems) == [] and "events.jsonl" in problems[0]


def test_p23_p24_p25_fifos_for_heartbeat_samples_and_recipe_do_not_hang_readers(tmp_path):
    from engine.recipe import RecipeError, load_recipe

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "status.json").write_text('{"state": "running", "pid": 1}')
    os.mkfifo(run / "heartbeat")
    os.mkfifo(run / "samples" / "samples-00000001.jsonl")
    os.mkfifo(run / "recipe.toml")
    assert run_info(run).heartbeat is None
    assert latest_samples(run) == []
    with pytest.raises(RecipeError, match="not a plain file"):
        load_recipe(run / "recipe.toml")


# -- control requests from readers, and the lock ------------------------------------------------------------
def test_p50_a_folder_locked_by_another_process_names_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f, 2); "
         "f.write('4242'); f.flush(); print('held', flush=True); time.sleep(60)", str(run / "lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match="already being written by pid 4242"):
            RunWriter(run).claim(new=False)
    finally:
        holder.kill()
        holder.wait()


def test_p51_a_request_to_a_run_still_loading_creates_nothing(tmp_path):
    run = tmp_path / "run"
    RunWriter(run).claim(new=True)  # the lock is there while the model loads
    with pytest.raises(RunDirError, match="not a run directory yet"):
        send_control(run, "pause")
    assert not (run / "control").exists()


def test_p52_a_request_into_a_linked_control_folder_is_refused(run, victim):
    (run / "status.json").write_text('{"state": "running"}')
    (run / "control").rmdir()
    (run / "control").symlink_to(victim)
    before = picture(victim)
    with pytest.raises(RunDirError, match="symbolic link"):
        send_control(run, "stop")
    assert picture(victim) == before


# -- the command line -------------------------------------------------------------------------------------
def test_p58_p59_p60_status_export_and_resume_never_hang_on_devices_and_fifos(tmp_path):
    from tests.conftest import zopro

    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "stopped", "started": time.time()}))
    (run / "events.jsonl").symlink_to("/dev/zero")
    os.mkfifo(run / "recipe.toml")
    for command in (["status", str(run)], ["export", str(run)], ["run", "--resume", str(run)]):
        result = zopro(*command, timeout=60)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode in (0, 2) and len(result.stderr.strip().splitlines()) <= 1, result.stderr
