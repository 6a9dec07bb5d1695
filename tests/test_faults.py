"""Faults on a real run directory: hostile or broken checkpoints, a crash inside a checkpoint, a writer killed
mid-line, a dropped SSH connection (SIGHUP) and a full disk. Each ends in a resumable run, or in one sentence
with nothing changed; no file in a run directory ever runs code."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.rundir.checkpoints import adapter_file
from engine.rundir.reader import EventTail, read_events, run_info
from engine.rundir.wording import checkpoint_phrase
from engine.rundir.writer import RunDirError, RunWriter
from tests.conftest import REPO, zopro, zopro_popen
from tests.runs import global_step, wait_for

STOP_AT = 26  # past sft (12 steps) and reward (12): checkpoints sft, reward and resume exist


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, model_cache) -> Path:
    """A fast run stopped by SIGTERM in its first policy iteration (checkpoints sft, reward, resume)."""
    from tests.conftest import FAST_RECIPE

    folder = tmp_path_factory.mktemp("stopped")
    recipe = folder / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    run = folder / "run"
    process = zopro_popen("run", str(recipe), "--run-dir", str(run))
    wait_for(lambda: global_step(run) >= STOP_AT or process.poll() is not None, every=0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"sft", "reward", "resume", "latest"}
    return run


@pytest.fixture
def run(stopped_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    return copy


def resume_event(run: Path) -> dict:
    return [e for e in read_events(run) if e["type"] == "resume"][-1]


def assert_resumed_from(run: Path, checkpoint: str) -> subprocess.CompletedProcess:
    result = zopro("run", "--resume", str(run))
    assert result.returncode == 0, result.stderr
    assert (
        "Traceback" not in result.stderr and "Warning" not in result.stderr
    )  # e.g. transformers' FutureWarning
    assert resume_event(run)["checkpoint"] == checkpoint
    assert f"resuming from {checkpoint_phrase(checkpoint)}" in result.stdout
    assert run_info(run).status == "finished"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    return result


class _Planted:
    """A pickled object that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_code_in_trainer_state_is_never_run_and_the_previous_checkpoint_is_used(run, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"sft_optimizer": _Planted(marker)}, run / "checkpoints" / "resume" / "trainer_state.pt")
    result = assert_resumed_from(run, "reward")
    assert not marker.exists()
    assert "skipped resume (trainer_state.pt" in result.stdout


@pytest.mark.parametrize("pointer", ["missing", "empty"])
def test_latest_pointer_missing_or_empty_resumes_from_the_newest_checkpoint(run, pointer):
    latest = run / "checkpoints" / "latest"
    latest.unlink() if pointer == "missing" else latest.write_text("")
    assert_resumed_from(run, "resume")


def test_crash_between_the_two_renames_of_a_checkpoint_leaves_a_resumable_run(run):
    checkpoints = run / "checkpoints"
    os.replace(checkpoints / "resume", checkpoints / ".old-resume-4242")  # the first rename happened
    partial = checkpoints / ".tmp-resume-4242"  # the second never did
    (partial / "adapters").mkdir(parents=True)
    (partial / "trainer_state.pt").write_bytes(b"PK\x03\x04 half")
    (checkpoints / ".tmp-iter-0000-77").mkdir()  # and a stale partial from another crash
    assert_resumed_from(run, "resume")


@pytest.mark.parametrize(
    "damage",
    ["truncated trainer_state", "truncated adapter", "garbage state.json", "state.json a list", "empty pt"],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(run, damage):
    folder = run / "checkpoints" / "resume"
    if damage == "truncated trainer_state":
        data = (folder / "trainer_state.pt").read_bytes()
        (folder / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "truncated adapter":
        path = adapter_file(folder, "policy")
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage state.json":
        (folder / "state.json").write_bytes(b"\x00\xffnot json{")
    elif damage == "state.json a list":
        (folder / "state.json").write_text("[1, 2, 3]")
    else:
        (folder / "trainer_state.pt").write_bytes(b"")
    result = assert_resumed_from(run, "reward")
    assert "skipped resume" in result.stdout


def test_no_readable_checkpoint_is_one_sentence_and_changes_nothing(run):
    for folder in (run / "checkpoints").iterdir():
        if folder.is_dir():
            (folder / "trainer_state.pt").write_bytes(b"garbage")
    events_before = (run / "events.jsonl").read_bytes()
    status_before = json.loads((run / "status.json").read_text())
    result = zopro("run", "--resume", str(run))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "no checkpoint" in result.stderr and "trainer_state.pt" in result.stderr
    assert (run / "events.jsonl").read_bytes() == events_before
    status_after = json.loads((run / "status.json").read_text())
    assert status_after["state"] == status_before["state"] == "stopped"


def test_partial_last_event_line_is_cut_before_resuming(run):
    with open(run / "events.jsonl", "ab") as events:
        events.write(b'{"seq": 999, "type": "metrics", "metr')  # a writer killed mid-line
    assert_resumed_from(run, "resume")
    tail = EventTail(run / "events.jsonl")
    events = tail.read_new()
    assert tail.bad_lines == 0 and events[-1]["type"] == "run_end"
    assert (run / "events.jsonl").read_bytes().endswith(b"\n")
    seqs = [e["seq"] for e in read_events(run)]
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)  # the rewind was read: no duplicate rows
    export = zopro("export", str(run), "--format", "json")
    assert export.returncode == 0 and "Traceback" not in export.stderr


def test_sighup_from_a_dropped_terminal_stops_after_a_checkpoint_and_resumes(tmp_path, fast_recipe):
    run = tmp_path / "run"
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", str(fast_recipe), "--run-dir", str(run)],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    os.close(secondary)
    drained = threading.Thread(target=_drain, args=(primary,), daemon=True)
    drained.start()
    wait_for(lambda: global_step(run) >= STOP_AT or process.poll() is not None, every=0.02)
    process.send_signal(signal.SIGHUP)
    os.close(primary)  # the terminal is gone: writing to it now fails
    assert process.wait(timeout=120) == 129
    assert run_info(run).status == "stopped"
    assert json.loads((run / "status.json").read_text()).get("stopped_by") == "SIGHUP"
    assert (run / "checkpoints" / "resume" / "state.json").is_file()
    assert "error.log" not in os.listdir(run)
    assert_resumed_from(run, "resume")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def test_full_disk_is_one_sentence_status_failed_and_resumable(tmp_path, fast_recipe, model_cache):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"])
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    python = f"{sys.executable} -m engine.cli"
    script = f"""
mount -t tmpfs -o size=2m tmpfs {disk} || exit 99
{python} run {fast_recipe} --run-dir {disk}/run > {out}/run.out 2> {out}/run.err; echo $? > {out}/run.rc
cp -a {disk}/run {out}/full
mount -o remount,size=64m {disk}
{python} run --resume {disk}/run > {out}/resume.out 2> {out}/resume.err; echo $? > {out}/resume.rc
cp -a {disk}/run {out}/resumed
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=600, check=True)
    stderr = (out / "run.err").read_text()
    assert (out / "run.rc").read_text().strip() == "1", stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert "disk" in stderr and "full" in stderr and "--resume" in stderr
    full = out / "full"
    status = json.loads((full / "status.json").read_text())
    assert status["state"] == "failed" and "full" in status["error"]
    assert not [p.name for p in full.rglob(".*")], "half-written temporaries were left"
    assert (full / "events.jsonl").read_bytes().endswith(b"\n")
    assert (out / "resume.rc").read_text().strip() == "0", (out / "resume.err").read_text()
    assert run_info(out / "resumed").status == "finished"


def test_run_directory_is_private_under_umask_000(tmp_path):
    previous = os.umask(0)
    try:
        with RunWriter(tmp_path / "run") as writer:
            with writer.checkpoint("sft") as folder:
                torch.save({"x": torch.zeros(2)}, folder / "trainer_state.pt")
                (folder / "state.json").write_text("{}")
            writer.update_status(state="running")
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    for path in [run, *run.rglob("*")]:
        assert not path.stat().st_mode & 0o022, f"{path} is group- or world-writable"


@pytest.mark.parametrize("blocker", ["control", "checkpoints", "lock", "events.jsonl"])
def test_a_run_directory_with_a_file_or_folder_in_the_way_is_one_sentence(tmp_path, blocker):
    run = tmp_path / "run"
    run.mkdir()
    if blocker in ("control", "checkpoints"):
        (run / blocker).write_text("in the way\n")
    else:
        (run / blocker).mkdir()
    with pytest.raises(RunDirError) as caught:
        RunWriter(run).open()
    assert blocker in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_resuming_a_run_whose_status_is_unreadable_is_refused_before_loading(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "run_tiny" / "fast-seed0", run)
    (run / "status.json").unlink()
    (run / "status.json").mkdir()
    result = zopro("run", "--resume", str(run))
    assert result.returncode == 2 and "cannot be resumed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
