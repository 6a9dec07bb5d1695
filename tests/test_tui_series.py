"""zopro_tui.series, what the TUI draws from: rewinds, min/max per column, EMA, shared indices, sampling."""

from __future__ import annotations

import numpy as np

from engine.rundir.reader import EventTail, read_events
from engine.rundir.writer import RunWriter
from zopro_tui.series import MetricStore, ema, minmax_columns
from zopro_tui.series_parser import SeriesParser, sample_events


def store_of(events: list[dict]) -> MetricStore:
    store = MetricStore()
    for batch in SeriesParser().parse(events):
        store.extend(batch)
    return store


def test_a_spike_in_a_million_points_survives_decimation():
    x = np.arange(1_000_000, dtype=float)
    y = np.zeros_like(x)
    y[654_321] = 9.0
    columns = minmax_columns(x, y, 0, x[-1], 200)
    assert len(columns) == 200
    assert columns.high.max() == 9.0 and columns.low.min() == 0.0
    assert columns.column[np.argmax(columns.high)] == int(654_321 / 999_999 * 200)


def test_ema_matches_the_recurrence_and_extends_incrementally():
    values = np.random.default_rng(0).normal(size=1000)
    for weight in (0.6, 0.9, 0.99):
        state, expected = 0.0, []
        for t, value in enumerate(values):
            state = weight * state + (1 - weight) * value
            expected.append(state / (1 - weight ** (t + 1)))
        whole, _ = ema(values, weight)
        head, carry = ema(values[:300], weight)
        tail, _ = ema(values[300:], weight, carry, 300)
        assert np.allclose(whole, expected) and np.allclose(np.concatenate([head, tail]), expected)


def test_rewind_drops_what_a_resumed_run_replays(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run) as writer:
        for step in range(10):
            writer.emit(
                "metrics",
                stage="policy",
                iteration=0,
                step=step,
                global_step=step,
                metrics={"objective/scores": float(step)},
            )
    with RunWriter(run, next_seq=6) as writer:  # a resumed writer: re-emits from seq 6
        writer.emit("resume", stage="policy", iteration=0, step=6, rewind_to_seq=6)
        for step in range(5, 8):
            writer.emit(
                "metrics",
                stage="policy",
                iteration=0,
                step=step,
                global_step=step,
                metrics={"objective/scores": 100.0 + step},
            )
    tail_store = MetricStore()
    tail = EventTail(run / "events.jsonl", chunk_bytes=200)  # many small reads, the rewind among them
    parser = SeriesParser()
    while batches := parser.parse(tail.read_new(max_bytes=300)):
        for batch in batches:
            tail_store.extend(batch)
    expected = [e["metrics"]["objective/scores"] for e in read_events(run) if e["type"] == "metrics"]
    assert list(tail_store.series("objective/scores")[1]) == expected == [0, 1, 2, 3, 4, 5, 105, 106, 107]


def test_metrics_logged_together_share_their_index_until_they_part():
    events = [{"seq": i, "type": "metrics", "global_step": i, "metrics": {"a": i, "b": -i}} for i in range(5)]
    events.append({"seq": 5, "type": "metrics", "global_step": 5, "metrics": {"a": 5}})
    store = MetricStore()
    parser = SeriesParser()
    store.extend(parser.parse(events[:5])[0])
    assert store.index["a"] is store.index["b"]
    store.extend(parser.parse(events[5:])[0])
    assert store.index["a"] is not store.index["b"]
    assert list(store.series("a")[0]) == [0, 1, 2, 3, 4, 5] and list(store.series("b")[0]) == [0, 1, 2, 3, 4]


def test_views_handed_out_stay_valid_while_the_store_grows():
    store = store_of([{"seq": 0, "type": "metrics", "global_step": 0, "metrics": {"a": 1.0}}])
    x, y = store.series("a")
    for i in range(1, 5000):
        store.extend(
            SeriesParser().parse([{"seq": i, "type": "metrics", "global_step": i, "metrics": {"a": 2.0}}])[0]
        )
    assert list(x) == [0.0] and list(y) == [1.0]
    assert len(store.series("a")[1]) == 5000


def test_sample_events_spreads_over_the_file(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run) as writer:
        for step in range(2000):
            writer.emit("metrics", stage="policy", iteration=0, step=step, metrics={"a": step})
    sample = sample_events(run / "events.jsonl", 100)
    seqs = [event["seq"] for event in sample]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0 and seqs[-1] > 1900 and 90 <= len(seqs) <= 100


def reference_points(events: list[dict], wanted=lambda name: True) -> tuple[dict, list[float], dict]:
    """What the parser must give, written the plain way: per metric the (event index, value) of every
    number, the forward passes carried forward per event, the latest number of each metric."""
    points: dict[str, list[tuple[int, float]]] = {}
    compute, last, latest, index = [], 0.0, {}, 0
    for event in events:
        if event.get("type") not in ("metrics", "eval"):
            continue
        metrics = event["metrics"]
        if metrics.get("compute/forward_passes") is not None:
            last = float(metrics["compute/forward_passes"])
        compute.append(last)
        for name, value in metrics.items():
            latest[name] = value
            if value is not None and wanted(name):
                points.setdefault(name, []).append((index, float(value)))
        index += 1
    return points, compute, {k: v for k, v in latest.items() if v is not None}


def test_runs_of_one_layout_read_in_bulk_give_what_reading_event_by_event_gives():
    """The parser stores consecutive metrics events of one layout column by column; layouts that change
    (a metric appears, goes, the order differs), nulls, NaN and infinities, an eval between them and several
    parse calls must give the same points as the plain per-event reading."""
    rng = np.random.default_rng(1)
    layouts = [("a", "b", "compute/forward_passes"), ("b", "a", "compute/forward_passes"), ("a",), ("c", "a")]
    events, seq = [], 0
    for block in range(40):
        layout = layouts[int(rng.integers(len(layouts)))]
        for _ in range(int(rng.integers(1, 30))):
            metrics = {}
            for name in layout:
                draw = rng.random()
                value = (
                    None
                    if draw < 0.03
                    else float("nan")
                    if draw < 0.05
                    else float("inf")
                    if draw < 0.06
                    else 0.0
                )
                metrics[name] = (
                    value
                    if value != 0.0
                    else (seq * 17 if name == "compute/forward_passes" else float(rng.normal()))
                )
            events.append({"seq": seq, "type": "metrics", "global_step": seq, "metrics": metrics})
            seq += 1
        if block % 7 == 3:
            events.append(
                {"seq": seq, "type": "eval", "global_step": seq, "metrics": {"eval/gold": 0.5, "a": 9.0}}
            )
            seq += 1
        if block % 5 == 1:
            events.append({"seq": seq, "type": "checkpoint", "name": f"c{seq}"})
            seq += 1
    wanted = lambda name: name != "c"  # noqa: E731 - a metric the reader does not keep
    parser, store = SeriesParser(wanted), MetricStore()
    for start in range(0, len(events), 97):  # several calls: a run of one layout crosses them
        for batch in parser.parse(events[start : start + 97]):
            store.extend(batch)
    points, compute, latest = reference_points(events, wanted)
    assert "c" not in store.values
    for name, expected in points.items():
        index = store.index[name].view
        values = store.values[name].view
        assert [int(i) for i in index] == [i for i, _ in expected], name
        np.testing.assert_array_equal(values, np.array([v for _, v in expected]))
    np.testing.assert_array_equal(store.axes["compute"].view, np.array(compute))
    assert set(store.latest) == set(latest) and all(
        store.latest[k] == latest[k] or (np.isnan(store.latest[k]) and np.isnan(latest[k])) for k in latest
    )
    assert [e["type"] for e in store.events] == [e["type"] for e in events if e["type"] not in ("metrics",)]


def test_the_eta_after_a_pause_counts_the_steps_since_it_went_on(monkeypatch, tmp_path):
    """The TUI's ETA is from the recent polls' rate; a pause between them must not read as slow steps."""
    import zopro_tui.watched as watched_module
    from engine.rundir.reader import RunInfo
    from zopro_tui.watched import WatchedRun

    clock = [0.0]
    monkeypatch.setattr(watched_module.time, "monotonic", lambda: clock[0])
    run = WatchedRun(tmp_path)

    def poll(at: float, status: str, step: int) -> None:
        clock[0] = at
        run.apply_status(RunInfo(tmp_path, "r", status, global_step=step, total_steps=100, started=0.0))

    poll(0.0, "running", 0)
    poll(10.0, "running", 10)  # one step a second
    poll(20.0, "paused", 10)
    poll(80.0, "paused", 10)  # a minute paused
    poll(90.0, "running", 10)
    poll(100.0, "running", 20)
    assert run.steps_per_second() == 1.0
    assert run.eta() == 80.0
