"""Hardening, third pass (issue 20), items 7-8 and 15-21 that need no training: one damaged file hides
nothing else, never hangs, and is one sentence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.jobs import queue
from engine.jobs.sweep import create_sweep
from engine.rundir.writer import RunWriter
from tests.conftest import FAST_RECIPE, zopro

FIXTURE = Path(__file__).parent / "fixtures" / "run_tiny" / "fast-seed0"


def one_sentence(result) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- 7. a damaged sweep.json hides no run ---------------------------------------------------------------
@pytest.mark.parametrize(
    "damage",
    [{"parallel": "abc"}, {"grid": [1]}, {"points": [{"name": 3}]}, {"points": "x"}, {"overrides": "x"}],
)
def test_7_a_damaged_sweep_json_leaves_ls_and_the_tui_listing_every_run(tmp_path, damage):
    from zopro_tui.reading import read_runs

    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root / "good")
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    sweep = create_sweep(recipe, ["reward.lr=0.001,0.002"], [], root=root, sweep_dir=root / "sw")
    data = json.loads((sweep.path / "sweep.json").read_text())
    data.update(damage)
    (sweep.path / "sweep.json").write_text(json.dumps(data))
    result = zopro("ls", "--root", str(root))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "good" in result.stdout and "sweep.json" in result.stdout
    listed = read_runs(root)
    assert [run.name for run in listed.runs] == ["good"]
    assert [s.status for s in listed.sweeps] == ["unreadable"]


# -- 8. one damaged queue entry does not stop the queue -----------------------------------------------------
def test_8_damaged_queue_entries_are_skipped_and_named(tmp_path):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    root = tmp_path / "runs"
    items = root / ".queue" / "items"
    entries = [queue.add(root, recipe, [], []) for _ in range(5)]
    damages = [[1, 2], {"order": "first"}, {"id": 3}, {"overrides": None}]
    for entry, damage in zip(entries[:4], damages, strict=True):
        path = items / f"{entry.id}.json"
        data = json.loads(path.read_text())
        data = damage if isinstance(damage, list) else {**data, **damage}
        path.write_text(json.dumps(data))
    good = entries[4]
    assert [item.id for item in queue.load_items(root)] == [good.id]
    assert queue.next_item(root).id == good.id
    assert "--run-dir" in queue.item_command(queue.next_item(root))
    result = zopro("queue", "ls", "--root", str(root))
    assert result.returncode == 0 and good.id in result.stdout
    assert result.stderr.count("damaged queue entry") == 4 and "Traceback" not in result.stderr


def test_8_an_entry_pointing_outside_the_queue_root_is_not_run(tmp_path):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE)
    root = tmp_path / "runs"
    entry = queue.add(root, recipe, [], [])
    path = root / ".queue" / "items" / f"{entry.id}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target": str(tmp_path / "elsewhere")}))
    assert queue.next_item(root) is None


# -- 15. a FIFO where a file belongs never hangs a reader --------------------------------------------------
@pytest.mark.parametrize("name", ["status.json", "heartbeat", "meta.json"])
def test_15_a_fifo_in_a_run_folder_does_not_hang_ls(tmp_path, name):
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root / "good")
    bad = root / "bad"
    shutil.copytree(FIXTURE, bad)
    (bad / name).unlink()
    os.mkfifo(bad / name)
    result = zopro("ls", "--root", str(root), timeout=60)
    assert result.returncode == 0 and "good" in result.stdout and "bad" in result.stdout


# -- 16. a series cache with a field of the wrong type is rebuilt ------------------------------------------
@pytest.mark.parametrize(
    "field, value", [("bad_lines", "abc"), ("last_compute", [1]), ("latest", [1, 2]), ("seen", 5)]
)
def test_16_a_cache_field_of_the_wrong_type_is_rebuilt(tmp_path, field, value):
    from tests.test_series_cache import cold, read, write_run
    from zopro_tui.series_cache import cache_path

    run = tmp_path / "run"
    write_run(run, range(40))
    expected = cold(run)
    cache = cache_path(run / "events.jsonl")
    with np.load(cache) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta[field] = value
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(cache, "wb") as handle:
        np.savez(handle, **arrays)
    hit, store, _ = read(run)
    assert not hit and len(store) == len(expected)
    assert read(run)[0], "the cache was not rebuilt"


# -- 17. control requests left by a process that is gone expire -----------------------------------------
def test_17_leftover_control_requests_are_dropped_when_a_writer_opens(tmp_path):
    run = tmp_path / "run"
    (run / "control").mkdir(parents=True)
    for name in ("pause", "stop"):
        (run / "control" / name).write_text(f"{time.time()}\n")
    writer = RunWriter(run).open()
    try:
        assert writer.take_requests() == []
        assert sorted(writer.dropped_requests) == ["pause", "stop"]
        (run / "control" / "pause").write_text("now\n")  # a request sent to this writer is taken
        assert writer.take_requests() == ["pause"]
    finally:
        writer.close()


# -- 19. export -o to a missing folder or to a folder -------------------------------------------------------
def test_19_export_to_a_missing_folder_or_a_folder_is_one_sentence(tmp_path):
    for output in (tmp_path / "missing" / "m.csv", tmp_path):
        result = zopro("export", str(FIXTURE), "-o", str(output))
        one_sentence(result)
        assert "--output" in result.stderr


# -- 21. messages -------------------------------------------------------------------------------------------------
def test_21_a_recipe_with_a_byte_order_mark_is_read(tmp_path):
    recipe = tmp_path / "bom.toml"
    recipe.write_bytes(b"\xef\xbb\xbf" + FAST_RECIPE.encode())
    result = zopro("validate", str(recipe))
    assert result.returncode == 0, result.stderr


def test_21_a_missing_column_names_the_recipe_key(tmp_path):
    from engine.data.preference_data import DataError, PreferenceSource, load_preferences

    data = tmp_path / "own.jsonl"
    data.write_text(
        "".join(json.dumps({"q": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4))
    )
    with pytest.raises(DataError) as caught:
        load_preferences(PreferenceSource(format="preference_table", path=str(data)))
    assert "data.prompt_column" in str(caught.value) and "PreferenceSource" not in str(caught.value)


def test_21_a_checkpoint_that_does_not_fit_says_what_differs():
    from engine.training.run import _first_line

    try:
        torch.nn.Linear(4, 2).load_state_dict(torch.nn.Linear(4, 3).state_dict())
    except RuntimeError as error:
        gist = _first_line(error)
    assert "size mismatch for weight" in gist


def test_21_a_stopped_process_is_not_called_crashed(tmp_path):
    from engine.rundir.alerts import alert_line
    from engine.rundir.reader import run_info

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        sleeper.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        run = tmp_path / "run"
        run.mkdir()
        (run / "status.json").write_text(json.dumps({"state": "running", "pid": sleeper.pid}))
        (run / "heartbeat").write_text(f"{time.time() - 600}\n")
        kind, line = alert_line(run_info(run))
        assert kind == "stale" and "may have crashed" not in line and f"kill -CONT {sleeper.pid}" in line
    finally:
        sleeper.kill()
        sleeper.wait()
