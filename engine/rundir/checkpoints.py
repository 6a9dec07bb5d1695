"""The checkpoint layout of a run directory, for its writer and every reader: the checkpoint folders'
names, where an adapter lives in one, and which complete checkpoint is the newest."""

from __future__ import annotations

import json
from pathlib import Path

from engine.rundir.safe_io import is_real_dir, read_plain


def iteration_checkpoint_name(iteration: int) -> str:
    """The checkpoint saved at the end of `iteration` (-1: the start of iteration 0, after the reward model)."""
    return "reward" if iteration < 0 else f"iter-{iteration:04d}"


def adapter_file(checkpoint: Path, adapter: str) -> Path:
    """Where a checkpoint keeps one adapter's tensors, in plain peft layout (sft, policy or reward)."""
    return checkpoint / "adapters" / adapter / "adapter_model.safetensors"


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders (state.json written), newest first: the one `checkpoints/latest`
    names, then the others by the event position they saved (unreadable ones last, newest file first)."""
    folder = Path(run_dir) / "checkpoints"
    if not is_real_dir(folder):  # a link to another run's checkpoints is never resumed from
        return []
    try:
        complete = [
            p
            for p in folder.iterdir()
            if not p.name.startswith(".") and not p.is_symlink() and (p / "state.json").is_file()
        ]
    except OSError:
        return []

    def position(path: Path) -> tuple[int, int, float]:
        try:
            seq = json.loads(read_plain(path / "state.json", 1 << 24)).get("event_seq")
        except (OSError, ValueError, AttributeError, RecursionError):
            seq = None
        mtime = (path / "state.json").stat().st_mtime
        return (1, seq, mtime) if isinstance(seq, int) and not isinstance(seq, bool) else (0, 0, mtime)

    complete.sort(key=position, reverse=True)
    try:
        named = folder / read_plain(folder / "latest", 4096).decode().strip()
    except (OSError, ValueError):
        named = None
    if named in complete:
        complete.remove(named)
        complete.insert(0, named)
    return complete


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The most recent complete checkpoint folder, or None."""
    candidates = checkpoint_candidates(run_dir)
    return candidates[0] if candidates else None
