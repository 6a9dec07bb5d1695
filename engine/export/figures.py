"""Publication-style figures with matplotlib (no pyplot, no display): one metric of several runs against
step, wall time or compute, with error bars from the logged standard errors; PNG, SVG or PDF."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.export.checkpoints import ExportError
from engine.export.sources import X_AXES, LabelledRun, known_metrics, metric_points
from engine.recipe import ZEROTH_ORDER_METHODS

FORMATS = (".png", ".svg", ".pdf")
DODGE = 0.012  # of the x range, between runs' error bars at the same x
# Okabe and Ito's colour-blind-safe palette (black last: it reads as 'the baseline')
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "svg.hashsalt": "zopro",  # the same figure gives the same SVG
    "pdf.compression": 6,
}
METRIC_NAMES = {
    "eval/gold": "gold score (held-out)",
    "eval/reward": "reward-model score (held-out)",
    "eval/win_rate_vs_sft": "win rate vs SFT",
    "eval/kl": "KL from SFT",
    "objective/scores": "reward-model score (training)",
}


@contextmanager
def paper_style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float = 3.4, height: float = 2.4, columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def colours(runs: list[LabelledRun]) -> dict[str, str]:
    """One colour per label, in the order the runs come."""
    labels = list(dict.fromkeys(run.label for run in runs))
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def line_style(method: str) -> str:
    return "--" if method in ZEROTH_ORDER_METHODS else "-"


def draw_metric(axes, runs: list[LabelledRun], metric: str, x: str, events: dict | None = None) -> int:
    """Each run's curve of `metric` (error bars where it logged standard errors); the curves drawn."""
    palette = colours(runs)
    drawn = 0
    for index, run in enumerate(runs):
        xs, ys, ses = metric_points(run.path, metric, x, (events or {}).get(run.path))
        if not xs:
            continue
        has_se = any(se is not None for se in ses)
        if has_se and len(runs) > 1:  # dodge: runs evaluated at the same x keep their error bars apart
            shift = DODGE * (max(xs) - min(xs) or 1.0) * (index - (len(runs) - 1) / 2)
            xs = [value + shift for value in xs]
        axes.errorbar(
            xs,
            ys,
            yerr=[se or 0.0 for se in ses] if has_se else None,
            label=run.label,
            color=palette[run.label],
            linestyle=line_style(run.method),
            marker="o" if len(xs) <= 40 else None,
            capsize=2 if has_se else 0,
            elinewidth=0.8,
        )
        drawn += 1
    axes.set_xlabel(X_AXES[x][1])
    axes.set_ylabel(METRIC_NAMES.get(metric, metric))
    if x == "forward_passes":
        axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    return drawn


def legend(axes, runs: list[LabelledRun]) -> None:
    """One legend for the figure, below its panels (it never hides a curve), titled by the sweep's keys or
    'method' in a comparison; none for a single run."""
    groups = {run.group for run in runs}
    title = next(iter(groups)) if len(groups) == 1 and "" not in groups else None
    handles, labels = axes.get_legend_handles_labels()
    if len(set(labels)) > 1 or (title and labels):
        axes.figure.legend(
            handles,
            labels,
            title=title,
            title_fontsize=7,
            loc="outside lower center",
            ncols=min(len(labels), 4),
        )


def metric_figure(runs: list[LabelledRun], metric: str, x: str):
    """The figure of one metric of the runs; ExportError naming what they logged when none has it."""
    with paper_style():
        figure, (axes,) = new_figure()
        if not draw_metric(axes, runs, metric, x):
            known = known_metrics(runs)
            main = [m for m in known if m.startswith(("eval/", "objective/", "loss/"))] or known
            more = f" and {len(known) - len(main[:20])} more" if len(known) > len(main[:20]) else ""
            if not known:
                raise ExportError(f"no run logged {metric!r}; they have logged no metrics yet")
            raise ExportError(f"no run logged {metric!r}; they logged {', '.join(main[:20])}{more}")
        legend(axes, runs)
    return figure


def check_output(output: Path) -> None:
    if output.suffix.lower() not in FORMATS:
        raise ExportError(
            f"-o {output}: write a figure as {', '.join(FORMATS)} (the suffix picks the format)"
        )
    if not output.parent.is_dir():
        raise ExportError(f"-o {output}: the folder {output.parent} does not exist")


def save_figure(figure, output: Path) -> None:
    """Save under a temporary name and rename: a failed save leaves no half file."""
    import os

    check_output(output)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}{output.suffix}")
    try:
        with paper_style():
            figure.savefig(temporary, dpi=300 if output.suffix.lower() == ".png" else None)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


def png_bytes(figure, dpi: int = 150) -> bytes:
    buffer = io.BytesIO()
    with paper_style():
        figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
