"""The reader-side cache of a run's metric columns: a hit equals a cold read, a grown log is read on from
the cached offset, a truncated or rewritten log and a corrupt cache are ignored and rebuilt."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.rundir.writer import RunWriter
from zopro_tui.reading import RunReader
from zopro_tui.series import X_AXES, MetricStore
from zopro_tui.series_cache import cache_path


def write_run(run: Path, steps: range, *, next_seq: int = 0, resume_at: int | None = None) -> None:
    """Metric events of a zopro-like run (objective/*, zo/* and an eval every 10 steps), a resume if asked."""
    with RunWriter(run, next_seq=next_seq) as writer:
        if resume_at is not None:
            writer.emit("resume", stage="policy", iteration=0, step=0, rewind_to_seq=resume_at)
        for step in steps:
            metrics = {
                "objective/scores": step * 0.1,
                "objective/kl": 1.0 / (1 + step),
                "zo/g": (-1.0) ** step,
            }
            if step % 7 == 0:
                metrics["zo/skipped"] = 1.0  # logged with some events only: its own index
            writer.emit("metrics", stage="policy", iteration=0, step=step, global_step=step, metrics=metrics)
            if step % 10 == 9:
                writer.emit(
                    "stage_start", stage="eval", iteration=0, step=0, global_step=step, message="eval"
                )
                writer.emit(
                    "eval",
                    stage="eval",
                    iteration=0,
                    step=0,
                    global_step=step,
                    metrics={"eval/gold": step * 0.01},
                )


def read(run: Path) -> tuple[bool, MetricStore, RunReader]:
    """Open a run as the dashboard does (cache first, then the log): whether the cache served, the history."""
    reader = RunReader(run, chunk_bytes=4096, cache_above=0)
    hit = reader.read_cache()
    message = reader.read_series()
    while message is None or message.store is None:
        message = reader.read_series()
    reader.save_cache()
    store = message.store
    while (message := reader.read_series()) is not None:  # the last bytes, after the hand-over, as batches
        for batch in message.batches:
            store.extend(batch)
    return hit, store, reader


def cold(run: Path) -> MetricStore:
    cache_path(run / "events.jsonl").unlink(missing_ok=True)
    hit, store, _ = read(run)
    assert not hit
    return store


def assert_same(a: MetricStore, b: MetricStore) -> None:
    assert a.names == b.names and len(a) == len(b) and a.latest == b.latest and a.events == b.events
    for name in a.names:
        for axis in X_AXES:
            for left, right in zip(a.series(name, axis), b.series(name, axis), strict=True):
                np.testing.assert_array_equal(left, right)


def test_a_cache_hit_equals_a_cold_read(tmp_path):
    run = tmp_path / "run"
    write_run(run, range(300))
    first = cold(run)
    assert cache_path(run / "events.jsonl").is_file()
    hit, second, _ = read(run)
    assert hit
    assert_same(second, first)
    assert len(second.series("zo/skipped")[1]) == len(range(0, 300, 7))
    second.extend(_one_more())  # the cached columns still grow
    assert second.series("objective/scores")[1][-1] == 123.0


def _one_more():
    from zopro_tui.series_parser import SeriesParser

    batch = SeriesParser().parse(
        [{"seq": 10_000, "type": "metrics", "global_step": 300, "metrics": {"objective/scores": 123.0}}]
    )
    return batch[0]


def test_appended_events_are_read_from_the_cached_offset(tmp_path):
    run = tmp_path / "run"
    write_run(run, range(200))
    cold(run)
    size = os.path.getsize(run / "events.jsonl")
    write_run(run, range(200, 260), next_seq=1000)
    write_run(run, range(230, 240), next_seq=1100, resume_at=1040)  # a resume rewinds part of the new tail
    hit, grown, reader = read(run)
    assert hit and reader.cached_offset == size  # only the tail was parsed
    assert_same(grown, cold(run))
    assert grown.series("objective/scores")[0][-1] == 239
    hit, again, reader = read(run)  # the cache was rewritten to cover the tail
    assert hit and reader.cached_offset == os.path.getsize(run / "events.jsonl")
    assert_same(again, grown)


def test_a_truncated_or_rewritten_log_invalidates_the_cache(tmp_path):
    run = tmp_path / "run"
    write_run(run, range(200))
    cold(run)
    events = run / "events.jsonl"
    data = events.read_bytes()
    events.write_bytes(data[: data.rfind(b"\n", 0, len(data) // 2) + 1])  # truncated to its first half
    hit, shorter, _ = read(run)
    assert not hit
    assert_same(shorter, cold(run))
    events.write_bytes(data.replace(b'"objective/scores": 0.1,', b'"objective/scores": 9.9,'))  # same size
    assert len(events.read_bytes()) == len(data)
    hit, rewritten, _ = read(run)
    assert not hit and rewritten.series("objective/scores")[1][1] == 9.9


def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path):
    run = tmp_path / "run"
    write_run(run, range(100))
    expected = cold(run)
    cache = cache_path(run / "events.jsonl")
    good = cache.read_bytes()
    for broken in (b"not a zip file", good[: len(good) // 2], good[:100] + b"\0" * 4096 + good[4196:]):
        cache.write_bytes(broken)
        hit, store, _ = read(run)
        assert not hit
        assert_same(store, expected)
        hit, store, _ = read(run)  # rebuilt by the read above
        assert hit
        assert_same(store, expected)


def write_big_run(run: Path, start: int, count: int) -> None:
    """A finished run whose log is over the cache threshold: metric events padded with unwanted metrics."""
    import json

    run.mkdir(parents=True, exist_ok=True)
    padding = ", ".join(f'"pad/m{i}": {i}.123456' for i in range(60))
    with open(run / "events.jsonl", "a") as out:
        for step in range(start, start + count):
            out.write(
                f'{{"seq": {step}, "type": "metrics", "time": 1.7e9, "stage": "policy", "iteration": 0, '
                f'"step": {step}, "global_step": {step}, "elapsed": {step * 0.1:.1f}, "metrics": '
                f'{{"objective/scores": {step * 1e-4:.6f}, "objective/kl": 0.5, {padding}}}}}\n'
            )
    status = {"state": "finished", "stage": "done", "method": "rloo", "global_step": start + count}
    (run / "status.json").write_text(json.dumps(status))


async def test_the_dashboard_reopens_a_big_run_from_the_cache_and_reads_only_what_the_log_gained(tmp_path):
    from tests.test_tui import dashboard, wait_for
    from zopro_tui import series_cache
    from zopro_tui.app import ZoproApp
    from zopro_tui.catalogue import wanted_metric
    from zopro_tui.reading import CACHE_ABOVE_BYTES
    from zopro_tui.screens.dashboard import DashboardScreen

    run = tmp_path / "runs" / "big"
    count = 20_000
    write_big_run(run, 0, count)
    events = run / "events.jsonl"
    assert os.path.getsize(events) > CACHE_ABOVE_BYTES

    async def open_dashboard(expected: int) -> MetricStore:
        app = ZoproApp(tmp_path / "runs", attach=run)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 10, "the dashboard")
            screen = dashboard(app)
            await wait_for(
                pilot, lambda: screen.run.caught_up and len(screen.run.store) == expected, 60, "all"
            )
            await wait_for(pilot, lambda: cache_path(events).exists(), 30, "the cache written")
            return screen.run.store

    cold_store = await open_dashboard(count)
    assert cold_store.count("objective/scores") == count
    cached = series_cache.load(events, wanted_metric)  # mark the cached history, to know it is what is shown
    assert cached is not None and cached.offset == os.path.getsize(events)
    cached.store.values["objective/scores"].view[0] = 1234.5
    shot = series_cache.snapshot(
        cached.store, cached.offset, 0, cached.seen_names, cached.wanted_names, cached.last_compute
    )
    series_cache.save(events, shot)

    warm_store = await open_dashboard(count)
    assert warm_store.series("objective/scores")[1][0] == 1234.5  # drawn from the cache
    write_big_run(run, count, 500)  # the run went on
    grown_store = await open_dashboard(count + 500)
    values = grown_store.series("objective/scores")[1]
    assert values[0] == 1234.5 and values[-1] == (count + 499) * 1e-4  # the cache, then the new tail


def test_a_cache_that_cannot_be_written_leaves_reading_as_it_was(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_run(run, range(100))
    expected = cold(run)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("ZOPRO_CACHE", str(blocked))
    for _ in range(2):
        hit, store, _ = read(run)
        assert not hit
        assert_same(store, expected)


def test_a_preview_is_drawn_only_when_much_is_left_to_read_after_the_cache(tmp_path):
    run = tmp_path / "run"
    write_run(run, range(200))
    cold(run)
    size = os.path.getsize(run / "events.jsonl")
    write_run(run, range(200, 400), next_seq=1000)  # the log doubled since it was cached
    for preview_above, expected in ((size // 2, True), (size * 2, False)):
        reader = RunReader(run, cache_above=0, preview_above=preview_above)
        assert reader.read_cache()
        preview = reader.read_preview()
        assert (preview is not None and preview.preview) == expected
