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
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.jobs.command import engine_command, run_command
from engine.recipe import RecipeError, load_recipe
from engine.rundir.files import spawn_detached

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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _item_path(root: Path, item_id: str) -> Path:
    return queue_dir(root) / "items" / f"{item_id}.json"


def save(root: Path, item: QueueItem) -> None:
    _write(_item_path(root, item.id), item.to_json())


def load_items(root: Path) -> list[QueueItem]:
    """Every item, in queue order (pending ones by their place; the others where they were)."""
    folder = queue_dir(root) / "items"
    items = []
    try:
        paths = sorted(folder.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            items.append(QueueItem(**{k: v for k, v in data.items() if k in QueueItem.__dataclass_fields__}))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(items, key=lambda item: (item.order, item.added))


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
    folder = queue_dir(root)
    (folder / "items").mkdir(parents=True, exist_ok=True)
    (folder / "recipes").mkdir(exist_ok=True)
    items = load_items(root)
    number = 1 + max((int(item.id) for item in items if item.id.isdigit()), default=0)
    item_id = f"{number:04d}"
    copy = folder / "recipes" / f"{item_id}.toml"
    shutil.copyfile(recipe, copy)
    kind = "sweep" if grid else "run"
    target = root / (
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
        target=str(target.resolve()),
        order=max((item.order for item in items), default=0.0) + 1.0,
        added=time.time(),
    )
    save(root, item)
    return item


def move(root: Path, item_id: str, where: str) -> QueueItem:
    """Move a pending entry: up, down, first or last among the pending ones."""
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
    return item


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
        save(root, item)
        if item.pid and ready_to_stop(item):
            with contextlib.suppress(OSError):
                os.kill(item.pid, signal.SIGTERM)
    else:
        raise QueueError(f"entry {item.id} is already {item.state}; nothing to cancel")
    return item


def ready_to_stop(item: QueueItem) -> bool:
    """The entry's process stops cleanly on SIGTERM: a sweep always; a run once its status.json says it runs
    (or is paused) under that pid, which it writes just before taking over the signals."""
    if item.kind == "sweep":
        return True
    try:
        status = json.loads((Path(item.target) / "status.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(status, dict)
        and status.get("state") in ("running", "paused")
        and status.get("pid") == item.pid
    )


# -- the worker ------------------------------------------------------------------------------------------------
def _lock(root: Path):
    """The worker lock if free (an open file holding it), else None."""
    folder = queue_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "worker.lock", "a+")
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
    handle = _lock(root)
    if handle is None:
        return True
    handle.close()
    return False


def start_worker(root: Path) -> int | None:
    """Start `zopro queue work` detached (its own session) unless a worker runs; its pid, or None."""
    if worker_running(root):
        return None
    folder = queue_dir(root)
    source_root = str(Path(__file__).resolve().parents[2])  # the folder that holds `engine`
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    command = engine_command(["queue", "work", "--root", str(Path(root).resolve())])
    return spawn_detached(command, folder / "worker.log", env).pid


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
        if item.state == "running" and not (item.pid and _alive(item.pid)):
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


def work(root: Path, log=print) -> int:
    """Run the queue until nothing is pending (the body of `zopro queue work`)."""
    root = Path(root)
    handle = _lock(root)
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


def _run_item(root: Path, item: QueueItem, log) -> None:
    Path(item.target).parent.mkdir(parents=True, exist_ok=True)
    command = item_command(item)
    log(f"[{time.strftime('%H:%M:%S')}] {item.id} {item.kind}: {' '.join(command[3:])}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    source_root = str(Path(__file__).resolve().parents[2])  # the folder that holds `engine`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    if find(root, item.id).state == "cancelled":  # cancelled while it was being picked
        return
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)
    item.state, item.pid, item.started = "running", process.pid, item.started or time.time()
    save(root, item)
    stopping = False
    while True:
        try:
            code = process.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if not stopping and find(root, item.id).cancel and ready_to_stop(item):  # a cancel came early
            stopping = True
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)
    current = find(root, item.id)  # a reader may have asked to cancel meanwhile
    current.exit_code = code
    current.ended = time.time()
    current.state = "cancelled" if current.cancel else ("finished" if code == 0 else "failed")
    save(root, current)
    log(f"[{time.strftime('%H:%M:%S')}] {item.id} {current.state} (exit {code})")
