"""Background reading of run directories: what a worker thread reads (the messages it posts to the UI are in
`zopro_tui.messages`).

A `RunReader` belongs to one worker thread. It tails one run's events by byte offset (through
`engine.rundir.reader.EventTail`), parses them into `SeriesBatch`es, and reads status, samples and the launch log
when they change. The worker posts what it read as messages; the screen's handlers own all UI state.

The history of a big log is built here, in a `MetricStore` that starts from the reader-side cache
(`zopro_tui.series_cache`) when that still describes the log, and is handed to the screen whole once read to
the end (a strided preview is drawn meanwhile); the cache is then saved. Later events go as batches.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from engine.rundir.reader import EventTail, RunInfo, latest_samples, list_runs, run_info
from engine.rundir.safe_io import open_plain
from zopro_tui import series_cache
from zopro_tui.catalogue import wanted_metric
from zopro_tui.messages import (
    HardwareReading,
    LogRead,
    RunsListed,
    SamplesRead,
    SeriesRead,
    StatusRead,
)
from zopro_tui.series import MetricStore
from zopro_tui.series_parser import SeriesBatch, SeriesParser, sample_events

CHUNK_BYTES = 4 << 20  # read at most this much per poll, so a huge log streams in and the UI stays live
PREVIEW_ABOVE_BYTES = 24 << 20  # bigger logs first get a strided sample, drawn until the full read ends
PREVIEW_EVENTS = 3000
CACHE_ABOVE_BYTES = PREVIEW_ABOVE_BYTES  # bigger logs are cached (smaller ones read in about a second)
CAUGHT_UP_SLACK_BYTES = 1 << 16
SETTLE_S = 1.0  # after the first picture of a big log, the UI's time to draw it
PROGRESS_EVERY_S = 0.25  # how often the progress of a long catch-up is posted


# -- readers --------------------------------------------------------------------------------------------------
def launch_log_path(run_dir: Path) -> Path:
    """Where the TUI sends the output of a run it starts: next to the run directory."""
    return run_dir.parent / f"{run_dir.name}.log"


class RunReader:
    """Incremental reader of one run directory; not thread-safe, one per worker."""

    def __init__(
        self,
        run_dir: Path,
        chunk_bytes: int = CHUNK_BYTES,
        preview_above: int = PREVIEW_ABOVE_BYTES,
        cache_above: int | None = CACHE_ABOVE_BYTES,
    ):
        self.run_dir = Path(run_dir)
        self.events_path = self.run_dir / "events.jsonl"
        self.tail = EventTail(self.events_path)
        self.parser = SeriesParser(wanted_metric)
        self.chunk_bytes = chunk_bytes
        self.preview_above = preview_above
        self.cache_above = cache_above  # None: no cache
        self.building: MetricStore | None = None  # a big log's history, until handed to the screen
        self.cached_offset = 0  # how far the cache read at the start went
        self.unsaved: series_cache.Snapshot | None = None  # the handed-over history, to cache
        self.started_reading = False
        self.history_bytes = 0  # the size at the first read: progress of the initial catch-up
        self.samples_source = ""
        self.samples_mtime = 0.0
        self.log_offset = 0

    def size(self) -> int:
        try:
            return os.path.getsize(self.events_path)
        except OSError:
            return 0

    @property
    def behind(self) -> bool:
        """More than a partly written line is left to read."""
        return self.size() - self.tail.offset > CAUGHT_UP_SLACK_BYTES

    def read_cache(self) -> bool:
        """Before the first read of a big log: start from the cached history when it still describes the
        log (the rest is read after it). Whether it did."""
        if self.started_reading or self.cache_above is None or self.size() <= self.cache_above:
            return False
        cached = series_cache.load(self.events_path, wanted_metric)
        if cached is None:
            return False
        self.building, self.cached_offset = cached.store, cached.offset
        self.tail.offset, self.tail.bad_lines = cached.offset, cached.bad_lines
        self.parser.seen_names, self.parser.wanted_names = cached.seen_names, cached.wanted_names
        self.parser.last_compute = cached.last_compute
        return True

    def read_preview(self) -> SeriesRead | None:
        """A strided sample of a big log, only before the first full read (and when more than a big log's
        worth is left to read after the cache)."""
        if self.started_reading:
            return None
        self.history_bytes = self.size()
        if self.history_bytes - self.tail.offset <= self.preview_above:
            return None
        events = sample_events(self.events_path, PREVIEW_EVENTS)
        batches = SeriesParser(wanted_metric).parse(events)
        return SeriesRead(self.run_dir, batches, preview=True, progress=0.0, caught_up=False)

    def read_series(self) -> SeriesRead | None:
        if not self.started_reading:
            self.started_reading = True
            self.history_bytes = max(self.history_bytes, self.size())
            if (
                self.building is None
                and self.cache_above is not None
                and self.history_bytes > self.cache_above
            ):
                self.building = MetricStore()
        before = self.tail.offset
        batches = self.parser.parse(
            self.tail.iter_new(max_bytes=self.chunk_bytes)
        )  # streamed: no list of dicts
        progress = min(1.0, self.tail.offset / self.history_bytes) if self.history_bytes else 1.0
        if self.building is not None:
            for batch in batches:
                self.building.extend(batch)
            if self.tail.at_end or self.tail.problem or not self.size():  # read to the end (or cannot read)
                return self._hand_over()
            if self.tail.offset == before:
                return None
            return SeriesRead(self.run_dir, [], progress=progress, caught_up=False)
        if self.tail.offset == before:
            return None
        return SeriesRead(self.run_dir, batches, progress=progress, caught_up=not self.behind)

    def _hand_over(self) -> SeriesRead:
        """The whole history, read to the end: the screen owns the store from now on. What it adds to the
        cache is kept aside (views of its columns) for `save_cache`, which runs before any further read."""
        store, self.building = self.building, None
        if self.tail.offset > self.cached_offset:
            parser = self.parser
            self.unsaved = series_cache.snapshot(
                store,
                self.tail.offset,
                self.tail.bad_lines,
                set(parser.seen_names),
                set(parser.wanted_names),
                parser.last_compute,
            )
        return SeriesRead(self.run_dir, [SeriesBatch(events=list(store.events))], store=store)

    def save_cache(self) -> None:
        """Write the history just handed over to the cache (nothing when it came all from there)."""
        shot, self.unsaved = self.unsaved, None
        if shot is not None:
            series_cache.save(self.events_path, shot)

    def read_status(self) -> StatusRead:
        return StatusRead(self.run_dir, run_info(self.run_dir))

    def read_samples(self) -> SamplesRead | None:
        """The newest samples file, when a newer one than last time appeared."""
        folder = self.run_dir / "samples"
        try:
            newest = max(
                (entry.name for entry in os.scandir(folder) if entry.name.startswith("samples-")), default=""
            )
        except OSError:
            return None
        if not newest or newest == self.samples_source:
            return None
        self.samples_source = newest
        return SamplesRead(self.run_dir, newest, latest_samples(self.run_dir))

    def read_log(self, max_bytes: int = 1 << 16) -> LogRead | None:
        path = launch_log_path(self.run_dir)
        try:
            size = os.path.getsize(path)
        except OSError:
            return None
        if size < self.log_offset:
            self.log_offset = 0
        if size == self.log_offset:
            return None
        start = max(self.log_offset, size - max_bytes)
        try:
            handle = open_plain(path)  # never a link to a file elsewhere, never a FIFO's hang
        except OSError:
            return None
        with handle:
            handle.seek(start)
            data = handle.read(size - start)
        end = data.rfind(b"\n")
        if end < 0:
            return None
        self.log_offset = start + end + 1
        lines = data[: end + 1].decode("utf-8", errors="replace").splitlines()
        return LogRead(self.run_dir, [line for line in lines if line.strip()])


def read_runs(root: Path) -> RunsListed:
    from engine.jobs.sweep import list_sweeps

    return RunsListed(list_runs(root), list_sweeps(root))


class ProcessSampler:
    """CPU and memory of the run's process through psutil, GPUs through nvidia-ml-py when importable."""

    def __init__(self) -> None:
        self._process = None
        self._pid: int | None = None
        self._nvml = _load_nvml()
        self.host = socket.gethostname()

    def sample(self, pid: int | None, host: str | None) -> HardwareReading:
        import psutil

        local = not host or host == self.host
        reading = HardwareReading(pid=pid, alive=False, local=local)
        if not pid:
            return reading
        if not local:
            reading.note = f"the run's process is on {host}"
        elif pid:
            try:
                if self._pid != pid:
                    self._process, self._pid = psutil.Process(pid), pid
                    self._process.cpu_percent(None)
                process = self._process
                with process.oneshot():
                    reading.alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
                    reading.cpu_percent = process.cpu_percent(None)
                    reading.rss_mib = process.memory_info().rss / 2**20
                    reading.threads = process.num_threads()
            except (psutil.Error, OSError):
                reading.alive = False
        reading.gpus = self._gpus(pid) if local else []
        return reading

    def _gpus(self, pid: int | None) -> list[dict]:
        nvml = self._nvml
        if nvml is None:
            return []
        gpus = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                utilisation = nvml.nvmlDeviceGetUtilizationRates(handle)
                used_by_run = None
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if pid and proc.pid == pid and proc.usedGpuMemory is not None:
                        used_by_run = proc.usedGpuMemory / 2**20
                name = nvml.nvmlDeviceGetName(handle)
                gpus.append(
                    {
                        "index": index,
                        "name": name.decode() if isinstance(name, bytes) else str(name),
                        "util": utilisation.gpu,
                        "used_mib": memory.used / 2**20,
                        "total_mib": memory.total / 2**20,
                        "run_mib": used_by_run,
                    }
                )
        except Exception:  # noqa: BLE001 - a driver hiccup must not take the dashboard down
            return []
        return gpus


def _load_nvml():
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - no package, no driver, no GPU: no GPU gauges
        return None


def follow_run(
    run_dir: Path,
    post,
    cancelled,
    *,
    extras: bool = True,
    poll_seconds: float = 0.5,
    shown: threading.Event | None = None,
) -> None:
    """The body of a worker thread: read a run until cancelled, posting what is new.

    Status every second; events every `poll_seconds` (continuously while catching up with a big log, after
    a strided preview of it); with `extras`, the newest samples and the launch log too. An error while
    reading ends the worker with an `unreadable` status, shown in the header, never silently.
    """
    try:
        _follow(run_dir, post, cancelled, extras=extras, poll_seconds=poll_seconds, shown=shown)
    except Exception as error:  # noqa: BLE001 - say it on screen instead of a silent, frozen dashboard
        message = str(error).strip().splitlines()
        post(
            StatusRead(
                run_dir,
                RunInfo(
                    path=Path(run_dir),
                    name=Path(run_dir).name,
                    status="unreadable",
                    error=f"reading stopped: {type(error).__name__}: {message[0][:200] if message else ''}",
                ),
            )
        )


def _follow(run_dir: Path, post, cancelled, *, extras: bool, poll_seconds: float, shown) -> None:
    import time

    reader = RunReader(run_dir)
    post(reader.read_status())
    reader.read_cache()
    preview = reader.read_preview()
    if preview is not None:
        post(preview)
    if extras:  # the first picture has every panel, before the (maybe long) catch-up
        for message in (reader.read_samples(), reader.read_log()):
            if message is not None:
                post(message)
    if preview is not None and shown is not None:
        shown.wait(3.0)  # let the UI draw the sample before the catch-up competes with it for the GIL
    # between reads of a catch-up the UI thread gets the GIL: a longer pause while it finishes its first
    # picture, then a short one (200 pauses of 20 ms were a third of a million-event log's read)
    settled = time.monotonic() + SETTLE_S
    last_status = last_extras = last_progress = time.monotonic()
    while not cancelled():
        read = reader.read_series()
        now = time.monotonic()
        if read is not None:
            # while a big log's history is built only its progress changes: said a few times a second, so
            # that the UI thread draws instead of handling messages
            progress_only = read.store is None and not read.batches and not read.caught_up
            if not progress_only or now - last_progress >= PROGRESS_EVERY_S:
                post(read)
                last_progress = now
            reader.save_cache()  # the history just handed over, before anything can rewind it
        if now - last_status >= 1.0:
            last_status = now
            post(reader.read_status())
        if extras and (now - last_extras >= 2.0 or (read is not None and _has_samples(read))):
            last_extras = now
            for message in (reader.read_samples(), reader.read_log()):
                if message is not None:
                    post(message)
        if read is not None and not read.caught_up:
            time.sleep(0.02 if now < settled else 0.004)
            continue
        deadline = time.monotonic() + poll_seconds
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(0.05)


def _has_samples(read: SeriesRead) -> bool:
    return any(event.get("type") == "samples" for batch in read.batches for event in batch.events)
