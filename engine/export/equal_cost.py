"""Gold at equal cost (`zopro plot --preset cost`): held-out gold against the policy stage's forward passes,
against the tokens those passes ran (a pass of row probes that runs several rounds together carries that
many copies of the batch: `zopro.rounds_per_pass`) and against the wall time of its whole steps (rollout +
update, `time/update_s`), one curve per method with
the mean over seeds and its standard error, and the table a user decides with: per seed, each method's
gold gain over the iterations after the first, at the end and at equal cost with the baseline (rloo).

Runs are grouped by their label with a trailing seed marker removed ("zopro-s3", "zopro seed=3" -> "zopro";
in a comparison folder the label is the method or variant already), and paired with the baseline by seed.
Cost is counted from the end of iteration `FROM_ITERATION` (0: zopro's first-order iteration, which zopro
and rloo share, is left out, as in the README's zeroth-order figures). At equal cost B = the smaller of
the two runs' costs, each run's gain is read off its gold curve, linear between evaluations."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.export.checkpoints import ExportError
from engine.export.sources import LabelledRun
from engine.rundir.reader import read_events, run_meta

FROM_ITERATION = 0
BASELINE = "rloo"
AXES = {
    "passes": "policy forward passes",
    "tokens": "tokens through the policy's forward passes",
    "wall": "wall time of whole policy steps (s)",
}
SEED_SUFFIX = re.compile(r"[-_ ,]*(?:seed[-=_ ]?|s)\d+$")


@dataclass
class Curve:
    """One run's held-out gold after each iteration, with the policy stage's cost up to there."""

    label: str
    seed: int | None
    gold: list[float] = field(default_factory=list)  # index 0: before the policy stage (after the RM)
    se: list[float] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)  # cumulative, from the start of the policy stage
    wall: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)

    def gain(self, axis: str | None = None, budget: float | None = None) -> float:
        """Gold gain after iteration FROM_ITERATION: at the end, or at `budget` of `axis` spent after it."""
        start = FROM_ITERATION + 1
        base = self.gold[start]
        if axis is None or budget is None:
            return self.gold[-1] - base
        xs = [x - getattr(self, axis)[start] for x in getattr(self, axis)[start:]]
        return _interpolate(xs, self.gold[start:], budget) - base

    def spent(self, axis: str) -> float:
        values = getattr(self, axis)
        return values[-1] - values[FROM_ITERATION + 1]


def group_key(run: LabelledRun) -> str:
    return SEED_SUFFIX.sub("", run.label) or run.method


def run_curve(run: LabelledRun) -> Curve:
    """The run's gold at each evaluation and the policy stage's cost so far (ExportError if unfinished)."""
    seed = run_meta(run.path).get("seed")
    curve = Curve(group_key(run), seed if isinstance(seed, int) else None)
    passes = wall = tokens = 0.0
    for event in read_events(run.path):
        metrics = event.get("metrics") or {}
        if event.get("type") == "metrics" and event.get("stage") == "policy" and "time/update_s" in metrics:
            passes = float(metrics.get("compute/stage_forward_passes", passes))
            tokens = float(metrics.get("compute/stage_tokens", tokens))
            wall += float(metrics["time/update_s"])
        elif event.get("type") == "eval" and isinstance(metrics.get("eval/gold"), (int, float)):
            curve.gold.append(float(metrics["eval/gold"]))
            curve.se.append(float(metrics.get("eval/gold_se") or 0.0))
            curve.passes.append(passes)
            curve.wall.append(wall)
            curve.tokens.append(tokens)
    if len(curve.gold) < FROM_ITERATION + 3:
        raise ExportError(f"{run.path} has {len(curve.gold)} held-out evaluations; the cost figure needs a run "
                          f"evaluated after at least {FROM_ITERATION + 2} iterations")  # fmt: skip
    return curve


def curves(runs: list[LabelledRun]) -> dict[str, list[Curve]]:
    grouped: dict[str, list[Curve]] = {}
    for run in runs:
        curve = run_curve(run)
        grouped.setdefault(curve.label, []).append(curve)
    return grouped


def gains_table(grouped: dict[str, list[Curve]], baseline: str = BASELINE) -> list[dict]:
    """Per method and seed: the gain over the iterations after FROM_ITERATION, and at equal passes, equal
    tokens and equal whole-step wall time with the baseline run of the same seed (with the baseline's gain
    there)."""
    base = {c.seed: c for c in grouped.get(baseline, [])}
    rows = []
    for label, members in grouped.items():
        for curve in sorted(members, key=lambda c: (c.seed is None, c.seed)):
            row = {"method": label, "seed": curve.seed, "gain": curve.gain(), "se": curve.se[-1]}
            row.update({f"spent_{axis}": curve.spent(axis) for axis in AXES})
            other = base.get(curve.seed)
            if other is not None:
                row["baseline_gain"] = other.gain()
                for axis in AXES:
                    budget = min(curve.spent(axis), other.spent(axis))
                    row[f"gain_at_{axis}"] = curve.gain(axis, budget)
                    row[f"baseline_gain_at_{axis}"] = other.gain(axis, budget)
            rows.append(row)
    return rows


def ratio_lines(rows: list[dict], baseline: str = BASELINE) -> list[str]:
    """One line per method: the ratio of mean gains to the baseline's, over the iterations and at equal cost,
    and the per-seed gains (the README's measure: mean gain / mean baseline gain over the same seeds)."""
    lines = []
    for method in dict.fromkeys(row["method"] for row in rows):
        paired = [r for r in rows if r["method"] == method and "baseline_gain" in r]
        if method == baseline or not paired:
            continue
        parts = [f"{method} ({len(paired)} seeds)"]
        for key, name in (
            ("", "over the iterations"),
            ("_at_passes", "equal passes"),
            ("_at_tokens", "equal tokens"),
            ("_at_wall", "equal wall"),
        ):
            ours = _mean([r[f"gain{key}"] for r in paired])
            theirs = _mean([r[f"baseline_gain{key}"] for r in paired])
            parts.append(f"{name} {ours:+.3f} vs {theirs:+.3f} = {ours / theirs:.2f} x" if theirs else name)
        seeds = " ".join(f"s{r['seed']} {r['gain']:+.3f}/{r['baseline_gain']:+.3f}" for r in paired)
        lines.append("; ".join(parts) + f"; per seed (gain/{baseline}): {seeds}")
    return lines


def equal_cost_figure(runs: list[LabelledRun]):
    """Mean gold (+- the standard error over seeds) against mean passes, tokens and whole-step wall time."""
    from matplotlib.ticker import FuncFormatter

    from engine.export.figures import PALETTE, line_style, new_figure, paper_style

    grouped = curves(runs)
    methods = {group_key(run): run.method for run in runs}
    with paper_style():
        figure, panels = new_figure(columns=len(AXES))
        for index, (label, members) in enumerate(grouped.items()):
            points = min(len(c.gold) for c in members)
            gold = [_mean([c.gold[i] for c in members]) for i in range(points)]
            spread = [_se([c.gold[i] for c in members]) for i in range(points)]
            for axes, axis in zip(panels, AXES, strict=True):
                xs = [_mean([getattr(c, axis)[i] for c in members]) for i in range(points)]
                axes.errorbar(
                    xs, gold, yerr=spread, label=f"{label} (n={len(members)})", color=PALETTE[index % len(PALETTE)],
                    linestyle=line_style(methods.get(label, label)), marker="o", capsize=2, elinewidth=0.8,
                )  # fmt: skip
                axes.set_xlabel(AXES[axis])
                if axis == "tokens":  # 350000 and its neighbours would run into each other
                    axes.xaxis.set_major_formatter(FuncFormatter(_thousands))
                axes.set_ylabel("gold score (held-out), mean over seeds")
        handles, labels = panels[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    return figure


def _thousands(value: float, _position: int) -> str:
    return f"{value / 1000:g}k" if value else "0"


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _se(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def write_table(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")
