"""Metric series of a run for plotting: columns per metric read incrementally, rewinds applied, min/max per column, EMA.

A reader (the TUI, a script) feeds the events that `engine.rundir.reader.EventTail` returns to a `SeriesParser`
(`zopro_tui.series_parser`), which turns them into compact `SeriesBatch`es, and appends the batches to a
`MetricStore`. The store keeps every point of the metrics it was asked for at full
resolution (8 bytes per value, 4 per index, 32 per event for the x axes) and answers:

- `series(name, axis)`: x and y as numpy arrays, x being the cycle step (`global_step`), the wall time
  (`elapsed`, seconds) or the forward passes so far (`compute/forward_passes`, carried forward);
- `smoothed(name, weight)`: the debiased EMA of the full-resolution values (TensorBoard's smoothing);
- `minmax_columns(...)`: the min, max, first and last value per screen column, so a spike in a million
  points still shows.

A `resume` event's `rewind_to_seq` drops every stored point with `seq >= rewind_to_seq`, like
`engine.rundir.reader.apply_rewinds`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from engine.rundir.events import drop_rewound
from zopro_tui.series_parser import SeriesBatch

X_AXES = ("step", "time", "compute")
X_AXIS_LABELS = {"step": "cycle step", "time": "wall time (s)", "compute": "forward passes"}


@dataclass
class Columns:
    """One screen's worth of a series: per non-empty column, its min, max, first and last value."""

    column: np.ndarray
    low: np.ndarray
    high: np.ndarray
    first: np.ndarray
    last: np.ndarray

    def __len__(self) -> int:
        return len(self.column)


def minmax_columns(x: np.ndarray, y: np.ndarray, x_low: float, x_high: float, columns: int) -> Columns:
    """Bin the points with x in [x_low, x_high] into `columns` equal columns; x must be non-decreasing.

    Keeps the min and max per column (spikes survive any amount of data) and the first and last value
    (to join neighbouring columns into a line).
    """
    empty = np.empty(0)
    if columns <= 0 or len(x) == 0:
        return Columns(np.empty(0, dtype=np.int64), empty, empty, empty, empty)
    start, stop = int(np.searchsorted(x, x_low, side="left")), int(np.searchsorted(x, x_high, side="right"))
    x, y = x[start:stop], y[start:stop]
    finite = np.isfinite(y)
    if not finite.all():
        x, y = x[finite], y[finite]
    if len(x) == 0:
        return Columns(np.empty(0, dtype=np.int64), empty, empty, empty, empty)
    span = x_high - x_low
    if span <= 0:
        bins = np.zeros(len(x), dtype=np.int64)
    else:
        bins = np.minimum(((x - x_low) / span * columns).astype(np.int64), columns - 1)
    # x is sorted, so each column's points are contiguous: reduce over the runs of equal bins
    starts = np.flatnonzero(np.diff(bins, prepend=-1))
    ends = np.append(starts[1:], len(bins)) - 1
    return Columns(
        column=bins[starts],
        low=np.minimum.reduceat(y, starts),
        high=np.maximum.reduceat(y, starts),
        first=y[starts],
        last=y[ends],
    )


EMA_BLOCK = 128


def ema(values: np.ndarray, weight: float, carry: float = 0.0, offset: int = 0) -> tuple[np.ndarray, float]:
    """Debiased exponential moving average (TensorBoard's smoothing), vectorised in blocks.

    s_t = weight * s_{t-1} + (1 - weight) * v_t from s_{-1} = 0, shown as s_t / (1 - weight^(t+1)).
    `carry` is s at the point before `values` and `offset` how many points came before, so a long series
    can be extended without recomputing it. Returns the smoothed values and the new carry.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return np.empty(0), carry
    if weight <= 0:
        return values.copy(), float(values[-1])
    weight = min(float(weight), 0.999)
    out = np.empty(n)
    state = carry
    # within a block of B points: s_t = w^(t+1) s_{-1} + (1-w) w^t sum_{k<=t} w^-k v_k; B is small enough
    # for w^-B to stay finite for every weight we offer (>= 0.5)
    block = EMA_BLOCK if weight >= 0.5 else 16
    powers = weight ** np.arange(block + 1, dtype=np.float64)
    inverse = 1.0 / powers[:block]
    for begin in range(0, n, block):
        chunk = values[begin : begin + block]
        m = len(chunk)
        sums = np.cumsum(chunk * inverse[:m])
        smoothed = powers[1 : m + 1] * state + (1.0 - weight) * powers[:m] * sums
        out[begin : begin + m] = smoothed
        state = float(smoothed[-1])
    debias = 1.0 - weight ** np.arange(offset + 1, offset + n + 1, dtype=np.float64)
    return out / debias, state


class GrowingArray:
    """A numpy array with spare capacity: appending costs only the new values, and views handed out
    earlier stay valid (a reallocation leaves them on the old buffer)."""

    def __init__(self, dtype: type = np.float64, capacity: int = 256):
        self._data = np.empty(capacity, dtype=dtype)
        self.size = 0
        self.derived: dict = {}  # caches computed from this array (x per axis of an index array)

    @classmethod
    def wrap(cls, values: np.ndarray) -> GrowingArray:
        """A growing array around `values` as they are (no copy; the first append reallocates)."""
        column = cls(values.dtype, 0)
        column._data, column.size = values, len(values)
        return column

    def copy(self) -> GrowingArray:
        twin = GrowingArray(self._data.dtype, max(256, self.size))
        twin.extend(self.view)
        return twin

    def __len__(self) -> int:
        return self.size

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.size]

    def extend(self, values: np.ndarray | array) -> None:
        if isinstance(values, array):
            values = np.frombuffer(values, dtype=self._data.dtype) if len(values) else np.empty(0)
        values = np.asarray(values, dtype=self._data.dtype)
        end = self.size + len(values)
        if end > len(self._data):
            grown = np.empty(max(end, len(self._data) * 5 // 4 + 256), dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : end] = values
        self.size = end

    def truncate(self, size: int) -> None:
        self.size = min(self.size, max(0, size))


class MetricStore:
    """Every point of the wanted metrics of one run, in growing numpy columns; owned by one reader (the UI).

    Per event with metrics: its seq and the three x axes. Per metric: its values, and the indices of its
    events in an index array that metrics logged together share (so do their x values, gathered once per
    axis and extended as points arrive). A million events of ten metrics take about 130 MB.
    """

    def __init__(self) -> None:
        self.seq = GrowingArray(np.int64)
        self.axes: dict[str, GrowingArray] = {axis: GrowingArray(np.float64) for axis in X_AXES}
        self.index: dict[str, GrowingArray] = {}  # name -> event indices, shared by metrics logged together
        self.values: dict[str, GrowingArray] = {}
        self.latest: dict[str, float] = {}
        self.events: list[dict] = []
        self.version = 0
        self._ema: dict[tuple[str, float], tuple[GrowingArray, float]] = {}

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def names(self) -> list[str]:
        return sorted(name for name, values in self.values.items() if len(values))

    def count(self, name: str) -> int:
        values = self.values.get(name)
        return len(values) if values is not None else 0

    def extend(self, batch: SeriesBatch) -> None:
        if batch.rewind_to_seq is not None:
            self.rewind(batch.rewind_to_seq)
        base = len(self.seq)
        self.seq.extend(batch.seq)
        self.axes["step"].extend(batch.step)
        self.axes["time"].extend(batch.time)
        self.axes["compute"].extend(batch.compute)
        logged_together: dict[bytes, list[str]] = {}
        for name, (index, value) in batch.values.items():
            logged_together.setdefault(index.tobytes(), []).append(name)
            if name not in self.values:
                self.values[name] = GrowingArray(np.float64)
            self.values[name].extend(value)
        for key, names in logged_together.items():
            self._extend_index(names, np.frombuffer(key, dtype=np.int32) + base)
        self.latest.update(batch.latest)
        self.events.extend(batch.events)
        self.version += 1

    def _extend_index(self, names: list[str], index: np.ndarray) -> None:
        """Append the same event indices to `names`, keeping one shared array per common history."""
        histories: dict[int, list[str]] = {}
        for name in names:
            current = self.index.get(name)
            histories.setdefault(id(current) if current is not None else 0, []).append(name)
        for members in histories.values():
            current = self.index.get(members[0])
            if current is None:
                shared = GrowingArray(np.int32)
            elif all(self.index.get(other) is not current for other in self.index if other not in members):
                shared = current  # every metric of this history was logged again: extend in place
            else:
                shared = current.copy()  # the others were not: this group's history goes its own way
            shared.extend(index)
            for name in members:
                self.index[name] = shared

    def rewind(self, seq: int) -> None:
        """Drop every point and event with `seq >= seq` (a resumed run re-emits them)."""
        keep = int(np.searchsorted(self.seq.view, seq, side="left"))
        if keep < len(self.seq):
            self.seq.truncate(keep)
            for column in self.axes.values():
                column.truncate(keep)
            for name, index in self.index.items():
                cut = int(np.searchsorted(index.view, keep, side="left"))
                self.values[name].truncate(cut)
            for index in {id(index): index for index in self.index.values()}.values():
                index.truncate(int(np.searchsorted(index.view, keep, side="left")))
                index.derived.clear()
            self._ema.clear()
        drop_rewound(self.events, seq)
        self.version += 1

    def series(self, name: str, axis: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """x (the chosen axis) and y of one metric, at full resolution."""
        values = self.values.get(name)
        if values is None or not len(values):
            return np.empty(0), np.empty(0)
        index = self.index[name]
        x = index.derived.get(axis)
        if x is None or len(x) > len(index):
            x = index.derived[axis] = GrowingArray(np.float64)
        if len(x) < len(index):
            x.extend(self.axes[axis].view[index.view[len(x) :]])
        return x.view, values.view

    def smoothed(self, name: str, weight: float) -> np.ndarray:
        """The EMA of a metric's values, extended incrementally as points arrive."""
        column = self.values.get(name)
        if column is None or not len(column):
            return np.empty(0)
        values = column.view
        if weight <= 0:
            return values
        smoothed, carry = self._ema.get((name, weight), (None, 0.0))
        if smoothed is None or len(smoothed) > len(values):
            smoothed, carry = GrowingArray(np.float64), 0.0
        if len(smoothed) < len(values):
            more, carry = ema(values[len(smoothed) :], weight, carry, len(smoothed))
            smoothed.extend(more)
        self._ema[(name, weight)] = (smoothed, carry)
        return smoothed.view

    def pairs(self, name_x: str, name_y: str) -> tuple[np.ndarray, np.ndarray]:
        """Two metrics logged in the same events, paired point by point (e.g. a 2-D trajectory)."""
        if not self.count(name_x) or not self.count(name_y):
            return np.empty(0), np.empty(0)
        index_x, index_y = self.index[name_x].view, self.index[name_y].view
        _, take_x, take_y = np.intersect1d(index_x, index_y, assume_unique=True, return_indices=True)
        return self.values[name_x].view[take_x], self.values[name_y].view[take_y]

    def aligned(self, name: str, like: str) -> np.ndarray | None:
        """The values of `name` at the points of `like` (NaN where `name` was not logged with it), e.g. a
        standard error beside its mean; None when `name` has no points."""
        if not self.count(name) or not self.count(like):
            return None
        index, like_index = self.index[name], self.index[like]
        if index is like_index:
            return self.values[name].view
        aligned = np.full(len(like_index), np.nan)
        _, take, put = np.intersect1d(index.view, like_index.view, assume_unique=True, return_indices=True)
        aligned[put] = self.values[name].view[take]
        return aligned

    def x_range(self, axis: str, names: Iterable[str]) -> tuple[float, float] | None:
        """The smallest and largest x over the given metrics (None when none has points)."""
        low, high = np.inf, -np.inf
        axis_column = self.axes[axis].view
        for name in names:
            if not self.count(name):
                continue
            index = self.index[name].view
            first, last = axis_column[index[0]], axis_column[index[-1]]
            if np.isfinite(first):
                low = min(low, float(first))
            if np.isfinite(last):
                high = max(high, float(last))
        return (float(low), float(high)) if low <= high else None
