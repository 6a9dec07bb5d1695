"""`[log] report_to`: metrics mirrored to TensorBoard (readable by tensorboard's own reader) with TRL's names;
bad targets and missing packages refused before anything is created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.mirror import trl_name
from engine.rundir.reader import read_events
from tests.conftest import REPO, zopro


def test_trl_names():
    assert trl_name("objective/kl") == "train/objective/kl"
    assert trl_name("policy/clipfrac") == "train/policy/clipfrac_avg"
    assert trl_name("loss/policy") == "train/loss/policy_avg"
    assert trl_name("policy/lr") == "train/lr"
    assert trl_name("eval/gold") == "eval/gold"
    assert trl_name("compute/forward_passes") == "train/compute/forward_passes"  # also in an eval event
    assert trl_name("zo/g") == "train/zo/g"


def test_an_unknown_target_is_refused_with_one_sentence(fast_recipe: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = zopro("run", str(fast_recipe), "--run-dir", str(run), "--set", 'log.report_to=["tensorbord"]')
    assert result.returncode == 2
    assert "log.report_to = 'tensorbord' is not accepted; list any of tensorboard, wandb" in result.stderr
    assert "did you mean 'tensorboard'" in result.stderr
    assert not run.exists()


def test_a_missing_package_is_named_before_anything_is_created(fast_recipe: Path, tmp_path: Path):
    """The real command line in a process where wandb cannot be imported (None in sys.modules is Python's
    own way to block an import), whether or not it is installed here."""
    run = tmp_path / "run"
    command = (
        "import sys; sys.modules['wandb'] = None; from engine.cli import main; "
        f"sys.argv = ['zopro', 'run', {str(fast_recipe)!r}, '--run-dir', {str(run)!r}, "
        "'--set', 'log.report_to=[\"wandb\"]']; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    assert "the wandb package is not installed" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not run.exists()


def test_tensorboard_event_file_is_written_and_readable(fast_recipe: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = zopro(
        "run", str(fast_recipe), "--run-dir", str(run), "--quiet", "--set", 'log.report_to=["tensorboard"]'
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    tags = set(board.Tags()["scalars"])
    for tag in (
        "train/objective/kl",
        "train/objective/rlhf_reward",
        "train/loss/sft",
        "train/loss/policy_avg",
        "train/policy/clipfrac_avg",
        "eval/gold",
        "eval/win_rate_vs_sft",
    ):
        assert tag in tags, sorted(tags)
    events = read_events(run)
    kl = [
        (e["global_step"], e["metrics"]["objective/kl"])
        for e in events
        if e["type"] == "metrics" and e["metrics"].get("objective/kl") is not None
    ]
    mirrored = [(s.step, s.value) for s in board.Scalars("train/objective/kl")]
    assert [step for step, _ in mirrored] == [step for step, _ in kl]
    assert [value for _, value in mirrored] == pytest.approx([value for _, value in kl], rel=1e-6)


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (a leveldb-style log of protobuf records, 32 KiB blocks
    after a 7-byte `:W&B` header), read without the wandb service."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, rows = 7, b"", []
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer or padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                )
    return rows


def test_wandb_offline_run_is_written_with_the_metrics(fast_recipe: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")  # in the test extra, so CI has it; offline: no network, no account
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    result = zopro(
        "run", str(fast_recipe), "--run-dir", str(run), "--quiet", "--set", 'log.report_to=["wandb"]'
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "no offline W&B run"
    rows = {row["_step"]: row for row in wandb_history(files[0])}
    events = read_events(run)
    assert sorted(rows) == sorted({e["global_step"] for e in events if e["type"] in ("metrics", "eval")})
    kl = {
        e["global_step"]: e["metrics"]["objective/kl"]
        for e in events
        if e["type"] == "metrics" and e["metrics"].get("objective/kl") is not None
    }
    assert kl and {step: rows[step]["train/objective/kl"] for step in kl} == pytest.approx(kl, rel=1e-6)
    gold = {e["global_step"]: e["metrics"]["eval/gold"] for e in events if e["type"] == "eval"}
    assert {step: rows[step]["eval/gold"] for step in gold} == pytest.approx(gold, rel=1e-6)
    assert any("train/loss/sft" in row for row in rows.values())
