"""The queue: recipes (or sweeps) that run one after another on this machine, detached, surviving the TUI and
the SSH session.

    ROOT/.queue/
      items/<id>.json    one per entry: kind (run or sweep), its recipe copy, --set, --grid, where it writes,
                         its place in the order, its state (pending, running, finished, failed, cancelled)
      recipes/<id>.toml  the recipe as it was when added (later edits of the original do not change it)
      worker.lock        held (flock) by the one worker process
      worker.log         the worker's and its runs' output

`zopro queue add` validates (nothing is queued when anything is wrong), writes the item and starts the
worker (`zopro queue work`, its own session) unless one is running. The worker takes the pending item that
comes first, runs it as a `zopro run` (or `zopro sweep`) process, records how it ended, and goes on until
nothing is pending. Any reader (`zopro queue ls`, the TUI) reorders or cancels by rewriting items.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.files import recipe_data_problem
from engine.jobs.command import engine_command, run_command
from engine.recipe import RecipeError, load_recipe
from engine.rundir.files import atomic_write_text, spawn_detached
from engine.rundir.reader import process_start, run_info
from engine.rundir.safe_io import atomic_write_bytes, is_link, open_in_place, read_plain, real_folder

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,254}")

QUEUE_DIR = ".queue"
STATES = ("pending", "running", "finished", "failed", "cancelled")


class QueueError(ValueError):
    """Bad queue input or state (one sentence)."""


@dataclass
class QueueItem:
    id: str
    kind: str  # run or sweep
    recipe: str  # the copy in recipes/
    source: str  # the file it came from
    overrides: list[str]
    grid: list[str]
    target: str  # the run (or sweep) directory it writes
    order: float
    state: str = "pending"
    added: float = 0.0
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    pid_start: int | None = None  # the process's start time (clock ticks since boot): who `pid` is
    cancel: bool = False  # asked to cancel while running

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @property
    def label(self) -> str:
        text = Path(self.source).name
        if self.grid:
            text += " --grid " + " --grid ".join(self.grid)
        if self.overrides:
            text += " --set " + " --set ".join(self.overrides)
        return text


def queue_dir(root: Path) -> Path:
    return Path(root) / QUEUE_DIR


def _write(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _folders(root: Path) -> Path:
    """.queue/, items/ and recipes/ as real folders (created when missing; a link there is refused)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    folder = real_folder(queue_dir(root))
    real_folder(folder / "items")
    real_folder(folder / "recipes")
    return folder


@contextlib.contextmanager
def _items_lock(root: Path):
    """Held while an entry is numbered and written: two `queue add` at once never take the same id."""
    fd = open_in_place(_folders(root) / "items.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _item_path(root: Path, item_id: str) -> Path:
    return queue_dir(root) / "items" / f"{item_id}.json"


def save(root: Path, item: QueueItem) -> None:
    _write(_item_path(root, item.id), item.to_json())


def load_items(root: Path, damaged: list[str] | None = None) -> list[QueueItem]:
    """Every item, in queue order (pending ones by their place; the others where they were). An entry
    that cannot be read is left out (and named in `damaged` when a list is given): it never stops the rest."""
    folder = queue_dir(root) / "items"
    items = []
    try:
        if is_link(queue_dir(root)) or is_link(folder):
            raise OSError("a link")
        paths = sorted(folder.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            item = item_from_json(json.loads(read_plain(path, 1 << 20)), path.stem, Path(root))
        except (OSError, ValueError, TypeError, RecursionError) as error:
            if damaged is not None:
                damaged.append(f"{path}: {error}")
            continue
        items.append(item)
    return sorted(items, key=lambda item: (item.order, item.added))


def item_from_json(data: Any, stem: str, root: Path) -> QueueItem:
    """A QueueItem from an items/<id>.json; ValueError (what is wrong) when it is damaged or points outside
    the queue's root (its run or sweep goes directly under the root, its recipe copy in recipes/)."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fields = {k: v for k, v in data.items() if k in QueueItem.__dataclass_fields__}
    item = QueueItem(**fields)  # TypeError when a required field is missing
    text = (str,)
    number = (int, float)
    checks = {
        "id": isinstance(item.id, str) and item.id.isdigit() and item.id == stem,
        "kind": item.kind in ("run", "sweep"),
        "state": item.state in STATES,
        "order": isinstance(item.order, number) and not isinstance(item.order, bool),
        "added": isinstance(item.added, number) and not isinstance(item.added, bool),
        "overrides": isinstance(item.overrides, list) and all(isinstance(t, str) for t in item.overrides),
        "grid": isinstance(item.grid, list) and all(isinstance(t, str) for t in item.grid),
        "source": isinstance(item.source, text),
        "pid": item.pid is None
        or (isinstance(item.pid, int) and not isinstance(item.pid, bool) and item.pid > 0),
        "pid_start": item.pid_start is None or isinstance(item.pid_start, int),
        "cancel": isinstance(item.cancel, bool),
        "exit_code": item.exit_code is None or isinstance(item.exit_code, int),
        "started": item.started is None or isinstance(item.started, number),
        "ended": item.ended is None or isinstance(item.ended, number),
    }
    wrong = [name for name, fine in checks.items() if not fine]
    if wrong:
        raise ValueError(f"field {wrong[0]} has the wrong value {getattr(item, wrong[0])!r}")
    home = Path(root).resolve()
    for name, parent in (("target", home), ("recipe", home / QUEUE_DIR / "recipes")):
        value = getattr(item, name)
        if (
            not isinstance(value, str)
            or Path(value).parent != parent
            or not SAFE_NAME.fullmatch(Path(value).name)
        ):
            raise ValueError(f"field {name} {str(value)[:80]!r} is not a folder directly under {parent}")
        if is_link(Path(value)):
            raise ValueError(
                f"field {name} {str(value)[:80]!r} is a symbolic link; zopro writes through none"
            )
    return item


def find(root: Path, item_id: str) -> QueueItem:
    for item in load_items(root):
        if item.id == item_id or item.id.lstrip("0") == item_id.lstrip("0"):
            return item
    known = ", ".join(item.id for item in load_items(root)) or "none"
    raise QueueError(f"no queue entry {item_id!r} under {queue_dir(root)}; entries: {known}")


def add(root: Path, recipe: Path, overrides: list[str], grid: list[str]) -> QueueItem:
    """Validate (a sweep: every point), then queue; QueueError (one sentence) and nothing written otherwise."""
    from engine.jobs.sweep import SweepError, grid_points, parse_grid, validate_points

    recipe = Path(recipe)
    try:
        resolved = load_recipe(recipe, overrides)
        problem = recipe_data_problem(resolved)  # a worker would only fail it later
        if problem is not None:
            raise RecipeError(f"{recipe}: {problem}")
        if grid:
            validate_points(recipe, overrides, grid_points(parse_grid(grid, overrides)))
    except (RecipeError, SweepError) as error:
        raise QueueError(str(error)) from None
    root = Path(root)
    for existing in (root, *root.parents):
        if existing.exists():
            if not existing.is_dir():
                raise QueueError(f"--root {root}: {existing} is a file, not a folder")
            break
    try:
        with _items_lock(root):  # the id is computed and written under the lock
            return _add_locked(root, recipe, resolved, overrides, grid)
    except OSError as error:
        raise QueueError(
            f"{error.filename or queue_dir(root)} cannot be written ({error.strerror or error})"
        ) from None


def _add_locked(root: Path, recipe: Path, resolved, overrides: list[str], grid: list[str]) -> QueueItem:
    folder = queue_dir(root)
    items = load_items(root)
    taken = [int(path.stem) for path in (folder / "items").glob("*.json") if path.stem.isdigit()]
    number = 1 + max(taken, default=0)
    item_id = f"{number:04d}"
    copy = folder / "recipes" / f"{item_id}.toml"
    atomic_write_bytes(copy, recipe.read_bytes())
    kind = "sweep" if grid else "run"
    target = root.resolve() / (
        f"{resolved.name}-sweep-q{item_id}"
        if grid
        else f"{resolved.name}-{resolved.policy.method}-q{item_id}"
    )
    item = QueueItem(
        id=item_id,
        kind=kind,
        recipe=str(copy.resolve()),
        source=str(recipe.resolve()),
        overrides=list(overrides),
        grid=list(grid),
        target=str(target),
        order=max((item.order for item in items), default=0.0) + 1.0,
        added=time.time(),
    )
    save(root, item)
    return item


def move(root: Path, item_id: str, where: str) -> tuple[QueueItem, int, int]:
    """Move a pending entry: up, down, first or last among the pending ones; (the entry, its place among
    them from 1, how many are pending)."""
    if where not in ("up", "down", "first", "last"):
        raise QueueError(f"move {where!r} is not accepted; choose up, down, first or last")
    item = find(root, item_id)
    if item.state != "pending":
        raise QueueError(f"entry {item.id} is {item.state}; only pending entries move")
    pending = [i for i in load_items(root) if i.state == "pending"]
    index = next(n for n, i in enumerate(pending) if i.id == item.id)
    target = {"up": index - 1, "down": index + 1, "first": 0, "last": len(pending) - 1}[where]
    target = max(0, min(len(pending) - 1, target))
    pending.insert(target, pending.pop(index))
    orders = sorted(i.order for i in pending)
    for entry, order in zip(pending, orders, strict=True):
        if entry.order != order:
            entry.order = order
            save(root, entry)
    return item, target + 1, len(pending)


def cancel(root: Path, item_id: str) -> QueueItem:
    """A pending entry is dropped; a running one is stopped (it checkpoints first: `--resume` continues).

    The stop is a SIGTERM, sent once the run can take it cleanly (its status says it runs, under its own
    pid); before that (the model still loading) the worker sends it as soon as it can."""
    item = find(root, item_id)
    if item.state == "pending":
        item.state = "cancelled"
        item.ended = time.time()
        save(root, item)
    elif item.state == "running":
        item.cancel = True
        if not same_process(item):  # its worker and its process are gone: nothing to stop, never a stranger
            item.state = "cancelled"
            item.ended = time.time()
        save(root, item)
        if item.state == "running" and ready_to_stop(item):
            with contextlib.suppress(OSError):
                os.kill(item.pid, signal.SIGTERM)
    else:
        raise QueueError(f"entry {item.id} is already {item.state}; nothing to cancel")
    return item


def same_process(item: QueueItem) -> bool:
    """The process the worker started for `item` is still alive, and is that process (not another one that
    got the same pid later): its start time matches the one recorded."""
    if not item.pid or not _alive(item.pid):
        return False
    started = process_start(item.pid)
    if item.pid_start is None or started is None:
        return False  # no way to tell who has that pid now: never signal it
    return started == item.pid_start


def ready_to_stop(item: QueueItem) -> bool:
    """The entry's process stops cleanly on SIGTERM: a sweep always; a run once its status.json says it runs
    (or is paused) under that pid, which it writes just before taking over the signals."""
    if item.kind == "sweep":
        return same_process(item)
    try:
        status = json.loads(read_plain(Path(item.target) / "status.json", 1 << 20))
    except (OSError, ValueError):
        return False
    return (
        isinstance(status, dict)
        and status.get("state") in ("running", "paused")
        and status.get("pid") == item.pid
        and same_process(item)
    )


# -- the worker ------------------------------------------------------------------------------------------------
def _lock(root: Path):
    """The worker lock if free (an open file holding it), else None."""
    Path(root).mkdir(parents=True, exist_ok=True)
    folder = real_folder(queue_dir(root))
    handle = os.fdopen(open_in_place(folder / "worker.lock", os.O_RDWR | os.O_CREAT), "r+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def worker_running(root: Path) -> bool:
    if not (queue_dir(root) / "worker.lock").exists():
        return False
    try:
        handle = _lock(root)
    except OSError:
        return False
    if handle is None:
        return True
    handle.close()
    return False


def start_worker(root: Path) -> int | None:
    """Start `zopro queue work` detached (its own session) unless a worker runs; its pid, or None. The
    worker lock is taken here and handed to the worker, so two `queue add` at once start one worker."""
    handle = _lock(root)
    if handle is None:
        return None
    folder = queue_dir(root)
    source_root = str(Path(__file__).resolve().parents[2])  # the folder that holds `engine`
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    fd = handle.fileno()
    command = engine_command(["queue", "work", "--root", str(Path(root).resolve()), "--lock-fd", str(fd)])
    with handle:  # the worker holds the lock through its copy of the descriptor
        return spawn_detached(command, folder / "worker.log", env, pass_fds=(fd,)).pid


def item_command(item: QueueItem) -> list[str]:
    target = Path(item.target)
    if item.kind != "sweep":  # a worker that died mid-run left recipe.toml: continue that run
        resume = (target / "recipe.toml").exists()
        return run_command(item.recipe, run_dir=target, resume=resume, overrides=item.overrides)
    if (target / "sweep.json").exists():
        return engine_command(["sweep", "--resume", str(target), "--quiet"])
    args = ["sweep", item.recipe, "--sweep-dir", str(target), "--quiet"]
    for entry in item.grid:
        args += ["--grid", entry]
    for override in item.overrides:
        args += ["--set", override]
    return engine_command(args)


def next_item(root: Path) -> QueueItem | None:
    """The first entry to run: one left running by a worker that died, else the first pending one."""
    items = load_items(root)
    for item in items:
        if item.state == "running" and not same_process(item):
            return item
    return next((item for item in items if item.state == "pending"), None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work(root: Path, log=print, lock_fd: int | None = None) -> int:
    """Run the queue until nothing is pending (the body of `zopro queue work`); `lock_fd`: the worker lock,
    already held (handed over by `start_worker`)."""
    root = Path(root)
    handle = _adopt(lock_fd) if lock_fd is not None else _lock(root)
    if handle is None:
        log("a queue worker is already running here")
        return 0
    try:
        while True:
            item = next_item(root)
            if item is None:
                handle.close()  # then look once more: an entry added while the lock was held
                handle = None
                time.sleep(0.2)
                if next_item(root) is None:
                    return 0
                handle = _lock(root)
                if handle is None:  # another worker took over
                    return 0
                continue
            _run_item(root, item, log)
    finally:
        if handle is not None:
            handle.close()


def _current(root: Path, item: QueueItem) -> QueueItem:
    """The entry as it is on disk now (a reader may have cancelled it); as the worker holds it when its
    file has gone or was damaged meanwhile."""
    try:
        return find(root, item.id)
    except QueueError:
        return item


def _adopt(fd: int):
    """The worker lock `start_worker` took and passed down: keep it, and write this worker's pid in it."""
    handle = os.fdopen(fd, "r+")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _run_item(root: Path, item: QueueItem, log) -> None:
    Path(item.target).parent.mkdir(parents=True, exist_ok=True)
    command = item_command(item)
    log(f"[{time.strftime('%H:%M:%S')}] {item.id} {item.kind}: {' '.join(command[3:])}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    source_root = str(Path(__file__).resolve().parents[2])  # the folder that holds `engine`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    if _current(root, item).state == "cancelled":  # cancelled while it was being picked
        return
    if is_link(Path(item.target)):  # made a link since the entry was read: never run into it
        item.state, item.ended = "failed", time.time()
        save(root, item)
        log(f"[{time.strftime('%H:%M:%S')}] {item.id} failed: {item.target} is a symbolic link; not run")
        return
    if item.kind == "run" and run_info(Path(item.target)).status == "finished":  # it ran on when its
        item.state, item.exit_code, item.ended = "finished", 0, item.ended or time.time()  # worker died
        save(root, item)
        log(f"[{time.strftime('%H:%M:%S')}] {item.id} had finished")
        return
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)
    item.state, item.pid, item.started = "running", process.pid, item.started or time.time()
    item.pid_start = process_start(process.pid)
    save(root, item)
    stopping = False
    while True:
        try:
            code = process.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if not stopping and _current(root, item).cancel and ready_to_stop(item):  # a cancel came early
            stopping = True
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)
    current = _current(root, item)  # a reader may have asked to cancel meanwhile
    current.exit_code = code
    current.ended = time.time()
    current.state = "cancelled" if current.cancel else ("finished" if code == 0 else "failed")
    save(root, current)
    log(f"[{time.strftime('%H:%M:%S')}] {item.id} {current.state} (exit {code})")
