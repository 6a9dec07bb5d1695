"""The developer loop and the stack: the README's plain `pytest` command collects, the declared Python and
transformers versions are the ones the code needs, and a diverged first-order run names the setting to lower."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from engine.rundir.reader import run_info
from tests.conftest import REPO, zopro


def test_plain_pytest_command_collects_without_pythonpath():
    pytest_script = Path(sys.executable).with_name("pytest")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(pytest_script), "-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_recipe.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No module named 'tests'" not in result.stdout + result.stderr


def test_declared_python_and_transformers_match_what_the_code_uses():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    low = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups())
    uses_tomllib = any("import tomllib" in p.read_text() for p in (REPO / "engine").rglob("*.py"))
    assert not uses_tomllib or low >= (3, 11), "tomllib needs Python 3.11"
    launch = (REPO / "zopro_tui" / "launch.py").read_text()
    assert '"-P"' not in launch or low >= (3, 11), "python -P needs Python 3.11"
    transformers = next(d for d in project["dependencies"] if d.startswith("transformers"))
    floor = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", transformers).groups())
    rollout = (REPO / "engine" / "training" / "rollout.py").read_text()
    assert "past_key_values=" not in rollout and ".past_key_values" not in rollout, (
        "the deprecated KV-cache keyword is still used"
    )
    assert floor >= (5, 24), "forward(cache=...) needs transformers 5.24"


def test_a_diverged_policy_names_the_learning_rate_to_lower(tmp_path, fast_recipe):
    run = tmp_path / "run"
    result = zopro("run", str(fast_recipe), "--run-dir", str(run), "--set", "rloo.lr=1e6")
    assert result.returncode == 1, result.stderr
    assert "rloo.lr" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    info = run_info(run)
    assert info.status == "failed" and "rloo.lr" in info.error


def test_plain_zopro_run_finds_the_embedded_recipe():
    """The README's first command is a bare `zopro run`: it must find recipes/tiny.toml."""
    from engine.cli.app import embedded_recipe

    assert embedded_recipe() == REPO / "recipes" / "tiny.toml"
