"""The events of events.jsonl in one place: their kinds and fields, the schema version the writer stamps, the
check a reader applies to each line, and the rewind rule of resumed runs.

Every event is one JSON object on one line with the common fields `seq` (its identity), `type`, `time`
(unix seconds), `stage`, `iteration` and `step`; the training loop adds `global_step` and `elapsed`.
`run_start` and `resume` carry `schema` (SCHEMA_VERSION). Logs written before the field existed have no
`schema` and the same layout: a reader takes both (version 0 = 1), and a newer version as far as it can.
A `resume` event's `rewind_to_seq` says that every event before it with `seq >= rewind_to_seq` was undone
(the resumed run re-emits them after its checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

SCHEMA_VERSION = 1
SCHEMA_FIELD = "schema"
COMMON_FIELDS = ("seq", "type", "time", "stage", "iteration", "step", "global_step", "elapsed")
METRIC_TYPES = ("metrics", "eval")  # events with `metrics: {name: number or null}`
RESUME = "resume"
REWIND_FIELD = "rewind_to_seq"

# Each kind and the fields it adds to the common ones (what readers may rely on; more may come).
EVENT_KINDS: dict[str, tuple[str, ...]] = {
    "run_start": ("recipe", "total_steps", "data", "world_size", SCHEMA_FIELD),
    RESUME: (
        REWIND_FIELD,
        "checkpoint",
        "warning_count",
        "skipped",
        "message",
        "world_size",  # the ranks now; `previous_world_size` when they were another number
        "previous_world_size",
        SCHEMA_FIELD,
    ),
    "stage_start": ("message",),
    "stage_end": ("wall_s", "paused_s", "peak_rss_mib", "counters", "cuda_peak_mib"),  # paused_s: of wall_s
    "metrics": ("metrics",),
    "eval": ("metrics",),
    "judge": (
        "judge",
        "rollouts",
        "unique",
        "kept",
        "judged",
        "no_verdict",
        "agreement_with_gold",  # the fraction of judged pairs where the judge agrees with gold (schema 1)
        "agreement_with_gold_pct",
    ),
    "samples": ("count", "kind"),
    "checkpoint": ("name",),
    "paused": (),
    "resumed": ("paused_s",),  # how long it was paused
    "warning": ("code", "message"),
    "rollback": ("checkpoint", "reason"),
    "error": ("message",),
    "run_end": ("status", "history", "reason", "error"),
}
STAMPED_KINDS = ("run_start", RESUME)  # the writer adds `schema` to these when the caller did not

# The small fields of the events a long-lived reader keeps (the big ones, recipe and history, it drops).
SMALL_FIELDS = (
    "seq",
    "type",
    "time",
    "elapsed",
    "stage",
    "iteration",
    "step",
    "global_step",
    "message",
    "name",
    "status",
    "error",
    REWIND_FIELD,
    "checkpoint",
    "kind",
    "count",
    "judge",
    "kept",
    "judged",
    "wall_s",
    "paused_s",
    "peak_rss_mib",
    "code",
    "reason",
)


def stamp(event: dict) -> dict:
    """The writer's side: the schema version on the events that open a (resumed) run, unless already there."""
    if event.get("type") in STAMPED_KINDS:
        event.setdefault(SCHEMA_FIELD, SCHEMA_VERSION)
    return event


def schema_version(event: dict) -> int:
    """The schema an opening event was written with: 0 for logs from before the field (the same layout)."""
    version = event.get(SCHEMA_FIELD, 0)
    return version if is_int(version) else 0


# -- the reader's side ------------------------------------------------------------------------------------------
def checked_event(value: Any) -> dict | None:
    """The event if it has the shape readers rely on (metric values kept only when numbers), else None.

    Types are compared exactly (what JSON decodes to: int, float, str, None; a bool is no number), a set per
    group of fields, since a long log is read at this function's pace."""
    if not isinstance(value, dict):
        return None
    get = value.get
    if (
        type(get("type", "")) is not str
        or not {
            type(get("seq", 0)),
            type(get("step", 0)),
            type(get("global_step", 0)),
            type(get(REWIND_FIELD, 0)),
        }
        <= INT_ONLY
        or type(get("iteration")) not in INT_OR_NULL
        or type(get("stage")) not in STR_OR_NULL
        or not {type(get("time")), type(get("elapsed"))} <= NUMBER_OR_NULL
    ):
        return None
    if "metrics" in value:
        metrics = value["metrics"]
        if not isinstance(metrics, dict):
            return None
        if not set(map(type, metrics.values())) <= NUMBER_OR_NULL:  # the common case costs one set
            value["metrics"] = {k: v for k, v in metrics.items() if v is None or is_number(v)}
    return value


NUMBER_OR_NULL = frozenset((int, float, type(None)))  # the exact classes JSON gives numbers and null
INT_ONLY = frozenset((int,))
INT_OR_NULL = frozenset((int, type(None)))
STR_OR_NULL = frozenset((str, type(None)))
_DECODER = json.JSONDecoder()

try:  # orjson decodes an event line in a third of json's time (a million-line log opens that much sooner)
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a dependency; a stripped install still reads logs
    _fast_loads = None


def parse_event_line(line: bytes) -> dict | None:
    """One line of events.jsonl as an event, or None when it is not one (bad JSON, bad UTF-8, wrong shape).

    orjson reads strict JSON; what it refuses (a byte-order mark, NaN and Infinity as Python's json writes
    them, a lone surrogate escape, bad UTF-8) goes to json, which decides. Both give the same objects, but
    for an integer beyond 64 bits, which orjson reads as a float (a `seq` of that size is then refused)."""
    if _fast_loads is not None:
        try:
            return checked_event(_fast_loads(line))
        except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
            pass
    try:
        return checked_event(_DECODER.decode(line.decode("utf-8-sig")))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- rewinds of resumed runs ----------------------------------------------------------------------------------
Item = TypeVar("Item")


def rewind_point(event: dict) -> int | None:
    """The seq a `resume` event rewinds to (what came at or after it is undone), or None for other events."""
    if event.get("type") != RESUME:
        return None
    return int(event.get(REWIND_FIELD) or 0)


def drop_rewound(items: list[Item], cut: int, seq: Callable[[Item], int] | None = None) -> None:
    """Remove from the end of `items` (in seq order) every one with seq >= cut, in place."""
    seq = seq or (lambda item: item.get("seq", -1))  # type: ignore[union-attr]
    while items and seq(items[-1]) >= cut:
        items.pop()


def apply_rewinds(events: Iterable[dict]) -> list[dict]:
    """The events with those that a later `resume` event rewound dropped (each seq once, the latest)."""
    out: list[dict] = []
    for event in events:
        cut = rewind_point(event)
        if cut is not None:
            drop_rewound(out, cut)
        out.append(event)
    return out
