"""`zopro report`: one run, a sweep or a comparison as a document: the recipe, the per-iteration table, the
curves with their standard errors, the interplay figures, answers side by side, hardware and warnings."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from engine.export.checkpoints import ExportError
from engine.export.figures import draw_metric, legend, new_figure, paper_style, png_bytes
from engine.export.presets import compute_figure, interplay_figure, interplay_reports
from engine.export.report_document import Document
from engine.export.results import evaluation_rows, score_text
from engine.export.sources import LabelledRun, is_comparison_dir, labelled_runs
from engine.jobs.sweep import SWEEP_RECIPE, is_sweep_dir, load_sweep
from engine.rundir.answers import evaluation_answers, side_by_side
from engine.rundir.reader import MAX_RECIPE_BYTES, is_run_dir, read_events, run_info, run_meta
from engine.rundir.report import fmt_duration
from engine.rundir.safe_io import read_plain
from engine.rundir.wording import FIXED_RM_METRIC, RM_NOTE, iteration_text, plural

ITERATION_COLUMNS = [
    "",
    "gold",
    "win vs SFT",
    "fixed RM",
    "RM score",
    "KL",
    "length",
    "forward passes",
    "elapsed",
]
SCORES_CAPTION = f"mean ± standard error over prompts; {RM_NOTE}"
META_FIELDS = ("device", "host", "python", "torch", "transformers", "peft", "zopro")


def build_document(path: Path) -> Document:
    """The report of a run, a sweep or a comparison directory."""
    path = Path(path)
    runs = labelled_runs([path])
    if path.is_dir() and is_run_dir(path):
        document = Document(f"{path.name}: {runs[0].method}")
        run_section(document, runs[0])
    elif is_sweep_dir(path):
        document = Document(f"sweep {path.name}")
        sweep_section(document, path, runs)
    elif is_comparison_dir(path):
        document = Document(f"comparison {path.name}: {', '.join(r.label for r in runs)}")
        comparison_section(document, runs)
    else:  # labelled_runs has refused it already
        raise ExportError(f"{path} is not a run, sweep or comparison directory")
    return document


def run_section(document: Document, run: LabelledRun) -> None:
    info = run_info(run.path)
    recipe_text = _read(run.path / "recipe.toml")
    document.paragraph(
        f"{info.status}, {plural(info.iterations, 'iteration') if info.iterations else '? iterations'}, "
        f"elapsed {fmt_duration(info.elapsed)}; base {base_text(recipe_text, run_meta(run.path).get('base'))}"
    )
    warnings_section(document, [run])
    document.heading("Held-out evaluation, per iteration")
    rows = evaluation_rows(run.path)
    document.table(ITERATION_COLUMNS, [iteration_row(row) for row in rows], SCORES_CAPTION)
    curves_section(document, [run])
    interplay_section(document, [run])
    document.heading("Answers: SFT and the last evaluation, same prompts and noise")
    answers = evaluation_answers(run.path)
    if len(answers) >= 2:
        first, last = list(answers)[0], list(answers)[-1]
        document.table(
            ["prompt", f"{first}", "RM", "gold", f"{last}", "RM", "gold"],
            [
                [prompt, *_answer(one), *_answer(other)]
                for prompt, one, other in side_by_side(answers[first], answers[last])
            ],
            "RM: each answer's score under the reward model as refined at that evaluation, so the same answer "
            "can score differently in the two columns; gold: the task's own scorer",
        )
    else:
        document.paragraph("The run has not logged two evaluations' answers yet.")
    hardware_section(document, [run])
    document.heading("Recipe")
    document.preformatted(recipe_text, "recipe.toml (fully resolved)")


def sweep_section(document: Document, path: Path, runs: list[LabelledRun]) -> None:
    sweep = load_sweep(path)
    document.paragraph(f"grid: {json.dumps(sweep.grid)}; {len(runs)} of {len(sweep.points)} points run")
    runs_sections(document, runs, "Final held-out evaluation, per point")
    document.preformatted(_read(path / SWEEP_RECIPE), "the swept recipe (each point sets the grid's keys)")


def runs_sections(document: Document, runs: list[LabelledRun], final_title: str) -> None:
    """What a sweep's and a comparison's pages share, up to the recipe's heading."""
    warnings_section(document, runs)
    final_table(document, runs, final_title)
    iterations_by_run(document, runs)
    curves_section(document, runs)
    interplay_section(document, runs)
    answers_by_run(document, runs)
    hardware_section(document, runs[:1])
    document.heading("Recipe")


def comparison_section(document: Document, runs: list[LabelledRun]) -> None:
    document.paragraph("The same recipe, seed and data for every method; only the policy update differs.")
    runs_sections(document, runs, "Final held-out evaluation, per method")
    document.preformatted(_read(runs[0].path / "recipe.toml"), f"recipe.toml of {runs[0].label}")


def iteration_row(row: dict) -> list[str]:
    return [
        row["label"],
        score_text(row, "eval/gold"),
        score_text(row, "eval/win_rate_vs_sft"),
        score_text(row, FIXED_RM_METRIC),
        score_text(row, "eval/reward"),
        score_text(row, "eval/kl"),
        score_text(row, "eval/response_length", 1),
        "-" if row.get("forward_passes") is None else f"{row['forward_passes']:,}",
        fmt_duration(row.get("elapsed")),
    ]


def final_table(document: Document, runs: list[LabelledRun], title: str) -> None:
    document.heading(title)
    table = []
    for run in runs:
        rows = evaluation_rows(run.path)
        last = rows[-1] if rows else {"label": "-"}
        table.append([run.label, run.method, run_info(run.path).status, *iteration_row(last)[1:]])
    document.table(
        ["", "method", "status", *ITERATION_COLUMNS[1:]], table, f"the last evaluation of each run; {RM_NOTE}"
    )


def iterations_by_run(document: Document, runs: list[LabelledRun]) -> None:
    document.heading("Held-out evaluation, per iteration")
    table = [[run.label, *iteration_row(row)] for run in runs for row in evaluation_rows(run.path)]
    document.table(["run", *ITERATION_COLUMNS], table, SCORES_CAPTION)


def curves_section(document: Document, runs: list[LabelledRun]) -> None:
    document.heading("Curves")
    events = {run.path: read_events(run.path) for run in runs}
    for metrics, x, caption in (
        (("eval/gold", "eval/reward"), "step", "held-out gold and reward-model score against step (± s.e.)"),
        (
            ("eval/kl", "objective/scores"),
            "step",
            "KL from the SFT policy (held-out) and the training reward",
        ),
    ):
        with paper_style():
            figure, panels = new_figure(columns=2)
            drawn = [
                draw_metric(axes, runs, metric, x, events)
                for axes, metric in zip(panels, metrics, strict=True)
            ]
            legend(panels[0], runs)
        if any(drawn):
            document.figure(png_bytes(figure), caption)
    try:
        document.figure(png_bytes(compute_figure(runs)), "reward and gold against forward passes (compute)")
    except ExportError as error:
        document.paragraph(str(error))


def interplay_section(document: Document, runs: list[LabelledRun]) -> None:
    document.heading("Policy-reward interplay")
    try:
        reports = interplay_reports(runs)
    except ExportError as error:
        document.paragraph(str(error))
        return
    document.figure(
        png_bytes(interplay_figure(runs, reports)),
        "angle between the policy's and the reward model's updates per iteration, the cosine of successive "
        "updates, and both adapters' trajectories (the star marks the start)",
    )
    rows = []
    for run, report in reports:
        summary = report["summary"]
        rows.append(
            [
                run.label,
                _number(summary["mean_angle_policy_reward_deg"], "{:.1f}"),
                _number(summary["mean_cos_policy_successive"], "{:.3f}"),
                _number(summary["mean_cos_reward_successive"], "{:.3f}"),
                _number(report["procrustes_disparity"], "{:.3f}"),
            ]
        )
    document.table(
        ["", "mean angle (deg)", "policy successive cos", "reward successive cos", "Procrustes disparity"],
        rows,
    )


def answers_by_run(document: Document, runs: list[LabelledRun]) -> None:
    document.heading("Answers of each run's last evaluation (same prompts and noise)")
    finals = []
    for run in runs:
        answers = evaluation_answers(run.path)
        finals.append(answers[list(answers)[-1]] if answers else [])
    prompts = [row.get("prompt", "") for row in max(finals, key=len)]
    table = []
    for i, prompt in enumerate(prompts):
        cells = [str(prompt)]
        for rows in finals:
            row = rows[i] if i < len(rows) and rows[i].get("prompt") == prompt else None
            cells.append(
                "-" if row is None else f"{row.get('response', '')} ({_number(row.get('gold'), '{:.2f}')})"
            )
        table.append(cells)
    document.table(["prompt", *[run.label for run in runs]], table, "answer (gold score)")


def warnings_section(document: Document, runs: list[LabelledRun]) -> None:
    document.heading("Warnings")
    items = []
    for run in runs:
        for event in read_events(run.path):
            if event.get("type") == "warning":
                where = iteration_text(event.get("iteration")) or event.get("stage")
                prefix = f"{run.label}: " if len(runs) > 1 else ""
                items.append(f"{prefix}[{event.get('code', '?')}] {where}: {event.get('message', '')}")
        info = run_info(run.path)
        if info.error:
            items.append(f"{run.label}: {info.status}: {info.error}")
    document.warnings(items)


def hardware_section(document: Document, runs: list[LabelledRun]) -> None:
    document.heading("Hardware and software")
    for run in runs:
        meta = run_meta(run.path)
        peaks: dict[str, float] = {}
        for event in read_events(run.path):
            for key, value in (event.get("metrics") or {}).items():
                if key.startswith("mem/") and "peak" in key and isinstance(value, (int, float)):
                    peaks[key] = max(peaks.get(key, 0.0), float(value))
        rows = [[field, str(meta[field])] for field in META_FIELDS if meta.get(field) is not None]
        rows += [[key, f"{value:,.0f} MiB"] for key, value in sorted(peaks.items())]
        document.table(["", run.label], rows)


def _answer(row: dict | None) -> list[str]:
    if row is None:
        return ["-", "", ""]
    return [
        str(row.get("response", "")),
        _number(row.get("score"), "{:.3f}"),
        _number(row.get("gold"), "{:.2f}"),
    ]


def _number(value, spec: str) -> str:
    return spec.format(value) if isinstance(value, (int, float)) else "-"


def base_text(recipe_text: str, resolved: object) -> str:
    """The base as the recipe names it, with the folder it resolved to when that differs (a built-in base
    built into the cache, a GGUF file dequantised there)."""
    try:
        named = tomllib.loads(recipe_text).get("model", {}).get("base")
    except (tomllib.TOMLDecodeError, AttributeError):
        named = None
    if not isinstance(named, str):
        return str(resolved or "?")
    return named if not resolved or resolved == named else f"{named} ({resolved})"


def _read(path: Path) -> str:
    """A recipe copy in a run or sweep folder: a plain file, through no link, without blocking."""
    try:
        return read_plain(path, MAX_RECIPE_BYTES).decode()
    except (OSError, UnicodeDecodeError):
        return f"({path.name} cannot be read)"
