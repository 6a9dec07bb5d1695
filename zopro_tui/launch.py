"""Starting runs from the TUI: find recipes, validate one with its overrides, start it as a detached process.

A started run is `python -P -m engine.cli run RECIPE --run-dir DIR --set ... --quiet` in its own session
(`start_new_session`), with no stdin and its output in `DIR.log` next to the run directory: closing the
TUI or losing the SSH connection leaves it running, and any reader can attach to it later. `-P` keeps the
current folder off the module path: a folder named `engine/` where the user stands is never run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engine.jobs.command import run_command
from engine.recipe import RecipeError, load_recipe
from engine.rundir.files import spawn_detached
from zopro_tui.reading import launch_log_path


@dataclass
class LaunchedRun:
    """A run this TUI started: where it writes and its process."""

    run_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class RunPlan:
    """A validated recipe, its overrides and the run directory it will write."""

    recipe: Path
    overrides: list[str]
    run_dir: Path
    method: str


def recipe_folders(root: Path) -> list[Path]:
    """Where recipes are looked for: ./recipes, the runs root's sibling recipes/, the source tree's."""
    source_tree = Path(__file__).resolve().parent.parent / "recipes"
    folders = [Path.cwd() / "recipes", root.resolve().parent / "recipes", source_tree]
    unique: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in unique]:
            unique.append(folder)
    return unique


def find_recipes(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder in recipe_folders(root):
        found.extend(sorted(folder.glob("*.toml")))
    return found


def parse_overrides(text: str) -> list[str]:
    """`key=value` pairs separated by spaces (shell quoting allowed); a leading `--set` is tolerated."""
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise RecipeError(
            f"overrides {text!r}: {error}; write key.path=value pairs separated by spaces"
        ) from None
    overrides = [word for word in words if word != "--set"]
    for word in overrides:
        if "=" not in word:
            raise RecipeError(f"override {word!r} has no '='; write key.path=value, e.g. train.iterations=2")
    return overrides


def plan_run(recipe: Path, overrides: list[str], root: Path) -> RunPlan:
    """Validate the recipe with its overrides (RecipeError names what is wrong) and choose the run folder."""
    from engine.rundir.writer import default_run_dir

    resolved = load_recipe(recipe, overrides)
    root.mkdir(parents=True, exist_ok=True)
    run_dir = default_run_dir(root, resolved.name, resolved.policy.method)
    return RunPlan(recipe=recipe, overrides=overrides, run_dir=run_dir, method=resolved.policy.method)


def launch(plan: RunPlan) -> LaunchedRun:
    """Start the run in its own session; its output goes to DIR.log, never to this terminal."""
    log_path = launch_log_path(plan.run_dir)
    command = run_command(plan.recipe, run_dir=plan.run_dir, overrides=plan.overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = spawn_detached(command, log_path, env)
    return LaunchedRun(run_dir=plan.run_dir, process=process, log_path=log_path)
