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
from dataclasses import dataclass, field
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
    grid: list[str] = field(default_factory=list)  # `KEY=V1,V2` entries: a sweep, one run per point


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
    overrides, grid = parse_settings(text)
    if grid:
        raise RecipeError("--grid belongs in the sweep grid field; here write key.path=value pairs")
    return overrides


def parse_settings(text: str) -> tuple[list[str], list[str]]:
    """`key=value` overrides and `--grid KEY=V1,V2` entries, as on the command line (`--set` optional)."""
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise RecipeError(
            f"overrides {text!r}: {error}; write key.path=value pairs separated by spaces"
        ) from None
    overrides: list[str] = []
    grid: list[str] = []
    for index, word in enumerate(words):
        if word in ("--set", "--grid"):
            continue
        if "=" not in word:
            raise RecipeError(f"override {word!r} has no '='; write key.path=value, e.g. train.iterations=2")
        (grid if index and words[index - 1] == "--grid" else overrides).append(word)
    return overrides, grid


def default_recipe(recipes: list[Path]) -> int:
    """Which of `recipes` to preselect: the embedded default, recipes/tiny.toml (the one `zopro run` takes
    without a recipe), else the first."""
    tiny = [index for index, path in enumerate(recipes) if path.name == "tiny.toml"]
    return tiny[0] if tiny else 0


def plan_run(recipe: Path, overrides: list[str], root: Path, grid: list[str] | None = None) -> RunPlan:
    """Validate the recipe with its overrides, and with a grid every point (RecipeError names what is
    wrong), and choose the run folder (a sweep's folder is chosen when the queue takes it)."""
    from engine.jobs.sweep import SweepError, grid_points, parse_grid, validate_points
    from engine.rundir.writer import default_run_dir

    resolved = load_recipe(recipe, overrides)
    if grid:
        try:
            validate_points(recipe, overrides, grid_points(parse_grid(grid, overrides)))
        except SweepError as error:
            raise RecipeError(str(error)) from None
    root.mkdir(parents=True, exist_ok=True)
    run_dir = default_run_dir(root, resolved.name, resolved.policy.method)
    return RunPlan(recipe, overrides, run_dir, resolved.policy.method, list(grid or []))


def launch(plan: RunPlan) -> LaunchedRun:
    """Start the run in its own session; its output goes to DIR.log, never to this terminal."""
    log_path = launch_log_path(plan.run_dir)
    command = run_command(plan.recipe, run_dir=plan.run_dir, overrides=plan.overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = spawn_detached(command, log_path, env)
    return LaunchedRun(run_dir=plan.run_dir, process=process, log_path=log_path)
