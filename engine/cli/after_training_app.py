"""The options of `zopro generate`, `plot` and `report` (registered on the app by `engine.cli.app`); the
bodies are in `engine.cli.after_training`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.cli.after_training import generate_command, plot_command, report_command


def generate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="iter-N, latest, sft or reward")] = "latest",
    compare: Annotated[
        str | None, typer.Option("--compare", help="several checkpoints side by side: sft,iter-0,latest")
    ] = None,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="a prompt (repeatable; default: held-out prompts)")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts", help="a file of prompts, one a line (or JSONL with prompt)")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="default: the run's seed")] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="default: the recipe's eval.temperature")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead")] = False,
) -> None:
    """Answers from one or several checkpoints to the same prompts on the same seed, with reward and gold."""
    generate_command(run_dir, checkpoint, compare, prompt, prompts_file, seed, temperature, as_json)


def plot(
    paths: Annotated[list[Path], typer.Argument(help="runs, sweeps or comparison folders")],
    output: Annotated[Path, typer.Option("--output", "-o", help="fig.png, fig.svg or fig.pdf")],
    metric: Annotated[str, typer.Option("--metric", help="a logged metric")] = "eval/gold",
    x: Annotated[str, typer.Option("--x", help="step, wall or forward_passes")] = "step",
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="a paper figure: compute, interplay or cost (instead of --metric)"),
    ] = None,
) -> None:
    """A publication figure of one metric over runs (error bars from the logged standard errors)."""
    plot_command(paths, metric, x, output, preset)


def report(
    path: Annotated[Path, typer.Argument(help="a run, a sweep or a comparison folder")],
    output: Annotated[Path, typer.Option("--output", "-o", help="report.html or report.md")],
) -> None:
    """One self-contained page: recipe, per-iteration table, curves, interplay, answers, hardware, warnings."""
    report_command(path, output)
