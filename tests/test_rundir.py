"""The run directory contract: tailing by byte offset, truncated lines, one writer, control requests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from engine.rundir.checkpoints import latest_checkpoint
from engine.rundir.controls import send_control
from engine.rundir.events import SCHEMA_VERSION, apply_rewinds, parse_event_line, schema_version
from engine.rundir.reader import EventTail, list_runs, read_events, run_info
from engine.rundir.writer import RunDirError, RunWriter


def test_reader_tailing_a_live_writer_sees_every_event_once(tmp_path):
    run = tmp_path / "run"
    total = 3000
    seen: list[int] = []
    done = threading.Event()

    def write() -> None:
        with RunWriter(run) as writer:
            for i in range(total):
                writer.emit(
                    "metrics", stage="policy", iteration=0, step=i, metrics={"objective/scores": i * 0.5}
                )
                if i % 100 == 0:
                    time.sleep(0.005)
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    tail = EventTail(run / "events.jsonl")
    while not done.is_set() or len(seen) < total:
        seen.extend(e["step"] for e in tail.read_new())
        if done.is_set() and len(seen) < total:
            seen.extend(e["step"] for e in tail.read_new())
            break
        time.sleep(0.001)
    thread.join()
    assert seen == list(range(total))
    assert tail.bad_lines == 0


def test_reader_reads_only_new_bytes(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run) as writer:
        for i in range(10):
            writer.emit("metrics", stage="sft", iteration=None, step=i, metrics={"loss/sft": 1.0})
        tail = EventTail(run / "events.jsonl")
        assert len(tail.read_new()) == 10
        offset = tail.offset
        assert offset == (run / "events.jsonl").stat().st_size
        writer.emit("metrics", stage="sft", iteration=None, step=10, metrics={"loss/sft": 1.0})
        assert [e["step"] for e in tail.read_new()] == [10]
        assert tail.read_new() == []


def test_truncated_last_line_is_not_an_error_and_is_read_once_complete(tmp_path):
    path = tmp_path / "events.jsonl"
    whole = json.dumps({"seq": 0, "type": "metrics", "step": 0}) + "\n"
    partial = json.dumps({"seq": 1, "type": "metrics", "step": 1})
    path.write_text(whole + partial[:10])
    tail = EventTail(path)
    assert [e["seq"] for e in tail.read_new()] == [0]
    assert tail.bad_lines == 0
    with open(path, "a") as handle:
        handle.write(partial[10:] + "\n")
    assert [e["seq"] for e in tail.read_new()] == [1]


def test_nan_metrics_are_written_as_null(tmp_path):
    with RunWriter(tmp_path / "run") as writer:
        writer.emit("metrics", stage="policy", iteration=0, step=0, metrics={"zo/g": float("nan"), "ok": 1.5})
    (event,) = read_events(tmp_path / "run")
    assert event["metrics"] == {"zo/g": None, "ok": 1.5}


def test_second_writer_in_another_process_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run):
        code = (
            "import sys\nfrom engine.rundir.writer import RunWriter, RunDirError\n"
            f"try:\n    RunWriter({str(run)!r}).open()\nexcept RunDirError as e:\n    print(e); sys.exit(3)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "already being written by pid" in result.stdout
    # once the first writer is gone, a new one may open it
    with RunWriter(run):
        pass


def test_second_writer_in_same_process_is_refused(tmp_path):
    with RunWriter(tmp_path / "run"):
        with pytest.raises(RunDirError, match="one writer per run directory"):
            RunWriter(tmp_path / "run").open()


def test_control_requests_are_taken_once_in_order(tmp_path):
    """Oldest first by modification time: an order unlike the accepted tuple's, the alphabet's and their
    reverses, so that only the times can produce it."""
    sent = ["resume", "checkpoint", "stop", "pause"]
    with RunWriter(tmp_path / "run") as writer:
        for when, request in enumerate(sent):
            path = send_control(tmp_path / "run", request)
            os.utime(path, (1_000_000 + when, 1_000_000 + when))
        assert writer.take_requests() == sent
        assert writer.take_requests() == []
        assert not list((tmp_path / "run" / "control").iterdir())
    with pytest.raises(RunDirError, match="accepted"):
        send_control(tmp_path / "run", "explode")


def test_checkpoint_is_atomic(tmp_path):
    with RunWriter(tmp_path / "run") as writer:
        with writer.checkpoint("iter-0000") as folder:
            (folder / "state.json").write_text("{}")
        assert latest_checkpoint(tmp_path / "run").name == "iter-0000"
        with pytest.raises(RuntimeError), writer.checkpoint("iter-0001") as folder:
            (folder / "state.json").write_text("{}")
            raise RuntimeError("crash while writing")
        assert latest_checkpoint(tmp_path / "run").name == "iter-0000"
        assert not (tmp_path / "run" / "checkpoints" / "iter-0001").exists()


def test_rewinds_drop_re_emitted_events():
    events = [{"seq": i, "type": "metrics"} for i in range(5)] + [
        {"seq": 3, "type": "resume", "rewind_to_seq": 3},
        {"seq": 4, "type": "metrics"},
    ]
    assert [e["seq"] for e in apply_rewinds(events)] == [0, 1, 2, 3, 4]
    assert apply_rewinds(events)[3]["type"] == "resume"


def test_the_writer_stamps_the_schema_version_and_readers_take_logs_without_it(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run) as writer:
        writer.emit("run_start", stage="sft", iteration=None, step=0, total_steps=4)
        writer.emit("metrics", stage="sft", iteration=None, step=1, metrics={"loss/sft": 1.0})
        writer.emit("resume", stage="sft", iteration=None, step=0, rewind_to_seq=1)
    new = EventTail(run / "events.jsonl").read_new()
    assert [schema_version(e) for e in new] == [SCHEMA_VERSION, 0, SCHEMA_VERSION]
    assert "schema" not in new[1]  # metric events stay as they were: the version rides on the opening events
    old = tmp_path / "old"  # a log from before the version field: the same layout, read the same way
    old.mkdir()
    lines = [{k: v for k, v in e.items() if k != "schema"} for e in new]
    (old / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert [schema_version(e) for e in read_events(old)] == [0, 0]  # the resume undid the metric event
    assert (
        [e["type"] for e in read_events(old)]
        == [e["type"] for e in read_events(run)]
        == ["run_start", "resume"]
    )


def test_status_is_derived_from_heartbeat_and_pid(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run) as writer:
        writer.update_status(state="running", method="rloo", started=time.time())
        assert run_info(run).status == "running"
        assert run_info(run, now=time.time() + 3600).status == "stale"
    # the writer is gone but status still says running: a crashed run is stale
    status = json.loads((run / "status.json").read_text())
    status["pid"] = 999999
    (run / "status.json").write_text(json.dumps(status))
    assert run_info(run).status == "stale"
    status["state"] = "finished"
    (run / "status.json").write_text(json.dumps(status))
    assert run_info(run).status == "finished"
    assert [r.name for r in list_runs(tmp_path)] == ["run"]


def test_the_reader_says_which_host_the_writer_runs_on(tmp_path):
    """The TUI's hardware panel reads the host from run_info, never from meta.json on the UI thread."""
    run = tmp_path / "run"
    with RunWriter(run) as writer:
        writer.write_meta({"host": "gpu-node-7", "pid": 1})
        writer.update_status(state="running", method="rloo")
        assert run_info(run).host == "gpu-node-7"
    (run / "meta.json").write_text("[not an object")
    assert run_info(run).host is None


def test_an_event_keeps_only_number_and_null_metrics_and_a_bom_is_read_past():
    line = b'{"seq": 1, "type": "metrics", "metrics": {"a": 1.5, "b": true, "c": "x", "d": null, "e": 3, "f": [1]}}'
    assert parse_event_line(line)["metrics"] == {"a": 1.5, "d": None, "e": 3}
    assert parse_event_line(b'{"seq": 2, "type": "metrics", "metrics": {"a": 2, "b": 0.5}}')["metrics"] == {
        "a": 2,
        "b": 0.5,
    }
    assert parse_event_line(b'\xef\xbb\xbf{"seq": 3, "type": "eval"}') == {"seq": 3, "type": "eval"}
    assert parse_event_line(b'{"seq": 4, "type": "metrics", "metrics": {"a": "\xff"}}') is None


@pytest.mark.parametrize("fast", [True, False], ids=["orjson", "json only"])
def test_event_lines_read_the_same_with_and_without_orjson(monkeypatch, fast):
    """orjson reads strict JSON; what Python's json also accepts (NaN, Infinity, a byte-order mark, a lone
    surrogate) goes to json: the events are the same either way."""
    from engine.rundir import events

    if not fast:
        monkeypatch.setattr(events, "_fast_loads", None)
    parsed = parse_event_line(
        b'{"seq": 5, "type": "metrics", "metrics": {"a": NaN, "b": -Infinity, "c": 1e400}}'
    )
    metrics = parsed["metrics"]
    assert math.isnan(metrics["a"]) and metrics["b"] == -math.inf and metrics["c"] == math.inf
    assert parse_event_line(b'\xef\xbb\xbf{"seq": 6, "type": "eval"}') == {"seq": 6, "type": "eval"}
    assert parse_event_line(b'{"seq": 7, "type": "warning", "message": "\\ud800"}')["message"] == "\ud800"
    assert parse_event_line(b'{"seq": 8, "type": "metrics", "metrics": {"a": 1}') is None  # cut short
    assert parse_event_line(b'{"seq": 9, "type": "metrics", "metrics": {"a": "\xff"}}') is None
    assert parse_event_line(b'{"seq": 10.5, "type": "metrics"}') is None
    for bad in (
        b'{"seq": null, "type": "metrics"}',
        b'{"seq": true, "type": "metrics"}',
        b'{"seq": 1, "type": 3}',
        b'{"seq": 1, "type": "eval", "iteration": "2"}',
        b'{"seq": 1, "type": "eval", "stage": 4}',
        b'{"seq": 1, "type": "eval", "time": false}',
        b'{"seq": 1, "type": "resume", "rewind_to_seq": 2.0}',
        b'{"seq": 1, "type": "metrics", "metrics": [1]}',
        b"[1, 2]",
    ):
        assert parse_event_line(bad) is None, bad
    assert parse_event_line(b'{"seq": 1, "type": "eval", "iteration": null, "stage": null, "time": 2}')
