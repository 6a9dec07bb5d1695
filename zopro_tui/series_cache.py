"""The reader-side cache of a run's metric columns: re-opening a long run shows its whole history at once.

What a `RunReader` parsed of events.jsonl up to a byte offset, as numpy columns in one uncompressed .npz per
run: seq and the x axes per metric event, per metric its values and the event indices it shares with the
metrics logged beside it, and (as JSON) the kept events, the latest values and the parser's state. It lives
in the per-user cache ($ZOPRO_CACHE, else ~/.cache/zopro; under series/), never in the run directory: a
read-only or shared run directory is cached the same, and the contract's layout does not change.

A cache is used only while it still describes the log: events.jsonl at least as long as the offset it
covers, the same bytes at the start and just before that offset (a truncated or rewritten log fails this),
the same format and the same wanted metrics. Otherwise, and when the file cannot be read as one (corrupt,
half written, foreign), it is ignored and rebuilt. A log that grew is read on from the cached offset and the
cache rewritten. Saving never breaks reading: a cache that cannot be written is simply not there next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.rundir.safe_io import open_plain
from zopro_tui.series import X_AXES, GrowingArray, MetricStore

FORMAT = 1
PROBE_BYTES = 1 << 16  # hashed at the start of the log and just before the cached offset
FORGET_AFTER_DAYS = 30  # caches of runs not opened for this long are removed when another is saved


def cache_folder() -> Path:
    root = os.environ.get("ZOPRO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "zopro") / "series"


def cache_path(events_path: Path) -> Path:
    """One file per events.jsonl, named by a hash of its absolute path."""
    key = hashlib.sha1(str(Path(events_path).resolve()).encode()).hexdigest()[:20]
    return cache_folder() / f"{key}.npz"


def fingerprint(events_path: Path, offset: int) -> dict[str, str]:
    """Hashes of the first bytes of the log and of those just before `offset`."""
    with open_plain(events_path) as handle:
        head = handle.read(min(PROBE_BYTES, offset))
        handle.seek(max(0, offset - PROBE_BYTES))
        tail = handle.read(offset - max(0, offset - PROBE_BYTES))
    return {"head": hashlib.sha1(head).hexdigest(), "tail": hashlib.sha1(tail).hexdigest()}


@dataclass
class CachedHistory:
    """A store read back from the cache, and where in the log (and in the parser's state) it ends."""

    store: MetricStore
    offset: int
    bad_lines: int
    seen_names: set[str]
    wanted_names: set[str]
    last_compute: float


@dataclass
class Snapshot:
    """What to save of a store: views of its columns (valid while nothing rewinds it) and its small state."""

    arrays: dict[str, np.ndarray]
    meta: dict


def snapshot(
    store: MetricStore, offset: int, bad_lines: int, seen: set[str], wanted: set[str], last_compute: float
) -> Snapshot:
    arrays = {"seq": store.seq.view, **{f"axis_{axis}": store.axes[axis].view for axis in X_AXES}}
    shared: dict[int, str] = {}  # metrics logged together keep one index array
    names: dict[str, list[str]] = {}
    for number, (name, index) in enumerate(sorted(store.index.items())):
        key = shared.get(id(index))
        if key is None:
            key = shared[id(index)] = f"index_{len(shared)}"
            arrays[key] = index.view
        arrays[f"values_{number}"] = store.values[name].view
        names[name] = [key, f"values_{number}"]
    meta = {
        "format": FORMAT,
        "offset": offset,
        "bad_lines": bad_lines,
        "seen": sorted(seen),
        "wanted": sorted(wanted),
        "last_compute": last_compute,
        "names": names,
        "latest": store.latest,
        "events": store.events,
    }
    return Snapshot(arrays, meta)


def save(events_path: Path, shot: Snapshot) -> Path | None:
    """Write the snapshot (under a temporary name, then renamed); None when it cannot be written."""
    target = cache_path(events_path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {**shot.meta, **fingerprint(events_path, shot.meta["offset"])}
        encoded = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with open(tmp, "wb") as handle:
            np.savez(handle, meta=encoded, **shot.arrays)
        os.replace(tmp, target)
    except (OSError, ValueError, TypeError):
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    _forget_old(target.parent)
    return target


def load(events_path: Path, wanted: Callable[[str], bool]) -> CachedHistory | None:
    """The cached history of this log when it still describes it, else None (and the cache is rebuilt)."""
    path = cache_path(events_path)
    try:
        size = os.path.getsize(events_path)
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            offset = meta["offset"]
            if meta.get("format") != FORMAT or not 0 < offset <= size:
                return None
            if {k: meta[k] for k in ("head", "tail")} != fingerprint(events_path, offset):
                return None  # truncated or rewritten (a resume that rewrote the log, another run there)
            if {name for name in meta["seen"] if wanted(name)} != set(meta["wanted"]):
                return None  # another choice of metrics than the one cached
            store = _restore(data, meta)
            history = CachedHistory(
                store,
                offset,
                int(meta["bad_lines"]),
                set(meta["seen"]),
                set(meta["wanted"]),
                float(meta["last_compute"]),
            )
    except Exception:  # noqa: BLE001 - missing, corrupt, half written, foreign or of other types: rebuilt
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept
    return history


def _restore(data, meta: dict) -> MetricStore:
    """A store from the arrays; ValueError when they do not fit together."""
    store = MetricStore()
    store.seq = _column(data["seq"], np.int64)
    count = len(store.seq)
    for axis in X_AXES:
        store.axes[axis] = _column(data[f"axis_{axis}"], np.float64, count)
    indices: dict[str, GrowingArray] = {}
    for name, (index_key, values_key) in meta["names"].items():
        if index_key not in indices:
            index = indices[index_key] = _column(data[index_key], np.int32)
            if len(index) and not (0 <= index.view[0] and index.view[-1] < count):
                raise ValueError("an index past the events")
        store.index[name] = indices[index_key]
        store.values[name] = _column(data[values_key], np.float64)
        if len(store.values[name]) != len(store.index[name]):
            raise ValueError("values and indices of different lengths")
    store.latest = {
        str(k): v
        for k, v in meta["latest"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    store.events = [event for event in meta["events"] if isinstance(event, dict)]
    store.version = 1
    return store


def _column(values: np.ndarray, dtype: type, length: int | None = None) -> GrowingArray:
    if values.dtype != dtype or values.ndim != 1 or (length is not None and len(values) != length):
        raise ValueError("a column of another shape")
    return GrowingArray.wrap(values)


def _forget_old(folder: Path) -> None:
    cutoff = time.time() - FORGET_AFTER_DAYS * 86400
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
