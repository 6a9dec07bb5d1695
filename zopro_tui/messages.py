"""Every message the TUI's background workers post to its screens, in one place: what a worker read (runs,
a run's series, status, samples, launch log, hardware; the queue; a sweep's points). The screens' handlers
own all UI state; a message only carries what was read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from textual.message import Message

from engine.rundir.reader import RunInfo

if TYPE_CHECKING:
    from engine.jobs.queue import QueueItem
    from zopro_tui.series import MetricStore
    from zopro_tui.series_parser import SeriesBatch


class RunsListed(Message):
    """The runs under the root folder, freshly derived."""

    def __init__(self, runs: list[RunInfo], sweeps: list | None = None) -> None:
        super().__init__()
        self.runs = runs
        self.sweeps = sweeps or []  # engine.jobs.sweep.SweepInfo, shown as groups


class SeriesRead(Message):
    """New metric points and events of one run (or, with `preview`, a sample of a big log; with `store`, the
    whole history of a big log, which the receiver now owns; `batches` then carry only its events)."""

    def __init__(
        self,
        run_dir: Path,
        batches: list[SeriesBatch],
        *,
        preview: bool = False,
        progress: float = 1.0,
        caught_up: bool = True,
        store: MetricStore | None = None,
    ) -> None:
        super().__init__()
        self.run_dir, self.batches, self.preview = run_dir, batches, preview
        self.progress, self.caught_up, self.store = progress, caught_up, store


class StatusRead(Message):
    """The run's derived status (state, stage, position, latest metrics)."""

    def __init__(self, run_dir: Path, info: RunInfo) -> None:
        super().__init__()
        self.run_dir, self.info = run_dir, info


class SamplesRead(Message):
    """The rows of the run's newest samples file."""

    def __init__(self, run_dir: Path, source: str, rows: list[dict]) -> None:
        super().__init__()
        self.run_dir, self.source, self.rows = run_dir, source, rows


class LogRead(Message):
    """New lines of the launch log (the engine's stdout and stderr, for runs started from the TUI)."""

    def __init__(self, run_dir: Path, lines: list[str]) -> None:
        super().__init__()
        self.run_dir, self.lines = run_dir, lines


@dataclass
class HardwareReading:
    """One sample of the run's process (and GPUs when nvidia-ml-py is there)."""

    pid: int | None
    alive: bool
    local: bool
    cpu_percent: float | None = None
    rss_mib: float | None = None
    threads: int | None = None
    gpus: list[dict] = field(default_factory=list)
    note: str = ""


class HardwareRead(Message):
    def __init__(self, run_dir: Path, reading: HardwareReading) -> None:
        super().__init__()
        self.run_dir, self.reading = run_dir, reading


class QueueRead(Message):
    """The queue's entries and whether its worker is alive."""

    def __init__(self, items: list[QueueItem], worker: bool) -> None:
        super().__init__()
        self.items, self.worker = items, worker


class SweepRead(Message):
    """The sweep's points: each one's state and, when it has a run, its derived info."""

    def __init__(self, path: Path, states: dict[str, str], infos: dict[str, RunInfo]) -> None:
        super().__init__()
        self.path, self.states, self.infos = path, states, infos
