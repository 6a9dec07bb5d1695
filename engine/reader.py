"""The run directory, reader side: tail events by byte offset, derive a run's status, list runs.

Any number of readers (the TUI, `zopro ls/status/export`, tests) use this module; none of them talks to
the training process except through the files described in `engine.rundir`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

STALE_AFTER_SECONDS = 60.0
TERMINAL_STATES = ("finished", "failed", "stopped")


class EventTail:
    """Reads new whole lines of an events.jsonl from a byte offset; a truncated last line waits for more.

    `read_new()` returns only the events appended since the previous call, so tailing a multi-GB log
    costs only the new bytes.
    """

    def __init__(self, path: Path, offset: int = 0, chunk_bytes: int = 8 << 20):
        self.path = Path(path)
        self.offset = offset
        self.chunk_bytes = chunk_bytes
        self.bad_lines = 0

    def read_new(self, max_bytes: int | None = None) -> list[dict]:
        return list(self.iter_new(max_bytes))

    def iter_new(self, max_bytes: int | None = None) -> Iterator[dict]:
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return
        with handle:
            handle.seek(self.offset)
            budget = max_bytes
            carry = b""
            while True:
                size = self.chunk_bytes if budget is None else min(self.chunk_bytes, budget)
                if size <= 0:
                    break
                chunk = handle.read(size)
                if not chunk:
                    break
                if budget is not None:
                    budget -= len(chunk)
                data = carry + chunk
                end = data.rfind(b"\n")
                if end < 0:
                    carry = data
                    continue
                carry = data[end + 1 :]
                for line in data[: end + 1].splitlines():
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        self.bad_lines += 1
                self.offset += end + 1
            # whatever is left in `carry` is an unfinished last line: read it again next time


def read_events(run_dir: Path) -> list[dict]:
    """All events of a run, with rewinds of resumed runs applied (each seq appears once, the latest)."""
    return apply_rewinds(EventTail(Path(run_dir) / "events.jsonl").read_new())


def apply_rewinds(events: list[dict]) -> list[dict]:
    """Drop events that a later `resume` event rewound (they were re-emitted after the checkpoint)."""
    out: list[dict] = []
    for event in events:
        if event.get("type") == "resume":
            cut = event.get("rewind_to_seq", 0)
            while out and out[-1].get("seq", -1) >= cut:
                out.pop()
        out.append(event)
    return out


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return {}


@dataclass
class RunInfo:
    """What `zopro ls`, `zopro status` and the TUI's runs table show about one run."""

    path: Path
    name: str
    status: str  # running, paused, finished, failed, stopped, stale, created
    method: str = "?"
    stage: str = ""
    iteration: int | None = None
    iterations: int | None = None
    step: int = 0
    global_step: int = 0
    total_steps: int | None = None
    started: float | None = None
    updated: float | None = None
    heartbeat: float | None = None
    error: str | None = None
    latest: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    warnings: list[dict] = field(default_factory=list)  # the last few: {code, message, iteration, step}
    warning_count: int = 0

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        end = time.time() if self.status in ("running", "paused") else (self.updated or time.time())
        return max(0.0, end - self.started)

    @property
    def eta(self) -> float | None:
        if self.status != "running" or not self.total_steps or not self.global_step or self.elapsed is None:
            return None
        rate = self.global_step / max(self.elapsed, 1e-9)
        return max(0.0, (self.total_steps - self.global_step) / rate)

    def to_json(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "path"}
        data["path"] = str(self.path)
        data["elapsed"] = self.elapsed
        data["eta"] = self.eta
        return data


def run_info(run_dir: Path, now: float | None = None) -> RunInfo:
    """Derive a run's status from status.json, the heartbeat and the writer's pid."""
    run_dir = Path(run_dir)
    status = _read_json(run_dir / "status.json")
    meta = _read_json(run_dir / "meta.json")
    try:
        heartbeat = float((run_dir / "heartbeat").read_text().strip())
    except (FileNotFoundError, ValueError, OSError):
        heartbeat = None
    now = time.time() if now is None else now
    state = status.get("state", "created")
    pid = status.get("pid") or meta.get("pid")
    if state in ("running", "paused"):
        fresh = heartbeat is not None and now - heartbeat < STALE_AFTER_SECONDS
        if not (fresh and pid_alive(pid)):
            state = "stale"
    method = status.get("method") or meta.get("method") or "?"
    return RunInfo(
        path=run_dir,
        name=run_dir.name,
        status=state,
        method=method,
        stage=status.get("stage", ""),
        iteration=status.get("iteration"),
        iterations=status.get("iterations"),
        step=status.get("step", 0) or 0,
        global_step=status.get("global_step", 0) or 0,
        total_steps=status.get("total_steps"),
        started=status.get("started") or meta.get("started"),
        updated=status.get("updated"),
        heartbeat=heartbeat,
        error=status.get("error"),
        latest=status.get("latest", {}) or {},
        pid=pid,
        warnings=status.get("warnings") or [],
        warning_count=status.get("warning_count") or len(status.get("warnings") or []),
    )


def is_run_dir(path: Path) -> bool:
    return (path / "events.jsonl").exists() or (path / "status.json").exists()


def list_runs(root: Path) -> list[RunInfo]:
    """The runs directly under `root` (newest first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [run_info(p) for p in root.iterdir() if p.is_dir() and is_run_dir(p)]
    return sorted(runs, key=lambda r: r.started or 0.0, reverse=True)


def read_recipe(run_dir: Path) -> dict:
    try:
        return tomllib.loads((Path(run_dir) / "recipe.toml").read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return {}


def latest_samples(run_dir: Path) -> list[dict]:
    """The rows of the newest samples file (prompt, response, scores)."""
    files = sorted((Path(run_dir) / "samples").glob("samples-*.jsonl"))
    if not files:
        return []
    rows = []
    for line in files[-1].read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
