"""A run's held-out results as plain rows, read from events.jsonl: what the model card, the report and the
figures show."""

from __future__ import annotations

from pathlib import Path

from engine.rundir.reader import read_events
from engine.rundir.wording import FIXED_RM_METRIC, short_iteration

EVAL_COLUMNS = (
    ("gold", "eval/gold"),
    ("win vs SFT", "eval/win_rate_vs_sft"),
    ("fixed RM", FIXED_RM_METRIC),
    ("RM score", "eval/reward"),
    ("KL", "eval/kl"),
    ("length", "eval/response_length"),
)


def evaluation_rows(run_dir: Path, problems: list[str] | None = None) -> list[dict]:
    """One row per held-out evaluation, in order: label (SFT, it 1, ...: counted from 1, as everywhere),
    iteration, elapsed, forward passes, global step and the eval/* metrics (with their standard errors)."""
    rows = []
    for event in read_events(run_dir, problems):
        if event.get("type") != "eval":
            continue
        metrics = event.get("metrics") or {}
        iteration = event.get("iteration")
        rows.append(
            {
                "label": "SFT" if iteration is None else short_iteration(iteration),
                "iteration": iteration,
                "elapsed": event.get("elapsed"),
                "global_step": event.get("global_step"),
                "forward_passes": metrics.get("compute/forward_passes"),
                **{k: v for k, v in metrics.items() if k.startswith("eval/")},
            }
        )
    return rows


def score_text(row: dict, key: str, digits: int = 3) -> str:
    """`0.468 ± 0.012`, `0.468` without a standard error, `-` without a value."""
    value, se = row.get(key), row.get(f"{key}_se")
    if not isinstance(value, (int, float)):
        return "-"
    if isinstance(se, (int, float)) and se == se:
        return f"{value:.{digits}f} ± {se:.{digits}f}"
    return f"{value:.{digits}f}"


def results_markdown(rows: list[dict]) -> str:
    """The held-out results as a Markdown table (empty when the run has none)."""
    if not rows:
        return ""
    lines = ["| | " + " | ".join(name for name, _ in EVAL_COLUMNS) + " |"]
    lines.append("|---" * (len(EVAL_COLUMNS) + 1) + "|")
    for row in rows:
        lines.append(
            f"| {row['label']} | " + " | ".join(score_text(row, key) for _, key in EVAL_COLUMNS) + " |"
        )
    return "\n".join(lines)
