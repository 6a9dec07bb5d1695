"""Naming a run's checkpoints on the command line: `sft`, `reward`, `latest`, `iter-N` (or `iter-000N`)."""

from __future__ import annotations

import re
from pathlib import Path

from engine.rundir.checkpoints import iteration_checkpoint_name
from engine.rundir.reader import is_run_dir
from engine.rundir.safe_io import is_plain_file, is_real_dir, plain_tree, read_inside

ITERATION_NAME = re.compile(r"iter-(\d+)")


class ExportError(ValueError):
    """A run, checkpoint or target that cannot be used; the message is one sentence for the user."""


def require_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise ExportError(f"{run_dir} is not a run directory (no status.json or events.jsonl)")
    return run_dir


def complete_checkpoints(run_dir: Path) -> list[str]:
    """The run's complete checkpoints (a folder with state.json), in the order the run wrote them."""
    folder = Path(run_dir) / "checkpoints"
    if not is_real_dir(folder):
        return []
    names = [p.name for p in folder.iterdir() if is_real_dir(p) and is_plain_file(p / "state.json")]
    fixed = [n for n in ("sft", "reward") if n in names]
    return fixed + sorted(n for n in names if ITERATION_NAME.fullmatch(n))


def checkpoint_folder(run_dir: Path, name: str) -> Path:
    """The folder of checkpoint `name` of a run; ExportError naming the ones there are when it has none."""
    run_dir = require_run_dir(run_dir)
    available = complete_checkpoints(run_dir)
    wanted = name.strip()
    if wanted == "latest":
        try:
            wanted = read_inside(run_dir, run_dir / "checkpoints" / "latest", 4096).decode().strip()
        except (OSError, UnicodeDecodeError):
            wanted = available[-1] if available else ""
    match = ITERATION_NAME.fullmatch(wanted)
    if match:
        wanted = iteration_checkpoint_name(int(match.group(1)))
    if not wanted or wanted not in available:
        shown = ", ".join(available) if available else "none yet"
        raise ExportError(
            f"{run_dir} has no complete checkpoint {name!r}; it has: {shown} "
            "(name one of them, or latest, sft, iter-N)"
        )
    folder = run_dir / "checkpoints" / wanted
    try:
        plain_tree(folder)
    except OSError as error:
        raise ExportError(f"checkpoint {wanted} cannot be used: {error.filename} {error.strerror}") from None
    return folder


def policy_adapter_of(folder: Path) -> str:
    """Which adapter of a checkpoint is 'the policy' it stands for: the SFT checkpoint's is the sft adapter."""
    return "sft" if folder.name == "sft" else "policy"
