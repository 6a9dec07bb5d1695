"""Benchmark (not a test): open the dashboard on a run with one million metric events, twice; time and peak memory.

    python bench/tui_open.py [--events 1000000] [--dir /tmp/zopro-bench-1m] [--size 200x60]

Generates (once, reused after) a run directory shaped like a long zeroth-order run: one `metrics` event per
update with the metrics the engine logs (objective/*, policy/*, compute/*, time/*, mem/*, zo/*), an `eval`
and the interplay metrics at the end of every iteration, a `samples` file. Then, each in a fresh process and
with an empty reader cache ($ZOPRO_CACHE in a new temporary folder), opens the app on it twice (headless, at
the given size): the first open reads the log and writes the cache, the second reads the cache. Prints JSON,
per open (`first_open`, `second_open`):

- first_render_s: from the app's start to the first full render of the dashboard (header, every visible
  panel drawn from data: a strided sample of the log on the first open, the cached history on the second);
- exact_s: until every event has been read and drawn (min/max per column over all points): the full history;
- import_s: importing the app (before the clock above starts);
- peak_rss_mib_first_render / peak_rss_mib: the process's peak RSS at those two moments;
- cache_written_s (first open): until the cache file was in place; cache_mib its size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPDATES_PER_ITERATION = 1000


def metrics_line(seq: int, step: int, iteration: int, elapsed: float, rng: random.Random) -> str:
    score = 0.3 * (1 - math.exp(-step / 2e5)) + rng.gauss(0, 0.05)
    g = rng.gauss(0, 0.2)
    spike = 5.0 if rng.random() < 1e-5 else 1.0  # rare spikes: min/max decimation must keep them
    return (
        f'{{"seq": {seq}, "type": "metrics", "time": {1.7e9 + elapsed:.4f}, "stage": "policy", '
        f'"iteration": {iteration}, "step": {step % UPDATES_PER_ITERATION + 1}, "global_step": {step}, '
        f'"elapsed": {elapsed:.3f}, "metrics": {{"objective/scores": {score * spike:.6f}, '
        f'"objective/rlhf_reward": {score - 0.01:.6f}, "objective/kl": {abs(rng.gauss(0.5, 0.1)):.6f}, '
        f'"objective/entropy": {5 + rng.random():.6f}, "objective/gold": {min(1, max(0, score + 0.1)):.6f}, '
        f'"objective/response_length": 12.0, "objective/finished": 0.9, "policy/lr": 0.001, '
        f'"policy/update": {step}, "loss/policy": {rng.gauss(0, 1):.6f}, "compute/forward_passes": {step * 17}, '
        f'"compute/backward_passes": 0, "compute/tokens": {step * 640}, "compute/stage_forward_passes": 17, '
        f'"compute/stage_tokens": 640, "time/elapsed_s": {elapsed:.3f}, "time/update_s": 0.041, '
        f'"mem/rss_mib": 612.5, "mem/peak_rss_mib": 640.1, "zo/g": {g:.6f}, "zo/abs_g": {abs(g):.6f}, '
        f'"zo/decay": {0.999 ** (step % UPDATES_PER_ITERATION):.6f}, "zo/cos_z_mu": {rng.gauss(0.3, 0.05):.6f}, '
        f'"zo/cos_z_v": {rng.gauss(-0.1, 0.05):.6f}, "zo/skipped": 0}}}}\n'
    )


def generate(run_dir: Path, events: int) -> None:
    """A finished zopro run of `events` metric events (plus per-iteration evals and interplay)."""
    marker = run_dir / ".bench-events"
    if marker.exists() and marker.read_text().strip() == str(events):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    started = time.time() - events * 0.041
    seq = 0
    with open(run_dir / "events.jsonl", "w") as out:
        out.write(
            json.dumps(
                {
                    "seq": 0,
                    "type": "run_start",
                    "time": started,
                    "stage": "policy",
                    "iteration": 0,
                    "step": 0,
                    "global_step": 0,
                    "elapsed": 0.0,
                }
            )
            + "\n"
        )
        seq = 1
        for step in range(1, events + 1):
            elapsed = step * 0.041
            iteration = (step - 1) // UPDATES_PER_ITERATION
            out.write(metrics_line(seq, step, iteration, elapsed, rng))
            seq += 1
            if step % UPDATES_PER_ITERATION == 0:
                angle = 90 - 30 * (1 - math.exp(-iteration / 200)) + rng.gauss(0, 3)
                interplay = {
                    "interplay/angle_policy_reward_deg": angle,
                    "interplay/cos_policy_reward": math.cos(math.radians(angle)),
                    "interplay/cos_policy_successive": rng.gauss(0.5, 0.1),
                    "interplay/cos_reward_successive": rng.gauss(0.4, 0.1),
                    "interplay/policy_update_norm": abs(rng.gauss(1, 0.1)),
                    "interplay/reward_update_norm": abs(rng.gauss(0.5, 0.1)),
                    "interplay/traj_policy_x": iteration * 0.01 + rng.gauss(0, 0.01),
                    "interplay/traj_policy_y": math.sin(iteration / 50),
                    "interplay/traj_reward_x": math.cos(iteration / 70),
                    "interplay/traj_reward_y": iteration * 0.005,
                }
                out.write(
                    json.dumps(
                        {
                            "seq": seq,
                            "type": "metrics",
                            "stage": "refine",
                            "iteration": iteration,
                            "step": 0,
                            "global_step": step,
                            "elapsed": elapsed,
                            "metrics": interplay,
                        }
                    )
                    + "\n"
                )
                seq += 1
                gold = 0.2 + 0.5 * (1 - math.exp(-iteration / 300)) + rng.gauss(0, 0.02)
                out.write(
                    json.dumps(
                        {
                            "seq": seq,
                            "type": "eval",
                            "stage": "eval",
                            "iteration": iteration,
                            "step": 0,
                            "global_step": step,
                            "elapsed": elapsed,
                            "metrics": {
                                "eval/gold": gold,
                                "eval/win_rate_vs_sft": gold + 0.2,
                                "eval/kl": 0.5 + iteration / 1000,
                                "eval/reward": gold,
                                "compute/forward_passes": step * 17 + 4,
                            },
                        }
                    )
                    + "\n"
                )
                seq += 1
    latest = {
        "objective/scores": 0.3,
        "eval/gold": 0.7,
        "eval/win_rate_vs_sft": 0.9,
        "compute/forward_passes": events * 17,
        "mem/peak_rss_mib": 640.1,
    }
    status = {
        "state": "finished",
        "stage": "done",
        "iteration": events // UPDATES_PER_ITERATION - 1,
        "iterations": events // UPDATES_PER_ITERATION,
        "step": 0,
        "global_step": events,
        "total_steps": events,
        "method": "zopro",
        "latest": latest,
        "pid": None,
        "started": started,
        "updated": started + events * 0.041,
    }
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "meta.json").write_text(json.dumps({"method": "zopro", "started": started, "host": "bench"}))
    (run_dir / "samples").mkdir(exist_ok=True)
    rows = [
        {
            "kind": "eval",
            "iteration": 999,
            "step": 0,
            "prompt": "how was the soup ?",
            "response": "the soup was lovely .",
            "score": 0.5,
            "gold": 0.8,
        }
    ] * 8
    (run_dir / "samples" / f"samples-{events:08d}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    marker.write_text(f"{events}\n")


MEASURE = r"""
import asyncio, json, os, resource, sys, time
started_import = time.perf_counter()
from pathlib import Path
from zopro_tui.app import ZoproApp
from zopro_tui.series_cache import cache_path
from zopro_tui.screens.dashboard import DashboardScreen
import_s = time.perf_counter() - started_import

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

async def main(run_dir, width, height, wait_cache):
    cache = cache_path(Path(run_dir) / "events.jsonl")
    t0 = time.perf_counter()
    app = ZoproApp(Path(run_dir).parent, attach=Path(run_dir))
    result = {"import_s": round(import_s, 3)}
    async with app.run_test(size=(width, height)) as pilot:
        def drawn():
            screen = app.screen
            if not isinstance(screen, DashboardScreen) or screen.run.info is None:
                return False
            curves = screen.query_one("#curves")
            return bool(curves.charts[0].data.series) and bool(screen.run.samples)
        while not drawn():
            await asyncio.sleep(0.01)
        await pilot.pause()  # that frame on screen
        result["first_render_s"] = round(time.perf_counter() - t0, 3)
        result["peak_rss_mib_first_render"] = round(peak_mib(), 1)
        result["drawn_from"] = "sample" if app.screen.run.preview is not None else "all events"
        while not app.screen.run.caught_up:
            await asyncio.sleep(0.05)
        app.screen.redraw(force=True)
        await pilot.pause()
        result["exact_s"] = round(time.perf_counter() - t0, 3)
        result["peak_rss_mib"] = round(peak_mib(), 1)
        result["metric_events_read"] = len(app.screen.run.store)
        series = app.screen.query_one("#curves").charts[0].data.series[0]
        result["max_drawn_rm_score"] = round(float(series.y.max()), 3)
        while wait_cache and not cache.exists() and time.perf_counter() - t0 < 600:
            await asyncio.sleep(0.05)
        if wait_cache:
            result["cache_written_s"] = round(time.perf_counter() - t0, 3)
        result["cache_mib"] = round(os.path.getsize(cache) / 2**20, 1) if cache.exists() else None
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "first"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/zopro-bench-1m/run"))
    parser.add_argument("--size", default="200x60")
    args = parser.parse_args()
    started = time.perf_counter()
    generate(args.dir, args.events)
    generated_s = time.perf_counter() - started
    width, height = (int(v) for v in args.size.split("x"))
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="zopro-bench-cache-") as cache:
        env = {**os.environ, "PYTHONPATH": str(REPO), "ZOPRO_CACHE": cache}
        for which in ("first", "second"):
            done = subprocess.run(
                [sys.executable, "-c", MEASURE, str(args.dir), str(width), str(height), which],
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
                timeout=1800,
            )
            if done.returncode != 0:
                sys.exit(done.stderr)
            result[f"{which}_open"] = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(
        events=args.events,
        events_file_mib=round((args.dir / "events.jsonl").stat().st_size / 2**20, 1),
        size=args.size,
        generate_s=round(generated_s, 1),
        load_average=[round(v, 2) for v in os.getloadavg()],
        cpus=os.cpu_count(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
