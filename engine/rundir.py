"""The run directory, writer side: layout, the single-writer lock, events, status, heartbeat, control, checkpoints.

Layout (the contract every reader relies on; see README "The run directory"):

    runs/<name>/
      recipe.toml        the fully resolved recipe
      meta.json          versions, host, device, seed, start time, pid
      events.jsonl       append-only, one JSON object per line (see `RunWriter.emit`)
      heartbeat          rewritten every few seconds while the writer is alive (unix time)
      status.json        the latest state, small, replaced atomically
      control/           requests from readers: files named pause, resume, stop, checkpoint
      checkpoints/       one folder per checkpoint, written under a temporary name then renamed
      samples/           samples-<global_step>.jsonl: prompts, responses and scores
      lock               held (flock) by the one process that writes
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONTROL_REQUESTS = ("pause", "resume", "stop", "checkpoint")
HEARTBEAT_SECONDS = 2.0


class RunDirError(RuntimeError):
    """A problem with a run directory that the user can act on (one sentence)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file under a temporary name, then rename it over the target."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
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


def send_control(run_dir: Path, request: str) -> Path:
    """Ask the run's writer to pause, resume, stop or checkpoint; it polls between steps."""
    if request not in CONTROL_REQUESTS:
        raise RunDirError(f"unknown control request {request!r}; accepted: {', '.join(CONTROL_REQUESTS)}")
    control = Path(run_dir) / "control"
    control.mkdir(parents=True, exist_ok=True)
    path = control / request
    atomic_write_text(path, f"{time.time()}\n")
    return path


class RunWriter:
    """The one process that writes a run directory: holds its lock and owns events, status and checkpoints."""

    def __init__(self, run_dir: Path, *, next_seq: int = 0):
        self.path = Path(run_dir)
        self.events_path = self.path / "events.jsonl"
        self.control_dir = self.path / "control"
        self.checkpoints_dir = self.path / "checkpoints"
        self.samples_dir = self.path / "samples"
        self.seq = next_seq
        self._lock_handle: Any = None
        self._events: Any = None
        self._status: dict[str, Any] = {}
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def open(self) -> RunWriter:
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / "lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"{self.path} is already being written by pid {holder}; one writer per run directory "
                f"(watch it with `zopro status {self.path}`, or stop it first)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle
        for folder in (self.control_dir, self.checkpoints_dir, self.samples_dir):
            folder.mkdir(exist_ok=True)
        self._events = open(self.events_path, "a", encoding="utf-8")
        self.beat()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="zopro-heartbeat", daemon=True)
        self._beat_thread.start()
        return self

    def close(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def beat(self) -> None:
        atomic_write_text(self.path / "heartbeat", f"{time.time():.3f}\n")

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                self.beat()

    # -- events and status -------------------------------------------------------------------------------
    def emit(self, type: str, *, stage: str, iteration: int | None, step: int, **fields: Any) -> dict:
        """Append one event as one whole line and flush it.

        Every event has `seq` (its identity; a resumed run re-emits from the checkpoint's seq, and a
        `resume` event with `rewind_to_seq` tells readers to drop what came after), `type`, `time`,
        `stage`, `iteration` and `step`; metric events carry `metrics: {name: value}`.
        """
        event = {
            "seq": self.seq,
            "type": type,
            "time": round(time.time(), 4),
            "stage": stage,
            "iteration": iteration,
            "step": step,
        }
        if "metrics" in fields:
            fields["metrics"] = clean_metrics(fields["metrics"])
        event.update(fields)
        self._events.write(json.dumps(event, default=_json_default, allow_nan=False) + "\n")
        self._events.flush()
        self.seq += 1
        return event

    def update_status(self, **fields: Any) -> None:
        """Merge fields into status.json and replace it atomically."""
        self._status.update(fields)
        self._status["updated"] = time.time()
        self._status["pid"] = os.getpid()
        atomic_write_json(self.path / "status.json", self._status)

    def load_status(self) -> None:
        """Carry the previous status over (on resume)."""
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            self._status = json.loads((self.path / "status.json").read_text())

    def write_samples(self, global_step: int, rows: list[dict]) -> Path:
        path = self.samples_dir / f"samples-{global_step:08d}.jsonl"
        atomic_write_text(path, "".join(json.dumps(row, default=_json_default) + "\n" for row in rows))
        return path

    # -- control -----------------------------------------------------------------------------------------
    def take_requests(self) -> list[str]:
        """The pending control requests, oldest first, removed from control/ as they are taken."""
        found = []
        for name in CONTROL_REQUESTS:
            path = self.control_dir / name
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_mtime, name))
                path.unlink()
        return [name for _, name in sorted(found)]

    # -- checkpoints -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def checkpoint(self, name: str) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it is renamed to checkpoints/<name> atomically
        and `checkpoints/latest` names it. A crash inside leaves only a `.tmp-*` folder, ignored and cleaned."""
        final = self.checkpoints_dir / name
        tmp = self.checkpoints_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        if final.exists():
            old = self.checkpoints_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_text(self.checkpoints_dir / "latest", name + "\n")

    def clean_partial_checkpoints(self) -> None:
        for path in self.checkpoints_dir.glob(".*"):
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The most recent complete checkpoint folder, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    path = pointer.parent / name
    return path if path.is_dir() else None
