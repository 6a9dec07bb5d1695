"""Held-out evaluations of finished runs, one row per method and seed, and the mean over seeds: the tables
of docs/real-model.md and the README come from this script.

    PYTHONPATH=. python bench/seeds_table.py rloo=RUN_S0,RUN_S1,RUN_S2 zopro=... mezo=... [--json FILE]

Per run: gold after SFT and after each iteration (mean ± standard error over held-out prompts, as the run
logged them), the final win rate against SFT and KL, the gain over SFT with how many standard errors of the
difference it is, and the gain over the iterations after iteration 0 (`zo_gain`: what ZOPrO's
zeroth-order iterations add, its first iteration being first order). Per method: means over seeds; and the
ratio of each method's mean `zo_gain` to the first method's (the reference, e.g. rloo). Prints markdown, and
the same as JSON with --json."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_row(run_dir: Path) -> dict:
    from engine.rundir.reader import read_events

    events = read_events(run_dir)
    evals = [e["metrics"] for e in events if e.get("type") == "eval"]
    seed = next((e["recipe"]["seed"] for e in events if e.get("type") == "run_start"), None)
    if not evals:
        return {"run": str(run_dir), "seed": seed, "error": "no held-out evaluation"}
    gold = [m.get("eval/gold") for m in evals]
    last = evals[-1]
    # the standard error of the difference, the two evaluations taken as independent (conservative: they
    # share their prompts, which would only shrink it)
    se = ((last.get("eval/gold_se") or 0.0) ** 2 + (evals[0].get("eval/gold_se") or 0.0) ** 2) ** 0.5
    return {
        "run": str(run_dir),
        "seed": seed,
        "gold": gold,
        "gold_se": [m.get("eval/gold_se") for m in evals],
        "win_vs_sft": last.get("eval/win_rate_vs_sft"),
        "win_vs_sft_se": last.get("eval/win_rate_vs_sft_se"),
        "kl": last.get("eval/kl"),
        "gain_over_sft": round(gold[-1] - gold[0], 4),
        "gain_in_se": round((gold[-1] - gold[0]) / se, 1) if se else None,
        "zo_gain": round(gold[-1] - gold[1], 4) if len(gold) > 2 else None,
        "iterations_done": len(gold) - 1,
    }


def table(groups: dict[str, list[Path]]) -> dict:
    methods = {}
    for method, runs in groups.items():
        rows = [run_row(run) for run in runs]
        good = [r for r in rows if "error" not in r]

        def mean(key: str, rows: list[dict] = good) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return round(statistics.mean(values), 4) if values else None

        methods[method] = {
            "rows": rows,
            "mean_final_gold": round(statistics.mean(r["gold"][-1] for r in good), 4) if good else None,
            "mean_sft_gold": round(statistics.mean(r["gold"][0] for r in good), 4) if good else None,
            "mean_gain_over_sft": mean("gain_over_sft"),
            "mean_zo_gain": mean("zo_gain"),
            "mean_win_vs_sft": mean("win_vs_sft"),
            "mean_kl": mean("kl"),
        }
    reference = next(iter(methods.values()), {}).get("mean_zo_gain")
    for summary in methods.values():
        ratio = (
            summary["mean_zo_gain"] / reference if reference and summary["mean_zo_gain"] is not None else None
        )
        summary["zo_gain_x_reference"] = round(ratio, 2) if ratio is not None else None
    return {"methods": methods}


def fmt(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}".replace("0.", ".", 1) if abs(value) < 1 else f"{value:.2f}"
    return f"{text} ± {se:.3f}".replace("± 0.", "± .") if se is not None else text


def signed(value: float | None) -> str:
    return "-" if value is None else ("+" if value >= 0 else "") + fmt(value)


def markdown(report: dict) -> str:
    lines = [
        "| method | seed | SFT gold | final gold | win vs SFT | KL | gain over SFT (in SEs of the difference) | gain after iteration 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, summary in report["methods"].items():
        for r in summary["rows"]:
            if "error" in r:
                lines.append(f"| {method} | {r['seed']} | {r['error']} |||||||")
                continue
            lines.append(
                f"| {method} | {r['seed']} | {fmt(r['gold'][0], r['gold_se'][0])} | "
                f"{fmt(r['gold'][-1], r['gold_se'][-1])} | {fmt(r['win_vs_sft'], r['win_vs_sft_se'])} | "
                f"{fmt(r['kl'])} | {signed(r['gain_over_sft'])} ({r['gain_in_se']}) | {fmt(r['zo_gain'])} |"
            )
        lines.append(
            f"| **{method}, mean** | | {fmt(summary['mean_sft_gold'])} | {fmt(summary['mean_final_gold'])} | "
            f"{fmt(summary['mean_win_vs_sft'])} | {fmt(summary['mean_kl'])} | {signed(summary['mean_gain_over_sft'])} | "
            f"{fmt(summary['mean_zo_gain'])} ({summary['zo_gain_x_reference']} x) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", metavar="METHOD=RUN,RUN,...")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    groups = {}
    for group in args.groups:
        method, _, runs = group.partition("=")
        if not runs:
            parser.error(f"{group!r}: write METHOD=RUN_DIR,RUN_DIR,...")
        groups[method] = [Path(run) for run in runs.split(",") if run]
    missing = [str(run) for runs in groups.values() for run in runs if not (run / "events.jsonl").is_file()]
    if missing:
        parser.error(f"not a run directory (no events.jsonl): {', '.join(missing)}")
    report = table(groups)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
