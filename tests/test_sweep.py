"""`zopro sweep`: bad grids refused before anything is created; a 2x2 sweep of the fast recipe finishes,
survives a kill, resumes, and is listed as one group by `zopro ls`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from engine.jobs.sweep import SweepError, grid_points, load_sweep, parse_grid, split_values
from engine.rundir.reader import read_events, run_info
from tests.conftest import zopro, zopro_popen


def test_split_values_keeps_lists_and_strings_whole():
    assert split_values("0.1,0.2") == ["0.1", "0.2"]
    assert split_values('["q_proj","k_proj"],["v_proj"]') == ['["q_proj","k_proj"]', '["v_proj"]']
    assert split_values('"a,b",c') == ['"a,b"', "c"]


def test_grid_points_every_combination_last_key_fastest():
    axes = parse_grid(["seed=0,1", "zopro.sampler=zopro,subspace"])
    points = grid_points(axes)
    assert [p["overrides"] for p in points] == [
        ["seed=0", "zopro.sampler=zopro"],
        ["seed=0", "zopro.sampler=subspace"],
        ["seed=1", "zopro.sampler=zopro"],
        ["seed=1", "zopro.sampler=subspace"],
    ]
    assert points[1]["values"] == {"seed": 0, "zopro.sampler": "subspace"}
    assert points[1]["name"] == "1-seed=0_sampler=subspace"
    with pytest.raises(SweepError, match="given twice"):
        parse_grid(["seed=0,1", "seed=2"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "rloo.lrr=0.1,0.2"], "--grid rloo.lrr: .*rloo.lrr is not a known key"),
        (["--grid", "rloo.lr=0.1,fast"], "--grid rloo.lr: .*rloo.lr must be a number, got 'fast'"),
        (["--grid", "rloo.lr"], "--grid 'rloo.lr' has no '='"),
        (["--grid", "rloo.lr=0.1,,0.2"], "--grid rloo.lr: an empty value"),
        (["--grid", "rloo.lr=0.1,0.1"], "--grid rloo.lr lists 0.1 twice"),
        (["--grid", "seed=1,2", "--set", "seed=3"], "seed is both in --set and in --grid"),
        (["--grid", "=1,2"], "is not a recipe key"),
        (["--grid", "train.iterations=1,-1"], "train.iterations = -1 is out of range"),
        ([], "a sweep needs at least one --grid"),
        (["--grid", "seed=1,2", "--parallel", "0"], "--parallel 0 is not accepted"),
    ],
)
def test_bad_sweeps_say_one_sentence_and_create_nothing(fast_recipe: Path, tmp_path: Path, args, message):
    root = tmp_path / "runs"
    result = zopro("sweep", str(fast_recipe), "--root", str(root), *args)
    assert result.returncode == 2, result.stderr
    error = " ".join(result.stderr.split())
    assert error.startswith("error: ")
    import re

    assert re.search(message, error), error
    assert len(result.stderr.strip().splitlines()) <= 2  # one sentence (rich may wrap it once)
    assert not root.exists()


def test_resume_refuses_a_folder_that_is_not_a_sweep(tmp_path: Path):
    result = zopro("sweep", "--resume", str(tmp_path))
    assert result.returncode == 2
    assert "is not a sweep directory" in result.stderr


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sweep_2x2_finishes_resumes_after_a_kill_and_lists_as_a_group(fast_recipe: Path, tmp_path: Path):
    root = tmp_path / "runs"
    sweep_dir = root / "grid"
    process = zopro_popen(
        "sweep",
        str(fast_recipe),
        "--grid",
        "seed=0,1",
        "--grid",
        "rloo.lr=0.0005,0.001",
        "--set",
        "train.iterations=1",
        "--sweep-dir",
        str(sweep_dir),
        "--quiet",
    )
    try:
        sweep_json = sweep_dir / "sweep.json"
        _wait_for(sweep_json.exists, 60, "sweep.json")
        sweep = load_sweep(sweep_dir)
        assert [p["name"] for p in sweep.points] == [
            "0-seed=0_lr=0.0005",
            "1-seed=0_lr=0.001",
            "2-seed=1_lr=0.0005",
            "3-seed=1_lr=0.001",
        ]
        second = sweep_dir / sweep.points[1]["name"]

        def second_is_training() -> bool:
            return any(e.get("type") == "metrics" for e in read_events(second))

        _wait_for(second_is_training, 240, "the second point to train")
        os.kill(process.pid, signal.SIGKILL)  # no checkpoint, no goodbye: a crash
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    first = sweep_dir / sweep.points[0]["name"]
    assert run_info(first).status == "finished"
    assert run_info(second).status == "stale"
    first_size = (first / "events.jsonl").stat().st_size

    listed = zopro("ls", "--root", str(root))
    assert listed.returncode == 0, listed.stderr
    assert "sweep grid" in listed.stdout and "1/4 done" in listed.stdout
    assert "stale:" in listed.stderr and sweep.points[1]["name"] in listed.stderr

    resumed = zopro("sweep", "--resume", str(sweep_dir), "--quiet", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "1 already done" in resumed.stdout
    assert (first / "events.jsonl").stat().st_size == first_size  # a finished point is not run again
    assert any(e.get("type") == "resume" for e in read_events(second))  # the killed one resumed
    for point in sweep.points:
        assert run_info(sweep_dir / point["name"]).status == "finished"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [row["point"] for row in summary["points"]] == [p["name"] for p in sweep.points]
    assert all(row["status"] == "finished" and row["final_gold"] is not None for row in summary["points"])
    assert summary["points"][3]["values"] == {"seed": 1, "rloo.lr": 0.001}
    assert summary["grid"] == {"seed": [0, 1], "rloo.lr": [0.0005, 0.001]}

    listed = json.loads(zopro("ls", "--root", str(root), "--json").stdout)
    assert sorted(r["name"] for r in listed if r.get("sweep") == "grid") == [p["name"] for p in sweep.points]
    again = zopro("sweep", "--resume", str(sweep_dir), "--quiet")
    assert again.returncode == 0 and "4 already done" in again.stdout


@pytest.mark.slow
def test_sweep_parallel_runs_points_side_by_side(fast_recipe: Path, tmp_path: Path):
    sweep_dir = tmp_path / "runs" / "par"
    result = zopro(
        "sweep",
        str(fast_recipe),
        "--grid",
        "seed=0,1",
        "--set",
        "train.iterations=1",
        "--sweep-dir",
        str(sweep_dir),
        "--parallel",
        "2",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 at a time" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith(("started ", "0-", "1-"))]
    # both points were launched before either finished (what the sweep printed, in order)
    assert [line.split()[0] for line in lines[:2]] == ["started", "started"], result.stdout
    assert all(run_info(p).status == "finished" for p in sweep_dir.glob("[0-9]-*") if p.is_dir())
    assert (sweep_dir / "0-seed=0.log").exists()
