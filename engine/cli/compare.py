"""Comparing methods: run several methods of one recipe one after another into sibling run directories
(same seed, same data), and the table that sets them side by side."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from engine.cli.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from engine.export.sources import (
    COMPARISON_JSON,
)  # the table's rows, standard errors included, beside the runs
from engine.recipe import RecipeError, load_recipe, split_variant, variant_label
from engine.rundir.files import atomic_write_text
from engine.rundir.report import comparison_row, fmt_duration, fmt_value, fmt_with_se, warnings_cell
from engine.rundir.writer import stamped_folder


def comparison_table(rows: list[dict], title: str = "comparison") -> Table:
    table = Table(title=title, header_style="bold", title_justify="left")
    columns = (
        "method",
        "final gold",
        "win vs SFT",
        "fixed-RM score",  # the reward model of the reward stage, the same for every method of a seed
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
            fmt_value(row.get("fixed_rm_score")),
            fmt_value(row["kl"]),
            fmt_duration(row["wall_time_s"]),
            fmt_value(row["policy_forward_passes"]),
            fmt_value(row["peak_update_mem_mib"], 1),
            Text(warnings_cell(row.get("warnings") or []), style="bold yellow"),
        )
    return table


def same_stages(mine, theirs) -> bool:
    """Whether two recipes train the same SFT and reward models (so one run's can serve the other)."""
    from engine.training.shared_stages import stages_difference

    return stages_difference(mine.to_dict(), theirs.to_dict()) is None


def run_comparison(
    recipe_path: Path,
    methods: list[str],
    overrides: list[str],
    *,
    root: Path,
    quiet: bool,
    console: Console,
    err: Console,
    share_stages: bool = True,
) -> int:
    """Validate every sibling recipe first (bad input creates nothing), then run them in turn. With
    `share_stages`, a method whose SFT and reward settings match an earlier one's takes that run's SFT and
    reward models (engine.training.shared_stages) instead of training the same ones again."""
    from engine.cli.runner import run_training

    labels = [variant_label(entry) for entry in methods]
    twice = next(
        (entry for entry, label in zip(methods, labels, strict=True) if labels.count(label) > 1), None
    )
    if twice is not None:
        err.print(
            f"[bold red]error:[/] --methods names {escape(twice)} twice; list each method (or variant) once",
            soft_wrap=True,
        )
        return EXIT_BAD_INPUT
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
    try:
        folder = stamped_folder(root, f"{name}-compare", reserve=True)  # two comparisons never share one
    except OSError as error:
        err.print(
            f"[bold red]error:[/] --root {escape(str(root))} cannot hold a comparison ({error.strerror})"
        )
        return EXIT_BAD_INPUT
    dirs = []
    for entry in methods:
        run_dir = folder / variant_label(entry)
        source = next(
            (d for d, done in dirs if share_stages and same_stages(recipes[entry], recipes[done])), None
        )
        console.print(
            f"[bold]{escape(entry)}[/] -> {run_dir}"
            + (f"  (SFT and reward model from {escape(source.name)})" if source is not None else "")
        )
        code = run_training(
            recipe_path,
            settings[entry],
            run_dir=run_dir,
            resume=False,
            quiet=quiet,
            console=console,
            err=err,
            stages_from=source,
        )
        dirs.append((run_dir, entry))
        if code != EXIT_OK:
            err.print(f"{entry} ended with exit code {code}; the comparison stops here")
            return code
    rows = [comparison_row(d, label) for d, label in dirs]
    console.print(comparison_table(rows, "comparison (final held-out evaluation)"))
    atomic_write_text(folder / COMPARISON_JSON, json.dumps(rows, indent=1) + "\n")
    console.print(f"runs in {folder}; the table as JSON in {folder / COMPARISON_JSON}", soft_wrap=True)
    return EXIT_OK
