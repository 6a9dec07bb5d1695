"""Whole-file writes and plain JSON for the run directory: what the writer and the control requests share."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from engine.rundir.safe_io import atomic_write_bytes, open_in_place


class RunDirError(RuntimeError):
    """A problem with a run directory that the user can act on (one sentence)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file under a temporary name, then rename it over the target (never through a link:
    `engine.rundir.safe_io`)."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=json_default) + "\n")


def json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Plain floats and ints for JSON; NaN and infinities become None (JSON has no NaN)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def append_log(path: Path):
    """A log file opened for appending, never through a link (`engine.rundir.safe_io`)."""
    return os.fdopen(open_in_place(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")


def spawn_detached(
    command: list[str], log_path: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen:
    """Start `command` in its own session (it outlives the terminal, the TUI and an SSH drop), with no
    input and its output appended to `log_path`; `pass_fds` stay open in it (a lock it inherits)."""
    with append_log(log_path) as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=pass_fds,
            env=env,
        )
