"""A newcomer's first ten minutes, headless: the help names every method without type tags, counts read
from 1 with plurals right, `zopro ls` fits 80 columns (and is not cut into a pipe), one clock with the
pauses said apart, and a first run on a fresh cache says what it builds and never wraps lines into a file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from engine.recipe import METHODS
from engine.rundir.reader import run_info
from tests.conftest import REPO, zopro_popen

STAGES = REPO / "tests" / "fixtures" / "run_stages"
LONG = (
    "tiny-compare-zopro-sampler-subspace-seed0-20261206-120455",
    "tiny-compare-zopro-sampler-subspace-seed0-20261206-131502",
)


def zopro(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `zopro` in a fresh process, its output to pipes (no terminal), with `env_extra` set."""
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    env.update(PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_help_describes_every_method_without_type_tags():
    top = zopro("--help")
    assert top.returncode == 0
    for method in METHODS:  # the group methods too
        assert method in top.stdout, method
    run = zopro("run", "--help")
    assert "<bool>" not in top.stdout + run.stdout and "--quiet" in run.stdout
    assert "--set KEY=VALUE" in run.stdout


def test_validate_says_one_iteration_not_one_iterations():
    result = zopro(
        "validate",
        str(REPO / "recipes" / "tiny.toml"),
        "--set",
        "train.iterations=1",
        "--set",
        "train.updates_per_iteration=1",
    )
    assert result.returncode == 0, result.stderr
    assert "1 iteration x 1 update" in result.stdout


def long_named_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for stage, name in zip(("finished", "stopped"), LONG, strict=True):
        shutil.copytree(STAGES / stage / "fast-rloo", root / name)
    return root


def test_ls_fits_80_columns_and_keeps_names_apart(tmp_path):
    root = long_named_runs(tmp_path)
    fitted = zopro("ls", "--root", str(root), env_extra={"COLUMNS": "80"})
    assert fitted.returncode == 0, fitted.stderr
    lines = fitted.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    names = [line.split()[0] for line in lines[1:]]
    assert len(set(names)) == 2 and all("…" in name for name in names), names
    assert "gold" in lines[0] and "win" in lines[0] and "0.200" in fitted.stdout
    piped = zopro("ls", "--root", str(root))  # no terminal, no COLUMNS: nothing is cut
    assert all(name in piped.stdout for name in LONG)


def test_one_clock_with_the_pauses_apart():
    """The recorded run paused 3 s, then stopped: every reader says the run's clock and the pause."""
    run = STAGES / "stopped" / "fast-rloo"
    info = run_info(run)
    assert info.status == "stopped" and 3.0 <= info.paused < 4.0
    assert abs(info.elapsed - info.run_clock) < 1e-9  # the engine's clock, not started..updated
    status = zopro("status", str(run), env_extra={"COLUMNS": "120"})
    assert "(0:03 paused)" in status.stdout and "elapsed 0:54" in status.stdout
    assert "it 2/3 policy 2" in status.stdout  # iterations from 1, as the TUI header


def test_a_first_run_says_what_it_builds_and_does_not_wrap_into_a_file(tmp_path, fast_recipe):
    result = zopro(
        "run",
        str(fast_recipe),
        "--run-dir",
        str(tmp_path / "run"),
        env_extra={"ZOPRO_CACHE": str(tmp_path / "fresh-cache")},
    )
    assert result.returncode == 0, result.stderr
    assert "building the built-in model builtin:nano on first use" in result.stdout
    assert not result.stderr.strip(), "stderr is for what went wrong"
    lines = result.stdout.splitlines()
    assert any(line.endswith("iteration 1/2: policy optimisation") for line in lines)
    evals = [line for line in lines if "eval: gold" in line]
    assert len(evals) == 3 and all("fixed-RM score" in line and " KL " in line for line in evals)
    assert any(len(line) > 80 for line in lines), "a long line stays one line in a file"
    assert "it 1" in result.stdout and "it 2" in result.stdout and "fixed RM" in result.stdout
    assert any(line.startswith("finished in ") for line in lines)
    events = run_info(tmp_path / "run")
    assert events.global_step == events.total_steps, "the step total is fixed from the start"
    assert os.path.isdir(tmp_path / "fresh-cache" / "builtin")


def test_the_live_line_fits_80_columns_without_cutting_a_score():
    """The rate goes first, then the method, then the step count: the scores and the ETA stay whole."""
    import io

    from rich.console import Console

    from engine.cli.progress_line import ProgressView

    view = ProgressView(432, 4, "online_dpo", Path("runs/x"))
    view.on_event(
        {
            "type": "metrics",
            "stage": "policy",
            "iteration": 1,
            "global_step": 310,
            "metrics": {"objective/scores": 0.7431, "eval/gold": 0.3, "objective/kl": 0.1234},
        }
    )
    view.first_step, view.started = 0, view.started - 100
    lines = {}
    for width in (80, 120):
        console = Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None)
        console.print(view)
        lines[width] = console.file.getvalue().strip()
    assert "…" not in lines[80] and "KL 0.12" in lines[80] and "ETA 0:" in lines[80], lines[80]
    assert lines[80].startswith("online_dpo policy it 2/4 step 310/432 RM score 0.74"), lines[80]
    assert "st/s" in lines[120] and "st/s" not in lines[80]


def test_a_run_whose_output_is_closed_goes_on_to_the_end(tmp_path, fast_recipe):
    """`zopro run | head -2`: the reader goes away after two lines; the run neither dies silently (rich exits
    on a broken pipe) nor leaves a stale folder: it says so on stderr, finishes and exits 0."""
    run_dir = tmp_path / "run"
    process = zopro_popen("run", str(fast_recipe), "--run-dir", str(run_dir))
    assert process.stdout.readline().strip()  # "building the built-in model ..." or "run ..."
    process.stdout.close()  # as head does after its lines
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "broken pipe" in stderr and "Traceback" not in stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_validate_and_queue_add_check_the_data_file_as_run_does(tmp_path):
    from tests.conftest import zopro

    recipe = tmp_path / "mine.toml"
    recipe.write_text(
        '[task]\nname = "dataset"\n\n[data]\nformat = "preference_table"\npath = "nothere.jsonl"\n\n'
        '[refine]\njudge = "reward"\n'
    )
    for args in (("validate", str(recipe)), ("queue", "add", str(recipe), "--root", str(tmp_path / "q"))):
        result = zopro(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "data.path = 'nothere.jsonl': No such file or folder" in result.stderr
    assert not (tmp_path / "q").exists(), "nothing queued"
    (tmp_path / "empty.jsonl").write_text("")
    recipe.write_text(recipe.read_text().replace("nothere.jsonl", "empty.jsonl"))
    result = zopro("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "empty.jsonl is empty." in result.stderr
