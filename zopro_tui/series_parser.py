"""From events to metric points: `SeriesParser` turns the events `engine.rundir.reader.EventTail` yields into
`SeriesBatch`es (plain arrays, cheap to hand from a reading thread to the UI, which appends them to a
`zopro_tui.series.MetricStore`); `sample_events` reads a strided sample of a big events file for a first
picture while the full read goes on.

Consecutive `metrics` events of one layout (the same names in the same order, as a run logs them step after
step) are stored column by column, one numpy conversion per run of them: reading a million-event log costs
the JSON decoding and little else.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.rundir.events import METRIC_TYPES, SMALL_FIELDS, is_number, parse_event_line, rewind_point
from engine.rundir.reader import MAX_LINE_BYTES
from engine.rundir.safe_io import open_plain

COMPUTE_METRIC = "compute/forward_passes"


def _empty_floats() -> array:
    return array("d")


@dataclass
class SeriesBatch:
    """Metric points from consecutive events, after the rewind (if any) that comes before them."""

    rewind_to_seq: int | None = None
    seq: array = field(default_factory=lambda: array("q"))
    step: array = field(default_factory=_empty_floats)
    time: array = field(default_factory=_empty_floats)
    compute: array = field(default_factory=_empty_floats)
    values: dict[str, tuple[array, array]] = field(default_factory=dict)  # name -> (event index, value)
    latest: dict[str, float] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)  # the other events, trimmed to SMALL_FIELDS

    def __len__(self) -> int:
        return len(self.seq)


class SeriesParser:
    """Turns events (dicts from `EventTail`) into `SeriesBatch`es, keeping only the wanted metric names.

    It carries the forward-pass count across calls (events without `compute/forward_passes` take the
    last known one), so one parser serves one run's tail from start to end. Within one `parse` call the
    `metrics` events of one layout are held and stored in bulk (`_end_run`); nothing is held across calls.
    """

    def __init__(self, wanted: Callable[[str], bool] | None = None):
        self.wanted = wanted or (lambda name: True)
        self.seen_names: set[str] = set()
        self.wanted_names: set[str] = set()
        self.last_compute = 0.0

    def parse(self, events: Iterable[dict]) -> list[SeriesBatch]:
        batches = [SeriesBatch()]
        batch = batches[0]
        latest: dict = {}
        run = _Run()  # consecutive `metrics` events with the same names in the same order
        for event in events:
            kind = event.get("type")
            if kind in METRIC_TYPES:
                metrics = event.get("metrics") or {}
                if kind == "metrics":
                    names = tuple(metrics)
                    if names != run.names:
                        self._end_run(batch, run, latest)
                        self._learn(metrics.keys())
                        run.start(names, len(batch.seq))
                    run.rows.append(tuple(metrics.values()))
                else:
                    self._end_run(batch, run, latest)
                    self._learn(metrics.keys())
                    latest.update(metrics)
                    self._add_event(batch, len(batch.seq), metrics)
                    # evaluations also belong in an events pane
                    trimmed = {k: event[k] for k in SMALL_FIELDS if k in event}
                    trimmed["metrics"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
                    batch.events.append(trimmed)
                batch.seq.append(event.get("seq", -1))
                batch.step.append(event.get("global_step") or event.get("step") or 0)
                elapsed = event.get("elapsed")
                batch.time.append(elapsed if elapsed is not None else metrics.get("time/elapsed_s", math.nan))
            else:
                self._end_run(batch, run, latest)
                cut = rewind_point(event)
                if cut is not None:  # a resumed run: what follows comes after the rewind
                    batch.latest = _numbers(latest)
                    latest = {}
                    batch = SeriesBatch(rewind_to_seq=cut)
                    batches.append(batch)
                batch.events.append({k: event[k] for k in SMALL_FIELDS if k in event})
        self._end_run(batch, run, latest)
        batch.latest = _numbers(latest)
        return [b for b in batches if len(b) or b.events or b.rewind_to_seq is not None]

    def _learn(self, names) -> None:
        new = names - self.seen_names
        if new:
            self.seen_names |= new
            self.wanted_names |= {name for name in new if self.wanted(name)}

    def _add_event(self, batch: SeriesBatch, index: int, metrics: dict) -> None:
        """One event's forward passes (the last known when it has none) and its wanted numbers as points (a
        null is no point)."""
        compute = metrics.get(COMPUTE_METRIC)
        if compute is not None:
            self.last_compute = float(compute)
        batch.compute.append(self.last_compute)
        values = batch.values
        for name in metrics.keys() & self.wanted_names:
            value = metrics[name]
            if value is None or value.__class__ is str:
                continue
            column = values.get(name)
            if column is None:
                column = values[name] = (array("i"), array("d"))
            column[0].append(index)
            column[1].append(value)

    def _end_run(self, batch: SeriesBatch, run: _Run, latest: dict) -> None:
        """Store a run of same-layout events column by column: one numpy conversion instead of a Python
        append per number (what a long log's read costs). A run holding a null goes event by event."""
        if not run.rows:
            run.names = None
            return
        names, rows, first = run.names, run.rows, run.first
        latest.update(zip(names, rows[-1], strict=True))  # the layout is one: the last event has every name
        try:  # a checked event's metrics are numbers and nulls (`engine.rundir.events.checked_event`)
            matrix = np.array(rows, dtype=np.float64)
        except (TypeError, ValueError):  # something else, handed in directly: event by event
            matrix = None
        if matrix is None or (np.isnan(matrix).any() and any(None in row for row in rows)):
            for offset, row in enumerate(rows):
                self._add_event(batch, first + offset, dict(zip(names, row, strict=True)))
        else:
            if COMPUTE_METRIC in names:
                compute = matrix[:, names.index(COMPUTE_METRIC)]
                self.last_compute = float(compute[-1])
            else:
                compute = np.full(len(rows), self.last_compute)
            batch.compute.frombytes(np.ascontiguousarray(compute).tobytes())
            index = np.arange(first, first + len(rows), dtype=np.int32).tobytes()
            values = batch.values
            for j, name in enumerate(names):
                if name not in self.wanted_names:
                    continue
                column = values.get(name)
                if column is None:
                    column = values[name] = (array("i"), array("d"))
                column[0].frombytes(index)
                column[1].frombytes(np.ascontiguousarray(matrix[:, j]).tobytes())
        run.names, run.rows = None, []


class _Run:
    """The `metrics` events the parser holds back until their layout changes (`SeriesParser._end_run`)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.rows: list[tuple] = []
        self.first = 0  # the batch index of the first held event

    def start(self, names: tuple[str, ...], first: int) -> None:
        self.names, self.rows, self.first = names, [], first


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if is_number(v)}


def sample_events(path: Path, count: int, line_bytes: int = 4096) -> list[dict]:
    """About `count` events spread evenly over a big events file (the first whole line after each of `count`
    equally spaced byte offsets), for a first picture of a long run before the full read ends."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return []
    events: list[dict] = []
    last_start = -1
    try:
        handle = open_plain(path)
    except OSError:
        return []
    with handle:
        for i in range(count):
            offset = size * i // count
            handle.seek(offset)
            data = handle.read(line_bytes)
            start = 0 if offset == 0 else data.find(b"\n") + 1
            if offset and start == 0:
                continue  # a line longer than line_bytes: skip this probe
            data = bytearray(data)
            end = data.find(b"\n", start)
            while end < 0 and len(data) <= MAX_LINE_BYTES:  # an endless line is garbage: give up on it
                more = handle.read(max(line_bytes, len(data)))  # doubling: linear in the line's length
                if not more:
                    break
                searched = len(data)
                data += more
                end = data.find(b"\n", searched)
            if end < 0 or offset + start <= last_start:
                continue
            last_start = offset + start
            event = parse_event_line(bytes(data[start:end]))
            if event is not None:
                events.append(event)
    return events
