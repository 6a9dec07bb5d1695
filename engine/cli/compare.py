"""Comparing methods: run several methods of one recipe one after another into sibling run directories
(same seed, same data), and the table that sets them side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from engine.cli.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from engine.recipe import RecipeError, load_recipe, split_variant, variant_label
from engine.rundir.reader import read_events, run_info
from engine.rundir.report import fmt_duration, fmt_value, fmt_with_se

COMPARISON_JSON = "comparison.json"  # the table's rows, standard errors included, beside the runs


def comparison_row(run_dir: Path, label: str | None = None) -> dict:
    """Final held-out scores (with their standard errors where the run logged them: None otherwise) and the
    cost of one run: what the compare table and screen show. `label` names the method (or variant)."""
    events = read_events(run_dir)
    evals = [e["metrics"] for e in events if e.get("type") == "eval"]
    metrics = [e for e in events if e.get("type") == "metrics"]
    policy = [e["metrics"] for e in metrics if e.get("stage") == "policy"]
    last = evals[-1] if evals else {}
    update_peaks = [m["mem/update_peak_mib"] for m in policy if m.get("mem/update_peak_mib") is not None]
    update_times = sorted(
        m["time/policy_update_s"] for m in policy if m.get("time/policy_update_s") is not None
    )
    info = run_info(run_dir)
    return {
        "run": run_dir.name,
        "method": label or info.method,
        "status": info.status,
        "sft_gold": evals[0].get("eval/gold") if evals else None,
        "final_gold": last.get("eval/gold"),
        "final_gold_se": last.get("eval/gold_se"),
        "win_rate_vs_sft": last.get("eval/win_rate_vs_sft"),
        "win_rate_vs_sft_se": last.get("eval/win_rate_vs_sft_se"),
        "reward_score": last.get("eval/reward"),
        "reward_score_se": last.get("eval/reward_se"),
        "kl": last.get("eval/kl"),
        "kl_se": last.get("eval/kl_se"),
        "wall_time_s": events[-1].get("elapsed") if events else None,
        "forward_passes": (metrics[-1]["metrics"].get("compute/forward_passes") if metrics else None),
        "policy_forward_passes": _policy_forward_passes(events),
        "peak_update_mem_mib": max(update_peaks) if update_peaks else None,
        "median_update_s": update_times[len(update_times) // 2] if update_times else None,
        "warnings": [e.get("code", "?") for e in events if e.get("type") == "warning"],
    }


def _policy_forward_passes(events: list[dict]) -> int | None:
    """Forward passes spent in the policy stages (the compute axis on which methods differ)."""
    total = 0
    found = False
    for event in events:
        if event.get("type") == "stage_end" and event.get("stage") == "policy":
            total += event.get("counters", {}).get("forward_passes", 0)
            found = True
    return total if found else None


def comparison_table(rows: list[dict], title: str = "comparison") -> Table:
    table = Table(title=title, header_style="bold", title_justify="left")
    columns = (
        "method",
        "final gold",
        "win vs SFT",
        "reward score",
        "KL",
        "wall time",
        "policy fwd passes",
        "peak update mem (MiB)",
        "warnings",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"],
            fmt_with_se(row["final_gold"], row.get("final_gold_se")),
            fmt_with_se(row["win_rate_vs_sft"], row.get("win_rate_vs_sft_se")),
            fmt_value(row["reward_score"]),
            fmt_value(row["kl"]),
            fmt_duration(row["wall_time_s"]),
            fmt_value(row["policy_forward_passes"]),
            fmt_value(row["peak_update_mem_mib"], 1),
            Text(_warnings_cell(row.get("warnings") or []), style="bold yellow"),
        )
    return table


def _warnings_cell(codes: list[str]) -> str:
    """`2: kl_jump, gold_drop` (how many, and which), or `-`."""
    if not codes:
        return "-"
    return f"{len(codes)}: " + ", ".join(dict.fromkeys(codes))


def run_comparison(
    recipe_path: Path,
    methods: list[str],
    overrides: list[str],
    *,
    root: Path,
    quiet: bool,
    console: Console,
    err: Console,
) -> int:
    """Validate every sibling recipe first (bad input creates nothing), then run them in turn."""
    from engine.cli.runner import run_training

    variants = {entry: split_variant(entry) for entry in methods}
    settings = {
        entry: [*overrides, f"policy.method={method}", *own] for entry, (method, own) in variants.items()
    }
    try:
        recipes = {entry: load_recipe(recipe_path, settings[entry]) for entry in methods}
    except RecipeError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
        return EXIT_BAD_INPUT
    name = next(iter(recipes.values())).name
    folder = root / f"{name}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    dirs = []
    for entry in methods:
        run_dir = folder / variant_label(entry)
        console.print(f"[bold]{escape(entry)}[/] -> {run_dir}")
        code = run_training(
            recipe_path, settings[entry], run_dir=run_dir, resume=False, quiet=quiet, console=console, err=err
        )
        dirs.append((run_dir, entry))
        if code != EXIT_OK:
            err.print(f"{entry} ended with exit code {code}; the comparison stops here")
            return code
    rows = [comparison_row(d, label) for d, label in dirs]
    console.print(comparison_table(rows, "comparison (final held-out evaluation)"))
    (folder / COMPARISON_JSON).write_text(json.dumps(rows, indent=1) + "\n")
    console.print(f"runs in {folder}; the table as JSON in {folder / COMPARISON_JSON}", soft_wrap=True)
    return EXIT_OK
