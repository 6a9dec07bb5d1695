"""What a screen knows about one run it watches; changed only by that screen's message handlers."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from engine.rundir.progress import eta_seconds, steps_per_second
from engine.rundir.reader import RunInfo
from zopro_tui.catalogue import is_zeroth_order
from zopro_tui.messages import HardwareReading, SeriesRead
from zopro_tui.series import MetricStore
from zopro_tui.timeline import StageTimeline

LIVE_STATES = ("running", "paused")


@dataclass
class WatchedRun:
    """The series (full, or a preview while a big log is read), status, samples, log and hardware of a run."""

    path: Path
    store: MetricStore = field(default_factory=MetricStore)
    preview: MetricStore | None = None
    info: RunInfo | None = None
    history_progress: float = 1.0
    caught_up: bool = False
    samples: list[dict] = field(default_factory=list)
    samples_source: str = ""
    log_lines: deque = field(default_factory=lambda: deque(maxlen=400))
    log_total: int = 0  # lines read from the launch log so far (the deque keeps the last 400)
    hardware: HardwareReading | None = None
    cpu_history: deque = field(default_factory=lambda: deque(maxlen=120))
    rss_history: deque = field(default_factory=lambda: deque(maxlen=120))
    positions: deque = field(default_factory=lambda: deque(maxlen=30))  # (monotonic time, global step)
    timeline: StageTimeline = field(default_factory=StageTimeline)  # stage_start/stage_end, for the header

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def series(self) -> MetricStore:
        """What to draw: the full store, or the sample of a big log until the full read catches up."""
        return self.preview if self.preview is not None else self.store

    @property
    def status(self) -> str:
        return self.info.status if self.info else "starting"

    @property
    def method(self) -> str:
        return self.info.method if self.info else "?"

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATES

    @property
    def zeroth_order(self) -> bool:
        return is_zeroth_order(self.method) or any(name.startswith("zo/") for name in self.store.values)

    def apply_series(self, message: SeriesRead) -> None:
        if message.preview:
            preview = MetricStore()
            for batch in message.batches:
                preview.extend(batch)
            self.preview = preview
        else:
            if message.store is not None:  # a big log's whole history (its events ride in the batches)
                self.store, self.timeline = message.store, StageTimeline()
            for batch in message.batches:
                if message.store is None:
                    self.store.extend(batch)
                self.timeline.extend(batch)
        self.history_progress = message.progress
        self.caught_up = message.caught_up
        if message.caught_up:
            self.preview = None

    def apply_status(self, info: RunInfo) -> None:
        self.info = info
        if info.status == "running":
            self.positions.append((time.monotonic(), info.global_step))
        else:  # a pause must not count as slow steps once the run goes on
            self.positions.clear()

    def apply_log(self, lines: list[str]) -> None:
        self.log_lines.extend(lines)
        self.log_total += len(lines)

    def apply_hardware(self, reading: HardwareReading) -> None:
        self.hardware = reading
        if reading.alive and reading.cpu_percent is not None:
            self.cpu_history.append(reading.cpu_percent)
            self.rss_history.append(reading.rss_mib or 0.0)

    def steps_per_second(self) -> float | None:
        """Recent steps per second while running (from the last status polls), else the run's average."""
        if self.live and len(self.positions) >= 2:
            (t0, s0), (t1, s1) = self.positions[0], self.positions[-1]
            if t1 - t0 >= 2:
                recent = steps_per_second(s1 - s0, t1 - t0)
                if recent:
                    return recent
        info = self.info
        return steps_per_second(info.global_step, info.elapsed or 0.0) if info else None

    def eta(self) -> float | None:
        info = self.info
        if not info or info.status != "running":
            return None
        return eta_seconds(info.total_steps, info.global_step, self.steps_per_second())
