"""The run directory, reader side: tail events by byte offset, derive a run's status, list runs.

Any number of readers (the TUI, `zopro ls/status/export`, tests) use this module; none of them talks to
the training process except through the files described in `engine.rundir.writer`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.rundir.events import apply_rewinds, is_number, parse_event_line
from engine.rundir.progress import eta_seconds
from engine.rundir.safe_io import open_plain, read_inside, read_plain

STALE_AFTER_SECONDS = 60.0
TERMINAL_STATES = ("finished", "failed", "stopped")
STATES = ("running", "paused", "finished", "failed", "stopped", "created")
MAX_LINE_BYTES = 4 << 20  # no event comes near this; a longer line is garbage and is skipped, not held
MAX_RECIPE_BYTES = 1 << 20  # a recipe copy in a run or sweep folder; no recipe comes near it


class EventTail:
    """Reads new whole lines of an events.jsonl from a byte offset; a truncated last line waits for more.

    `read_new()` returns only the events appended since the previous call, so tailing a multi-GB log
    costs only the new bytes. Lines that are not events (bad JSON or UTF-8, wrong field types) and lines of
    MAX_LINE_BYTES or more are skipped and counted in `bad_lines`; `problem` says when the file cannot be read.
    """

    def __init__(self, path: Path, offset: int = 0, chunk_bytes: int = 8 << 20):
        self.path = Path(path)
        self.offset = offset
        self.chunk_bytes = chunk_bytes
        self.bad_lines = 0
        self.problem: str | None = None  # events.jsonl cannot be read at all (a folder, no permission)
        self._skipping = False  # inside a line longer than MAX_LINE_BYTES: drop bytes up to its end
        self.at_end = False  # the last read went to the end of the file (not stopped by max_bytes)

    def read_new(self, max_bytes: int | None = None) -> list[dict]:
        return list(self.iter_new(max_bytes))

    def iter_new(self, max_bytes: int | None = None) -> Iterator[dict]:
        try:
            handle = open_plain(self.path)
        except FileNotFoundError:
            return
        except OSError as error:
            self.problem = f"{self.path.name} cannot be read ({error.strerror or error})"
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
                self.at_end = len(chunk) < size  # the last read reached the end of the file
                if not chunk:
                    break
                if budget is not None:
                    budget -= len(chunk)
                if self._skipping:
                    newline = chunk.find(b"\n")
                    self.offset += len(chunk) if newline < 0 else newline + 1
                    if newline < 0:
                        continue
                    self._skipping, chunk = False, chunk[newline + 1 :]
                data = carry + chunk
                end = data.rfind(b"\n")
                if end < 0:
                    carry = data
                    if len(carry) >= MAX_LINE_BYTES:  # never a real event: count it and skip to its end
                        self.bad_lines += 1
                        self.offset += len(carry)
                        self._skipping, carry = True, b""
                    continue
                carry = data[end + 1 :]
                for line in data[: end + 1].split(b"\n"):
                    if not line.strip():
                        continue
                    event = parse_event_line(line)
                    if event is None:
                        self.bad_lines += 1
                    else:
                        yield event
                self.offset += end + 1
            # whatever is left in `carry` is an unfinished last line: read it again next time


def read_events(run_dir: Path, problems: list[str] | None = None) -> list[dict]:
    """All events of a run, with rewinds of resumed runs applied (each seq appears once, the latest).
    What could not be read is skipped, and said in `problems` when a list is given."""
    tail = EventTail(Path(run_dir) / "events.jsonl")
    events = apply_rewinds(tail.read_new())
    if problems is not None:
        if tail.problem:
            problems.append(tail.problem)
        if tail.bad_lines:
            problems.append(f"skipped {tail.bad_lines} line(s) of events.jsonl that are not events")
    return events


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


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None where it cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None where that cannot be read."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def process_suspended(pid: int | None) -> bool:
    """The process is stopped (SIGSTOP, Ctrl-Z) or held by a debugger: alive, but doing nothing."""
    fields = _proc_stat(pid) if pid else None
    return bool(fields) and fields[0] in (b"T", b"t")


def run_meta(run_dir: Path) -> dict:
    """meta.json as a dict ({} when missing or damaged), read through no link."""
    return _read_object(Path(run_dir) / "meta.json")[0]


def _read_object(path: Path) -> tuple[dict, str | None]:
    """A JSON object file as a dict, and what is wrong with it when it exists but is not one."""
    try:
        value = json.loads(read_plain(path, MAX_LINE_BYTES))
    except FileNotFoundError:
        return {}, None
    except OSError as error:
        return {}, f"{path.name} cannot be read ({error.strerror or error})"
    except (ValueError, RecursionError):
        return {}, f"{path.name} is not valid JSON"
    if not isinstance(value, dict):
        return {}, f"{path.name} is not a JSON object"
    return value, None


def _typed(value: Any, kind: type | tuple, default: Any = None) -> Any:
    if isinstance(value, bool) and kind is not bool:
        return default
    return value if isinstance(value, kind) else default


@dataclass
class RunInfo:
    """What `zopro ls`, `zopro status` and the TUI's runs table show about one run."""

    path: Path
    name: str
    status: str  # running, paused, finished, failed, stopped, stale, created, unreadable
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
    host: str | None = None  # the machine the writer runs on (meta.json)

    run_clock: float | None = None  # status.json's `elapsed`: the run's clock at `updated`
    paused_s: float = 0.0  # of the elapsed time, spent paused (finished pauses)

    @property
    def elapsed(self) -> float | None:
        """The run's one clock (the `elapsed` of its events and of the headless `finished in`), pauses
        included; on to now while it runs or is paused."""
        live = self.status in ("running", "paused")
        if self.run_clock is not None and self.updated is not None:
            return max(0.0, self.run_clock + (time.time() - self.updated if live else 0.0))
        if self.started is None:
            return None
        end = time.time() if live else (self.updated or time.time())
        return max(0.0, end - self.started)

    @property
    def paused(self) -> float:
        """Seconds spent paused, the pause going on now included."""
        ongoing = time.time() - self.updated if self.status == "paused" and self.updated else 0.0
        return self.paused_s + max(0.0, ongoing)

    @property
    def eta(self) -> float | None:
        if self.status != "running" or self.elapsed is None:
            return None
        working = max(self.elapsed - self.paused, 1e-9)
        return eta_seconds(self.total_steps, self.global_step, self.global_step / working)

    def to_json(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "path"}
        data["path"] = str(self.path)
        data["elapsed"] = self.elapsed
        data["paused_s"] = self.paused
        data["eta"] = self.eta
        return data


def run_info(run_dir: Path, now: float | None = None) -> RunInfo:
    """Derive a run's status from status.json, the heartbeat and the writer's pid."""
    run_dir = Path(run_dir)
    status, problem = _read_object(run_dir / "status.json")
    meta, _ = _read_object(run_dir / "meta.json")
    events = run_dir / "events.jsonl"
    if problem is None and events.exists() and not events.is_file():
        problem = "events.jsonl is not a file"
    try:
        heartbeat = float(read_plain(run_dir / "heartbeat", 64).decode().strip())
    except (ValueError, OSError):
        heartbeat = None
    now = time.time() if now is None else now
    state = status.get("state", "created")
    if problem is None and state not in STATES:
        problem = f"status.json has an unknown state {str(state)[:40]!r}"
    pid = _typed(status.get("pid"), int) or _typed(meta.get("pid"), int)
    if problem is not None:
        state = "unreadable"
    elif state in ("running", "paused"):
        fresh = heartbeat is not None and now - heartbeat < STALE_AFTER_SECONDS
        if not (fresh and pid_alive(pid)):
            state = "stale"
    number = (int, float)
    latest = _typed(status.get("latest"), dict, {})
    return RunInfo(
        path=run_dir,
        name=run_dir.name,
        status=state,
        method=_typed(status.get("method"), str) or _typed(meta.get("method"), str) or "?",
        stage=_typed(status.get("stage"), str, ""),
        iteration=_typed(status.get("iteration"), int),
        iterations=_typed(status.get("iterations"), int),
        step=_typed(status.get("step"), int, 0),
        global_step=_typed(status.get("global_step"), int, 0),
        total_steps=_typed(status.get("total_steps"), int),
        started=_typed(status.get("started"), number) or _typed(meta.get("started"), number),
        updated=_typed(status.get("updated"), number),
        heartbeat=heartbeat,
        error=problem or _typed(status.get("error"), str),
        latest={k: v for k, v in latest.items() if is_number(v)},
        pid=pid,
        warnings=status.get("warnings") or [],
        warning_count=status.get("warning_count") or len(status.get("warnings") or []),
        run_clock=_typed(status.get("elapsed"), number),
        paused_s=_typed(status.get("paused_s"), number, 0.0),
        host=_typed(meta.get("host"), str),
    )


def is_run_dir(path: Path) -> bool:
    return (path / "events.jsonl").exists() or (path / "status.json").exists()


def list_runs(root: Path) -> list[RunInfo]:
    """The runs directly under `root` (newest first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    try:
        folders = [p for p in root.iterdir() if p.is_dir() and is_run_dir(p)]
    except OSError:
        return []
    return sorted((_run_info_or_unreadable(p) for p in folders), key=lambda r: r.started or 0.0, reverse=True)


def _run_info_or_unreadable(run_dir: Path) -> RunInfo:
    """One run's info; a run that cannot be read at all is listed as unreadable, never breaking the list."""
    try:
        return run_info(run_dir)
    except Exception as error:  # noqa: BLE001 - one bad run must leave every other run usable
        return RunInfo(
            path=run_dir, name=run_dir.name, status="unreadable", error=f"{type(error).__name__}: {error}"
        )


def latest_samples(run_dir: Path) -> list[dict]:
    """The rows of the newest samples file (prompt, response, scores)."""
    files = sorted((Path(run_dir) / "samples").glob("samples-*.jsonl"))
    if not files:
        return []
    rows = []
    try:
        text = read_inside(run_dir, files[-1], MAX_LINE_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
