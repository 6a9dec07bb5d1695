"""The zeroth-order, premise-check, interplay and compare panels, drawn from run directories."""

from __future__ import annotations

import time
from pathlib import Path

from engine.rundir.writer import RunWriter
from tests.conftest import REPO
from tests.test_tui import dashboard, wait_for
from zopro_tui.app import ZoproApp
from zopro_tui.screens.compare import CompareScreen
from zopro_tui.screens.dashboard import DashboardScreen
from zopro_tui.screens.runs import RunsTable
from zopro_tui.widgets.chart import CurveChart
from zopro_tui.widgets.panel import ChartGridPanel

FIXTURE_ROOT = REPO / "tests" / "fixtures" / "run_tiny"
FIXTURE_RUN = FIXTURE_ROOT / "fast-seed0"


def write_zo_run(run: Path, *, premise: bool = True, standard_errors: bool = True) -> Path:
    """A finished zopro run of 40 updates in 4 iterations: zo/ diagnostics every update, the premise check at
    the first update of iterations 1-3, the interplay at the end of each, held-out evaluations with (or
    without, like runs before them) standard errors."""
    with RunWriter(run) as writer:
        writer.update_status(state="finished", method="zopro", stage="done", started=time.time() - 60)
        for step in range(1, 41):
            iteration = (step - 1) // 10
            metrics = {
                "objective/scores": step / 40,
                "zo/g": (-1) ** step * 0.1,
                "zo/abs_g": 0.1,
                "zo/decay": 0.99**step,
                "zo/step_norm": 0.01,
                "zo/z_norm": 1.5,
                "compute/forward_passes": 3 * step,
            }
            if premise and iteration > 0 and step % 10 == 1:
                metrics |= {
                    "premise/gold_minus": 0.30 + 0.01 * iteration,
                    "premise/gold_0": 0.32 + 0.01 * iteration,
                    "premise/gold_plus": 0.35 + 0.01 * iteration,
                    "premise/cos_descent_mu": 0.2,
                }
            common = dict(iteration=iteration, global_step=step, elapsed=float(step))
            writer.emit("metrics", stage="policy", step=step, metrics=metrics, **common)
            if step % 10 == 0:
                writer.emit(
                    "metrics",
                    stage="refine",
                    step=0,
                    metrics={
                        "interplay/cos_policy_reward": 0.1 * step / 10,
                        "interplay/angle_policy_reward_deg": 80.0,
                        "interplay/traj_policy_x": step / 10,
                        "interplay/traj_policy_y": 1.0,
                        "interplay/traj_reward_x": 0.0,
                        "interplay/traj_reward_y": step / 10,
                    },
                    **common,
                )
                scores = {"eval/gold": 0.3 + step / 400, "eval/win_rate_vs_sft": 0.5 + step / 200}
                if standard_errors:
                    scores |= {"eval/gold_se": 0.05, "eval/win_rate_vs_sft_se": 0.04}
                writer.emit("eval", stage="eval", step=0, metrics=scores, **common)
    return run


def chart_titled(panel: ChartGridPanel, title: str) -> CurveChart:
    return next(chart for chart in panel.charts if chart.data.title == title)


def chart_text(chart: CurveChart) -> str:
    return "\n".join(chart.render_line(y).text for y in range(chart.size.height))


async def test_zeroth_order_and_interplay_panels_draw_what_appears(tmp_path):
    run = write_zo_run(tmp_path / "runs" / "zo-run", premise=False)
    app = ZoproApp(tmp_path / "runs", attach=run)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        screen = dashboard(app)
        await wait_for(
            pilot,
            lambda: screen.run.caught_up and screen.query_one("#zo").display,
            10,
            "the zeroth-order panel",
        )
        screen.redraw(force=True)
        await pilot.pause(0.3)
        zo = screen.query_one("#zo", ChartGridPanel)
        g_chart = chart_titled(zo, "projected gradient g")
        assert [s.label for s in g_chart.data.series] == ["g", "|g|"]
        assert g_chart.display, "no premise check in this run: the g chart comes first"
        premise = chart_titled(zo, "premise: gold along mu")
        assert premise.data.series == [] and not premise.display, "waiting charts give way to those with data"
        assert chart_titled(zo, "direction composition").data.series == [], "cos(z, mu) not logged: it waits"
        interplay = screen.query_one("#interplay", ChartGridPanel)
        assert interplay.charts[0].data.series and len(interplay.charts[-1].data.series) == 2
        assert all(
            not chart.data.series or chart.size.width for chart in screen.query(CurveChart) if chart.display
        )


async def test_premise_check_and_standard_errors_on_the_dashboard(tmp_path):
    run = write_zo_run(tmp_path / "runs" / "zo-run")
    app = ZoproApp(tmp_path / "runs", attach=run)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
        screen = dashboard(app)
        await wait_for(pilot, lambda: screen.run.caught_up, 10, "the run read")
        screen.redraw(force=True)
        await pilot.pause(0.3)
        zo = screen.query_one("#zo", ChartGridPanel)
        premise = chart_titled(zo, "premise: gold along mu")
        assert premise.display, "the premise check is what the zeroth-order panel shows first"
        assert [s.label for s in premise.data.series] == ["gold -mu", "gold 0", "gold +mu"]
        assert [len(s.x) for s in premise.data.series] == [3, 3, 3], "one point per iteration after the first"
        assert "●" in chart_text(premise), "three points per series: drawn with markers"
        await pilot.press("3")  # the zeroth-order panel alone: the other diagnostics too
        await pilot.pause(0.3)
        assert chart_titled(zo, "premise: cos(descent, mu)").display
        assert chart_titled(zo, "step |dtheta|").data.series[0].label == "|dtheta|"
        await pilot.press("1")
        await pilot.pause(0.3)
        curves = screen.query_one("#curves", ChartGridPanel)
        gold = chart_titled(curves, "gold score")
        held_out = next(s for s in gold.data.series if s.label == "held-out")
        assert held_out.se is not None and list(held_out.se) == [0.05] * 4
        assert "±0.05" in chart_text(gold).splitlines()[0], "the legend reads the standard error"
        rollouts = chart_titled(curves, "reward-model score").data.series[0]
        assert rollouts.label == "RM" and rollouts.se is None, "no standard error: a plain line"


async def test_compare_screen_shows_scores_with_standard_errors(tmp_path):
    write_zo_run(tmp_path / "runs" / "with-se")
    write_zo_run(tmp_path / "runs" / "without-se", standard_errors=False)
    app = ZoproApp(tmp_path / "runs")
    async with app.run_test(size=(120, 30)) as pilot:
        table = app.screen.query_one(RunsTable)
        await wait_for(pilot, lambda: table.row_count == 2, 10, "two runs in the table")
        await pilot.press("space", "j", "space", "c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), 5, "the compare screen")
        compare = app.screen
        await wait_for(
            pilot, lambda: all(run.caught_up for run in compare.runs.values()), 10, "both runs read"
        )
        compare.redraw(force=True)
        await pilot.pause(0.2)
        gold = next(chart for chart in compare.charts if chart.data.title == "gold score (held-out)")
        errors = {s.label: s.se for s in gold.data.series}
        assert errors["without-se"] is None and list(errors["with-se"]) == [0.05] * 4
        rows = {
            str(row[0]): [str(cell) for cell in row]
            for row in (compare.query_one("#compare-table").get_row_at(i) for i in range(2))
        }
        assert rows["with-se"][3:5] == ["0.400 ± 0.050", "0.700 ± 0.040"]
        assert rows["without-se"][3:5] == ["0.400", "0.700"]
