"""The commands for what a run leaves: `zopro export --model`, `generate`, `plot` and `report` (the bodies;
`engine.cli.app` defines the options). Errors are one sentence and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from engine.cli.output import console, err, fail


def export_model_command(run_dir: Path, target: Path, checkpoint: str, merge: bool, reward: bool) -> None:
    from engine.export.checkpoints import ExportError
    from engine.export.model_export import export_model

    if merge and reward:
        fail("--reward writes the reward model merged into its base already; drop --merge")
    try:
        result = export_model(run_dir, target, checkpoint=checkpoint, merge=merge, reward=reward)
    except ExportError as error:
        fail(str(error))
    what = {"adapter": "policy adapter", "merged": "merged policy", "reward": "reward model"}[result.kind]
    console.print(
        f"wrote the {what} of {escape(result.checkpoint)} to {escape(str(result.path))}", soft_wrap=True
    )
    for note in result.notes:
        err.print(f"note: {escape(note)}", soft_wrap=True)


def generate_command(
    run_dir: Path,
    checkpoint: str,
    compare: str | None,
    prompt: list[str] | None,
    prompts_file: Path | None,
    seed: int | None,
    temperature: float | None,
    as_json: bool,
) -> None:
    from rich.table import Table

    from engine.export.checkpoints import ExportError
    from engine.export.generation import generate, read_prompts

    if prompt and prompts_file is not None:
        fail("give --prompt or --prompts FILE, not both")
    names = [n.strip() for n in compare.split(",") if n.strip()] if compare else [checkpoint]
    if not names:
        fail("--compare takes checkpoint names separated by commas, e.g. sft,iter-0,latest")
    if temperature is not None and temperature <= 0:
        fail(f"--temperature {temperature} is not accepted; it must be above 0")
    try:
        texts = read_prompts(prompts_file) if prompts_file is not None else (list(prompt) if prompt else None)
        result = generate(run_dir, names, texts, seed=seed, temperature=temperature)
    except ExportError as error:
        fail(str(error))
    if as_json:
        print(json.dumps(result.to_json(), indent=1))
        return
    table = Table(
        title=f"{result.run}: seed {result.seed}, temperature {result.temperature:g}, "
        f"scored by the reward model of {result.reward_checkpoint}",
        title_justify="left",
        header_style="bold",
        show_lines=False,
    )
    gold = any(row["gold"] is not None for rows in result.answers.values() for row in rows)
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("answer", ratio=1)
    table.add_column("reward", justify="right", no_wrap=True)
    if gold:
        table.add_column("gold", justify="right", no_wrap=True)
    for i, text in enumerate(result.prompts):
        table.add_row(
            f"[bold]{escape(text.strip()[-200:])}[/]", "", "", *([""] if gold else []), end_section=False
        )
        for name in result.checkpoints:
            row = result.answers[name][i]
            cells = [
                escape(name),
                escape(row["response"]) + ("" if row["finished"] else " …"),
                f"{row['reward']:.3f}",
            ]
            if gold:
                cells.append("-" if row["gold"] is None else f"{row['gold']:.3f}")
            table.add_row(*cells, end_section=name == result.checkpoints[-1])
    for name in result.checkpoints:
        rows = result.answers[name]
        cells = [f"[dim]mean {escape(name)}[/]", "", f"{sum(r['reward'] for r in rows) / len(rows):.3f}"]
        if gold:
            values = [r["gold"] for r in rows if r["gold"] is not None]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
        table.add_row(*cells)
    console.print(table)


def plot_command(paths: list[Path], metric: str, x: str, output: Path, preset: str | None) -> None:
    from engine.export.checkpoints import ExportError
    from engine.export.figures import X_AXES, check_output, metric_figure, save_figure
    from engine.export.presets import PRESETS, preset_figure
    from engine.export.sources import labelled_runs

    if x not in X_AXES:
        fail(f"--x {x!r} is not one of: {', '.join(X_AXES)}")
    if preset is not None and preset not in PRESETS:
        fail(f"--preset {preset!r} is not one of: {', '.join(PRESETS)}")
    try:
        check_output(output)
        runs = labelled_runs(paths)
        figure = preset_figure(preset, runs) if preset else metric_figure(runs, metric, x)
        save_figure(figure, output)
    except ExportError as error:
        fail(str(error))
    console.print(
        f"wrote {escape(str(output))} ({len(runs)} run{'s' if len(runs) > 1 else ''})", soft_wrap=True
    )
    if preset == "cost":  # the gains at equal cost, per seed, beside the figure
        from engine.export.equal_cost import curves, gains_table, ratio_lines, write_table

        rows = gains_table(curves(runs))
        write_table(rows, output.with_suffix(".json"))
        for line in ratio_lines(rows):
            console.print(escape(line), soft_wrap=True)
        console.print(f"per-seed table: {escape(str(output.with_suffix('.json')))}", soft_wrap=True)


def report_command(path: Path, output: Path) -> None:
    import os

    from engine.export.checkpoints import ExportError
    from engine.export.report_content import build_document
    from engine.export.report_render import render_html, render_markdown

    suffix = output.suffix.lower()
    if suffix not in (".html", ".htm", ".md"):
        fail(f"-o {output}: write the report as .html or .md (the suffix picks the format)")
    if not output.parent.is_dir():
        fail(f"-o {output}: the folder {output.parent} does not exist")
    try:
        document = build_document(path)
    except ExportError as error:
        fail(str(error))
    text = render_markdown(document) if suffix == ".md" else render_html(document)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    figures = sum(block.kind == "figure" for block in document.blocks)
    console.print(f"wrote {escape(str(output))}: {document.title}, {figures} figures inline", soft_wrap=True)
