"""The run directory, writer side: layout, the single-writer lock, events, status, heartbeat, control, checkpoints.

Layout (the contract every reader relies on; see README "The run directory"):

    runs/<name>/
      recipe.toml        the fully resolved recipe
      meta.json          versions, host, device, seed, start time, pid
      events.jsonl       append-only, one JSON object per line (see `RunWriter.emit`)
      heartbeat          rewritten every few seconds while the writer is alive (unix time)
      status.json        the latest state, small, replaced atomically
      control/           requests from readers: files named pause, resume, stop, checkpoint
      checkpoints/       one folder per checkpoint, written under a temporary name then renamed;
                         `latest` names the newest (state.json is written last: a folder without it is partial)
      samples/           samples-<global_step>.jsonl: prompts, responses and scores
      lock               held (flock) by the one process that writes
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.rundir.controls import CONTROL_REQUESTS
from engine.rundir.events import stamp as stamp_schema
from engine.rundir.files import RunDirError, atomic_write_json, atomic_write_text, clean_metrics, json_default
from engine.rundir.safe_io import (
    is_link,
    open_in_place,
    open_text_in_place,
    real_folder,
    remove_entry,
)

HEARTBEAT_SECONDS = 2.0
PRIVATE_BITS = (
    0o022  # no group or other write on anything a writer creates: control/ and checkpoints steer it
)


def default_run_dir(root: Path, name: str, method: str, *, reserve: bool = False) -> Path:
    """A new run's folder under `root`: NAME-METHOD-TIME, with a count when that exists already (created
    here with `reserve`)."""
    return stamped_folder(root, f"{name}-{method}", reserve=reserve)


def stamped_folder(root: Path, prefix: str, *, reserve: bool = False) -> Path:
    """root/PREFIX-TIME that does not exist yet (PREFIX-TIME-2, -3, ... when it does). With `reserve` it is
    created here, so two processes started in the same second never pick the same one (OSError when root
    cannot hold it); without, the caller creates it with mkdir(exist_ok=False)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if reserve:
        Path(root).mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = Path(root) / (f"{prefix}-{stamp}" if n == 1 else f"{prefix}-{stamp}-{n}")
        if not reserve and not os.path.lexists(path):
            return path
        if reserve:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                pass
        n += 1


INNER_PATH_BYTES = 160  # the longest path a run writes inside its folder, with room to spare


def run_dir_problem(path: Path, flag: str = "--run-dir") -> str | None:
    """What keeps `path` from holding a run (a name longer than the file system allows, or a path so long
    that the files inside it would pass the system's limit), as one sentence; None when it can."""
    full = os.path.abspath(path)
    name_max, path_max = 255, 4096
    with contextlib.suppress(OSError, ValueError):
        existing = next(p for p in (Path(full), *Path(full).parents) if p.exists())
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    for part in Path(full).parts:
        if len(os.fsencode(part)) > name_max:
            return (
                f"{flag} {str(path)[:80]}...: the name {part[:40]}... is {len(os.fsencode(part))} bytes, "
                f"more than the {name_max} the file system allows; choose a shorter name"
            )
    if len(os.fsencode(full)) + INNER_PATH_BYTES > path_max:
        return (
            f"{flag} {str(path)[:80]}... is {len(os.fsencode(full))} bytes long; with the files a run writes "
            f"inside it, paths would pass the system's limit of {path_max}: choose a shorter path"
        )
    return None


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
        self._events_fd: int | None = None
        self._events_size = 0
        self._status: dict[str, Any] = {}
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.created_folder = False  # this writer made the folder (or default_run_dir reserved it for it)
        self._created_lock = False
        self.opened = False
        self.dropped_requests: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------------------
    def claim(self, *, new: bool) -> RunWriter:
        """Take the folder's lock (creating the folder), before anything slow such as loading the model.
        A new run also checks, under the lock, that the folder holds nothing of another run (only what a
        run killed before its recipe.toml leaves), so two runs never share a folder. RunDirError otherwise."""
        try:
            self._claim(new)
        except OSError as error:
            self.close()
            raise _unwritable(error, self.path) from None
        return self

    def _claim(self, new: bool) -> None:
        if self._lock_handle is not None:
            return
        os.umask(os.umask(PRIVATE_BITS) | PRIVATE_BITS)  # also covers what torch and safetensors write
        if not os.path.lexists(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            self.created_folder = True
        _make_private(self.path)
        lock = self.path / "lock"
        self._created_lock = not os.path.lexists(lock)
        handle = open_text_in_place(lock)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(40).strip() or "another process"
            handle.close()
            raise RunDirError(
                f"{self.path} is already being written by pid {holder}; one writer per run directory "
                f"(watch it with `zopro status {self.path}`, or stop it first)"
            ) from None
        if new and not unstarted_leftovers(self.path):
            handle.close()
            raise RunDirError(
                f"--run-dir {self.path} already holds files; resume it with `zopro run --resume {self.path}` "
                "or choose another directory"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def open(self) -> RunWriter:
        """Take the lock (unless `claim` did) and open the files; RunDirError (one sentence) when the folder
        cannot be written."""
        try:
            return self._open()
        except OSError as error:
            self.close()
            raise _unwritable(error, self.path) from None

    def _open(self) -> RunWriter:
        self._claim(new=False)
        for folder in (self.control_dir, self.checkpoints_dir, self.samples_dir):
            real_folder(folder)
            _make_private(folder)
        self.dropped_requests = self.take_requests()  # left for a process that is gone: they expire
        self.recover_checkpoints()
        self._events_fd = open_in_place(self.events_path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        self._events_size = _drop_partial_line(self._events_fd)
        self.opened = True
        self.beat()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="zopro-heartbeat", daemon=True)
        self._beat_thread.start()
        return self

    def abandon(self) -> None:
        """Before the run started (bad input found while loading): let go of the lock and remove what this
        writer created and nothing else (the lock file; the folder too when it made it and it is empty)."""
        self.close()
        if self.opened or not unstarted_leftovers(self.path):
            return
        if self._created_lock and not is_link(self.path / "lock"):
            with contextlib.suppress(OSError):
                os.unlink(self.path / "lock")
        if self.created_folder:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)  # only when empty

    def close(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
        if self._events_fd is not None:
            os.close(self._events_fd)
            self._events_fd = None
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
        `stage`, `iteration` and `step`; metric events carry `metrics: {name: value}`. The kinds, their
        fields and the schema version are in `engine.rundir.events`.
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
        stamp_schema(event)  # the schema version on the events that open a run
        self._append(event)
        self.seq += 1
        return event

    def _append(self, event: dict) -> None:
        line = (json.dumps(event, default=json_default, allow_nan=False) + "\n").encode()
        try:
            written = 0
            while written < len(line):
                written += os.write(self._events_fd, line[written:])
        except OSError:
            with contextlib.suppress(OSError):  # a full disk: no half line that the next event would join
                os.ftruncate(self._events_fd, self._events_size)
            raise
        self._events_size += len(line)

    def append_event(self, event: dict) -> None:
        """Append an event written by another run as it is (a run adopting another's stages); the next
        event is numbered after it."""
        self._append(event)
        self.seq = event["seq"] + 1

    def update_status(self, **fields: Any) -> None:
        """Merge fields into status.json and replace it atomically."""
        self._status.update(fields)
        self._status["updated"] = time.time()
        self._status["pid"] = os.getpid()
        atomic_write_json(self.path / "status.json", self._status)

    def number_events_from(self, seq: int) -> None:
        """The next event gets `seq` (a resumed run numbers on from its checkpoint's position)."""
        self.seq = seq

    def write_recipe(self, text: str) -> None:
        """recipe.toml: the fully resolved recipe, written once when the run starts."""
        atomic_write_text(self.path / "recipe.toml", text)

    def write_meta(self, meta: dict[str, Any]) -> None:
        """meta.json: versions, host, device, seed, start time, pid."""
        atomic_write_json(self.path / "meta.json", meta)

    def load_status(self) -> None:
        """Carry the previous status over (on resume)."""
        with contextlib.suppress(OSError, ValueError, RecursionError):
            status = json.loads((self.path / "status.json").read_text())
            self._status = status if isinstance(status, dict) else {}

    def write_samples(self, global_step: int, rows: list[dict]) -> Path:
        path = self.samples_dir / f"samples-{global_step:08d}.jsonl"
        atomic_write_text(path, "".join(json.dumps(row, default=json_default) + "\n" for row in rows))
        return path

    # -- control -----------------------------------------------------------------------------------------
    def take_requests(self) -> list[str]:
        """The pending control requests, oldest first, removed from control/ as they are taken."""
        found = []
        for name in CONTROL_REQUESTS:
            path = self.control_dir / name
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(path)
                if stat.S_ISDIR(info.st_mode):
                    continue  # not a request, and not the run's to remove
                os.unlink(path)  # a link goes (never its target) and is not obeyed
                if stat.S_ISREG(info.st_mode):
                    found.append((info.st_mtime, name))
        return [name for _, name in sorted(found)]

    # -- checkpoints -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def checkpoint(self, name: str) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it is renamed to checkpoints/<name> atomically
        and `checkpoints/latest` names it. A crash inside leaves only a `.tmp-*` folder, ignored and cleaned."""
        final = self.checkpoints_dir / name
        tmp = self.checkpoints_dir / f".tmp-{name}-{os.getpid()}"
        real_folder(self.checkpoints_dir, create=False)
        remove_entry(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            remove_entry(tmp)  # a full disk gets its space back at once
            raise
        if os.path.lexists(final):
            old = self.checkpoints_dir / f".old-{name}-{os.getpid()}"
            remove_entry(old)
            os.replace(final, old)
            os.replace(tmp, final)
            remove_entry(old)
        else:
            os.replace(tmp, final)
        atomic_write_text(self.checkpoints_dir / "latest", name + "\n")

    def recover_checkpoints(self) -> None:
        """Undo what a crash inside `checkpoint` left: a checkpoint moved aside (`.old-NAME-PID`) whose
        replacement never arrived goes back to NAME; partial `.tmp-*` folders and stale `.old-*` ones go."""
        real_folder(self.checkpoints_dir, create=False)  # never a link: what is below it is removed
        for old in sorted(self.checkpoints_dir.glob(".old-*")):
            name = old.name[len(".old-") :].rsplit("-", 1)[0]
            final = self.checkpoints_dir / name
            if name and not is_link(old) and not os.path.lexists(final) and (old / "state.json").is_file():
                os.replace(old, final)
        for path in self.checkpoints_dir.glob(".*"):
            remove_entry(path)


UNSTARTED = ("lock", "heartbeat", "events.jsonl", "control", "checkpoints", "samples")


def unstarted_leftovers(folder: Path) -> bool:
    """The folder holds nothing, or only what a run killed before it wrote recipe.toml leaves (its lock,
    heartbeat, an empty events.jsonl, control/, checkpoints/ and samples/ with no checkpoint or sample):
    a new run may take it."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for entry in entries:
        name = entry.name
        if name.startswith(".") and ".tmp-" in name and not entry.is_dir(follow_symlinks=False):
            continue  # a whole-file write cut short
        if name not in UNSTARTED or entry.is_symlink():
            return False
        if name in ("control", "checkpoints", "samples"):
            if not entry.is_dir(follow_symlinks=False):
                return False
            inside = [e.name for e in os.scandir(entry.path)]
            if name != "control" and any(not n.startswith(".") for n in inside):
                return False
        elif name == "events.jsonl" and entry.stat(follow_symlinks=False).st_size > 0:
            return False
    return True


def _unwritable(error: OSError, path: Path) -> RunDirError:
    if isinstance(error, RunDirError):
        return error
    where = error.filename or path
    return RunDirError(
        f"{where} cannot be written as part of a run directory ({error.strerror or error}); "
        "fix or remove it, or choose another directory"
    )


def _make_private(folder: Path) -> None:
    """Take group and other write off a folder this writer owns (it may predate the umask, e.g. --run-dir)."""
    mode = folder.stat().st_mode & 0o7777
    if mode & PRIVATE_BITS:
        os.chmod(folder, mode & ~PRIVATE_BITS)


def _drop_partial_line(fd: int) -> int:
    """Cut an unterminated last line (a writer killed mid-line) so the next event starts a line; the size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep = position = size
    while position > 0:
        step = min(1 << 20, position)
        position -= step
        newline = os.pread(fd, step, position).rfind(b"\n")
        if newline >= 0:
            keep = position + newline + 1
            break
    else:
        keep = 0
    os.ftruncate(fd, keep)
    return keep


class FollowerWriter(RunWriter):
    """What a rank other than 0 of a multi-process run holds: the run directory's paths and the event
    numbering, writing nothing (rank 0 is the one writer; the others read its checkpoints)."""

    def claim(self, *, new: bool) -> FollowerWriter:
        return self

    def open(self) -> FollowerWriter:
        return self

    def abandon(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _append(self, event: dict) -> None:
        pass  # the event is numbered as rank 0 numbers it, and not written

    def update_status(self, **fields: Any) -> None:
        self._status.update(fields)

    def write_recipe(self, text: str) -> None:
        pass

    def write_meta(self, meta: dict[str, Any]) -> None:
        pass

    def load_status(self) -> None:
        pass

    def write_samples(self, global_step: int, rows: list[dict]) -> Path:
        return self.samples_dir / f"samples-{global_step:08d}.jsonl"

    def take_requests(self) -> list[str]:
        return []

    @contextlib.contextmanager
    def checkpoint(self, name: str) -> Iterator[Path]:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"zopro-{name}-") as tmp:
            yield Path(tmp)

    def recover_checkpoints(self) -> None:
        pass
