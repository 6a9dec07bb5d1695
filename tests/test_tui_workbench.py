"""The workbench features of the TUI, driven by keys over real run directories: every stage's own curves
while it runs, the stage timeline in the header, titled compare charts."""

from __future__ import annotations

import time
from pathlib import Path

from engine.rundir import RunWriter
from tests.test_tui import chart_titled, dashboard, wait_for
from zopro_tui.app import ZoproApp
from zopro_tui.screens.dashboard import DashboardScreen
from zopro_tui.widgets.panel import ChartGridPanel


def stage(writer: RunWriter, name: str, steps: int, metrics, *, start: int, elapsed: float) -> int:
    writer.update_status(state="running", method="rloo", stage=name, iterations=2, step=0, global_step=start)
    writer.emit("stage_start", stage=name, iteration=None, step=0, global_step=start, elapsed=elapsed)
    for step in range(1, steps + 1):
        writer.emit(
            "metrics",
            stage=name,
            iteration=None,
            step=step,
            global_step=start + step,
            elapsed=elapsed + step * 0.1,
            metrics=metrics(step),
        )
    writer.update_status(step=steps, global_step=start + steps)
    return start + steps


async def test_each_stage_draws_its_own_curves_while_it_runs_and_the_header_shows_the_timeline(tmp_path: Path):
    run = tmp_path / "runs" / "live-sft"
    writer = RunWriter(run).open()
    try:
        writer.update_status(state="running", method="rloo", started=time.time() - 5, total_steps=60)
        at = stage(writer, "sft", 12, lambda s: {"loss/sft": 3.0 - s * 0.1}, start=0, elapsed=1.0)
        app = ZoproApp(tmp_path / "runs", attach=run)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), 5, "the dashboard")
            screen = dashboard(app)
            await wait_for(pilot, lambda: screen.run.caught_up and screen.run.live, 10, "the live run")
            curves = screen.query_one("#curves", ChartGridPanel)

            def shows(title: str) -> bool:
                screen.redraw(force=True)
                chart = chart_titled(curves, title)
                return chart.display and bool(chart.data.series)

            await wait_for(pilot, lambda: shows("SFT loss"), 10, "the SFT loss drawn during SFT")
            sft = chart_titled(curves, "SFT loss")
            assert len(sft.data.series[0].x) == 12
            header = screen.query_one("#run-header")
            await wait_for(pilot, lambda: "sft ▸" in str(header.render()), 5, "sft running in the header")

            writer.emit("stage_end", stage="sft", iteration=None, step=12, global_step=at, wall_s=1.2)
            stage(
                writer,
                "reward",
                8,
                lambda s: {"loss/reward": 0.7 - s * 0.02, "reward/accuracy": 0.5 + s * 0.05},
                start=at,
                elapsed=3.0,
            )
            await wait_for(
                pilot, lambda: shows("reward model: loss, accuracy"), 10, "the reward model's curves"
            )
            chart = chart_titled(curves, "reward model: loss, accuracy")
            assert [s.label for s in chart.data.series] == ["loss", "train acc"]
            await wait_for(
                pilot,
                lambda: "sft 0:01 ✓" in str(header.render()) and "reward ▸" in str(header.render()),
                5,
                "sft done and reward running in the header",
            )
    finally:
        writer.close()


async def test_a_run_that_fails_or_warns_is_announced_wherever_the_user_is(tmp_path: Path):
    import json

    from tests.test_tui import live_copy
    from zopro_tui.screens.help import HelpScreen

    run = live_copy(tmp_path)
    app = ZoproApp(tmp_path / "runs")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.5)
        await pilot.press("question_mark")  # the user is reading the help screen
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), 5, "the help screen")
        await pilot.pause(2.5)  # the alert watcher's first look: the baseline, no news
        assert not app._notifications
        status = json.loads((run / "status.json").read_text())
        warning = {"code": "kl_jump", "message": "held-out KL jumped to 14.4 nats", "iteration": 1, "step": 0}
        status.update(warnings=[warning], warning_count=1, updated=time.time())
        (run / "status.json").write_text(json.dumps(status))
        (run / "heartbeat").write_text(f"{time.time()}\n")
        await wait_for(
            pilot,
            lambda: any("held-out KL jumped" in n.message for n in app._notifications),
            10,
            "the warning notification",
        )
        status.update(state="failed", error="NaN in the policy loss at update 3")
        (run / "status.json").write_text(json.dumps(status))
        await wait_for(
            pilot,
            lambda: any(n.severity == "error" and "NaN in the policy loss" in n.message for n in app._notifications),
            10,
            "the failure notification",
        )
        assert isinstance(app.screen, HelpScreen)  # announced without leaving the help screen
