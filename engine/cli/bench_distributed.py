"""`zopro bench distributed`: what a policy update communicates, and how long it takes, for a first-order
method (rloo: one all-reduce of the adapter's gradients) and a zeroth-order one (zopro: q scalars), with one
process and with N (torchrun, gloo on CPU or NCCL on GPUs). Every point is a real `zopro run` of a short
recipe; the figures are read back from its events (`dist/update_bytes`, `time/policy_update_s`, the
update's full step `time/update_s`), over the updates of iteration 1 (zopro's first zeroth-order one)."""

from __future__ import annotations

import statistics
import subprocess
import tempfile
from pathlib import Path

from engine.jobs.command import run_command
from engine.rundir.reader import apply_rewinds, read_events

SHORT = [
    "sft.steps=20",
    "reward.steps=20",
    "train.iterations=2",
    "eval.samples_per_prompt=1",
    "task.eval_prompts=8",
    "refine.epochs=1",
]


def bench_point(recipe: Path, method: str, nproc: int, updates: int, sets: list[str], folder: Path) -> dict:
    run_dir = folder / f"{method}-{nproc}"
    overrides = [f"policy.method={method}", f"train.updates_per_iteration={updates}", *SHORT, *sets]
    command = run_command(recipe, run_dir=run_dir, overrides=overrides, nproc=nproc, isolated=False)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"method": method, "ranks": nproc, "error": " | ".join(tail)}
    rows = [
        e["metrics"]
        for e in apply_rewinds(read_events(run_dir))
        if e.get("type") == "metrics" and e.get("stage") == "policy" and e.get("iteration") == 1
    ]
    update_s = [m["time/policy_update_s"] for m in rows if "time/policy_update_s" in m]
    step_s = [m["time/update_s"] for m in rows if "time/update_s" in m]
    sent = [m.get("dist/update_bytes", 0.0) for m in rows]
    return {
        "method": method,
        "ranks": nproc,
        "updates": len(rows),
        "update_s_median": round(statistics.median(update_s), 4) if update_s else None,
        "step_s_median": round(statistics.median(step_s), 4) if step_s else None,
        "bytes_per_update": round(statistics.mean(sent), 1) if sent else 0.0,
        "zeroth_order": bool(rows and rows[-1].get("zo/first_order") == 0.0),
    }


def run_distributed_bench(
    recipe: Path,
    methods: list[str],
    ranks: list[int],
    updates: int,
    sets: list[str],
    keep: Path | None = None,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="zopro-bench-dist-") as tmp:
        folder = keep or Path(tmp)
        points = [bench_point(recipe, m, n, updates, sets, folder) for m in methods for n in ranks]
    report: dict = {"recipe": str(recipe), "overrides": SHORT + sets, "points": points}
    by = {(p["method"], p["ranks"]): p for p in points if "error" not in p}
    top = max(ranks)
    if ("rloo", top) in by and ("zopro", top) in by and by[("zopro", top)]["bytes_per_update"]:
        report["bytes_first_order_over_zeroth_order"] = round(
            by[("rloo", top)]["bytes_per_update"] / by[("zopro", top)]["bytes_per_update"], 1
        )
    return report
