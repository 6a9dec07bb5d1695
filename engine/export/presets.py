"""The paper's figures from runs, one command each (`zopro plot --preset NAME`):

- compute: held-out reward-model score and gold score against forward passes, first-order methods solid,
  zeroth-order dashed, so methods compare at equal compute;
- interplay: how the policy's and the reward model's updates relate, per iteration, from the runs'
  checkpoints (the angle between them, the cosine of successive updates, and the two trajectories)."""

from __future__ import annotations

from engine.export.checkpoints import ExportError
from engine.export.figures import colours, draw_metric, legend, new_figure, paper_style
from engine.export.sources import LabelledRun

PRESETS = {
    "compute": "reward and gold score against forward passes (first- vs zeroth-order)",
    "interplay": "the policy-reward interplay: update angle, successive cosines, trajectories",
    "cost": "gold against policy forward passes and whole-step wall time, mean over seeds (+ gains table)",
}


def preset_figure(name: str, runs: list[LabelledRun]):
    if name == "compute":
        return compute_figure(runs)
    if name == "interplay":
        return interplay_figure(runs)
    if name == "cost":
        from engine.export.equal_cost import equal_cost_figure

        return equal_cost_figure(runs)
    raise ExportError(f"--preset {name!r} is not one of: {', '.join(PRESETS)}")


def compute_figure(runs: list[LabelledRun]):
    with paper_style():
        figure, panels = new_figure(columns=2)
        drawn = 0
        for axes, metric, title in zip(
            panels, ("eval/reward", "eval/gold"), ("reward-model score", "gold score"), strict=True
        ):
            count = draw_metric(axes, runs, metric, "forward_passes")
            if not count:
                axes.text(
                    0.5,
                    0.5,
                    "the task has no gold scorer",
                    ha="center",
                    va="center",
                    transform=axes.transAxes,
                    color="0.4",
                )
            axes.set_title(title)
            drawn += count
        if not drawn:
            raise ExportError("the runs logged no held-out evaluation yet; the compute figure needs one")
        legend(panels[0], runs)
    return figure


def interplay_reports(runs: list[LabelledRun]) -> list[tuple[LabelledRun, dict]]:
    from engine.export.interplay_report import build_report

    reports, problems = [], []
    for run in runs:
        try:
            reports.append((run, build_report(run.path)))
        except ValueError as error:
            problems.append(str(error))
    if not reports:
        raise ExportError(problems[0] if problems else "no run to draw")
    return reports


def interplay_figure(runs: list[LabelledRun], reports: list[tuple[LabelledRun, dict]] | None = None):
    reports = reports if reports is not None else interplay_reports(runs)
    palette = colours([run for run, _ in reports])
    with paper_style():
        figure, (angle, successive, trajectory) = new_figure(width=2.5, height=2.3, columns=3)
        angle.axhline(90, color="0.6", linestyle=":", linewidth=0.8)
        for run, report in reports:
            colour = palette[run.label]
            rows = report["per_iteration"]
            iterations = [row["iteration"] for row in rows]
            angle.plot(
                iterations,
                [_nan(row["angle_policy_reward_deg"]) for row in rows],
                marker="o",
                color=colour,
                label=run.label,
            )
            successive.plot(
                iterations,
                [_nan(row["cos_policy_successive"]) for row in rows],
                marker="o",
                color=colour,
                label=f"{run.label}: policy",
            )
            successive.plot(
                iterations,
                [_nan(row["cos_reward_successive"]) for row in rows],
                marker="s",
                color=colour,
                linestyle=":",
                label=f"{run.label}: reward",
            )
            for adapter, marker, style in (("policy", "o", "-"), ("reward", "s", ":")):
                points = [p for p in report["trajectory"][adapter] if None not in p]
                if points:
                    xs, ys = zip(*points, strict=True)
                    trajectory.plot(
                        xs, ys, marker=marker, linestyle=style, color=colour, label=f"{run.label}: {adapter}"
                    )
                    trajectory.plot(xs[:1], ys[:1], marker="*", markersize=7, color=colour, linestyle="none")
        angle.set(title="policy vs reward update", xlabel="iteration", ylabel="angle (degrees)")
        successive.set(title="successive updates", xlabel="iteration", ylabel="cosine")
        successive.axhline(0, color="0.6", linestyle=":", linewidth=0.8)
        trajectory.set(title="trajectories (2-D projection)", xlabel="projection 1", ylabel="projection 2")
        ticks = sorted({row["iteration"] for _, report in reports for row in report["per_iteration"]})
        for axes in (angle, successive):
            axes.set_xticks(ticks)
            axes.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
        handles, labels = (
            trajectory.get_legend_handles_labels()
        )  # solid circles policy, dotted squares reward
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    return figure


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value
