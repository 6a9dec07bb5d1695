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
    """The event if it has the shape readers rely on (metric values kept only when numbers), else None."""
    if not isinstance(value, dict) or not isinstance(value.get("type", ""), str):
        return None
    for key in ("seq", "step", "global_step", REWIND_FIELD):
        if key in value and not is_int(value[key]):
            return None
    if value.get("iteration") is not None and not is_int(value["iteration"]):
        return None
    if not isinstance(value.get("stage", ""), (str, type(None))):
        return None
    for key in ("time", "elapsed"):
        if value.get(key) is not None and not is_number(value[key]):
            return None
    if "metrics" in value:
        metrics = value["metrics"]
        if not isinstance(metrics, dict):
            return None
        if not set(map(type, metrics.values())) <= NUMBER_OR_NULL:  # the common case costs one set
            value["metrics"] = {k: v for k, v in metrics.items() if v is None or is_number(v)}
    return value


NUMBER_OR_NULL = frozenset((int, float, type(None)))  # the exact classes JSON gives numbers and null
_DECODER = json.JSONDecoder()


def parse_event_line(line: bytes) -> dict | None:
    """One line of events.jsonl as an event, or None when it is not one (bad JSON, bad UTF-8, wrong shape)."""
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
