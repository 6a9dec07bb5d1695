"""Helpers for tests that run the real command line: read a run's metrics and adapters, wait, resume."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from safetensors.torch import load_file

from engine.rundir.checkpoints import adapter_file
from engine.rundir.reader import read_events, run_info
from tests.conftest import zopro, zopro_popen


def finished_run(folder: Path, name: str, recipe_text: str) -> tuple[Path, Path]:
    """Write `recipe_text` as folder/<name>.toml, run it to the end with the real command line into
    folder/run, and return (recipe, run directory)."""
    recipe = folder / f"{name}.toml"
    recipe.write_text(recipe_text)
    run = folder / "run"
    result = zopro("run", str(recipe), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    return recipe, run


def metric_events(run: Path) -> list[tuple]:
    """(type, stage, iteration, step, metrics without wall-clock values) of every metric event."""
    rows = []
    for event in read_events(run):
        if event["type"] in ("metrics", "eval"):
            metrics = {k: v for k, v in event["metrics"].items() if not k.startswith(("time/", "mem/"))}
            rows.append((event["type"], event["stage"], event["iteration"], event["step"], metrics))
    return rows


def adapters(run: Path, checkpoint: str) -> dict:
    out = {}
    for name in ("sft", "policy", "reward"):
        for key, value in load_file(adapter_file(run / "checkpoints" / checkpoint, name)).items():
            out[f"{name}/{key}"] = value
    return out


def wait_for(predicate, timeout: float = 120.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("condition not met in time")


def global_step(run: Path) -> int:
    try:
        return json.loads((run / "status.json").read_text()).get("global_step", 0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def assert_resume_after_sigterm_is_exact(
    recipe: Path, straight: Path, interrupted: Path, at_step: int
) -> None:
    """SIGTERM a run of `recipe` once it reaches `at_step`, resume it, and check that its metric events and
    final adapters equal those of the uninterrupted run in `straight`."""
    process = zopro_popen("run", str(recipe), "--run-dir", str(interrupted))
    wait_for(lambda: global_step(interrupted) >= at_step or process.poll() is not None, every=0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert run_info(interrupted).status == "stopped"
    assert "--resume" in stderr
    resumed = zopro("run", "--resume", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr
    assert run_info(interrupted).status == "finished"
    assert metric_events(interrupted) == metric_events(straight)
    last = sorted(p.name for p in (straight / "checkpoints").glob("iter-*"))[-1]
    a, b = adapters(straight, last), adapters(interrupted, last)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def zeroth_order_steps(run: Path, iteration: int = 1) -> list[dict]:
    """The metrics of a zopro run's updates in `iteration`, each checked to be a zeroth-order update that
    was not skipped."""
    policy = [e for e in read_events(run) if e["type"] == "metrics" and e["stage"] == "policy"]
    steps = [e["metrics"] for e in policy if e["iteration"] == iteration]
    assert steps and all(m["zo/first_order"] == 0.0 and m["zo/skipped"] == 0.0 for m in steps)
    return steps


def passes_per_step(steps: list[dict]) -> set[float]:
    """The forward passes counted between consecutive steps (the rollout's and the update's)."""
    counts = [m["compute/forward_passes"] for m in steps]
    return {after - before for before, after in zip(counts, counts[1:], strict=False)}
