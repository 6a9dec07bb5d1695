"""Control requests, the one way a reader steers a run: a file per request in control/, which the writer
takes between steps (`RunWriter.take_requests`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.rundir.files import RunDirError, atomic_write_text
from engine.rundir.safe_io import real_folder

CONTROL_REQUESTS = ("pause", "resume", "stop", "checkpoint")


def send_control(run_dir: Path, request: str) -> Path:
    """Ask the run's writer to pause, resume, stop or checkpoint; it polls between steps."""
    if request not in CONTROL_REQUESTS:
        raise RunDirError(f"unknown control request {request!r}; accepted: {', '.join(CONTROL_REQUESTS)}")
    run_dir = Path(run_dir)
    control = run_dir / "control"
    if not os.path.lexists(control) and not (
        (run_dir / "status.json").exists() or (run_dir / "events.jsonl").exists()
    ):  # creating it would make a run that is still loading find its folder taken
        raise RunDirError(f"{run_dir} is not a run directory yet (still starting?); nothing was sent")
    try:
        real_folder(control)  # never through a link to a folder elsewhere
        path = control / request
        atomic_write_text(path, f"{time.time()}\n")
    except OSError as error:
        raise RunDirError(f"{error.filename}: {error.strerror}; nothing was sent") from None
    return path
