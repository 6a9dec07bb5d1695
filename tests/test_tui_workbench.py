"""The workbench features of the TUI, driven by keys over real run directories: every stage's own curves
while it runs, the stage timeline in the header, titled compare charts."""

from __future__ import annotations

import time
from pathlib import Path

from engine.rundir.writer import RunWriter
from tests.test_tui import choose_recipe, dashboard, wait_for
from tests.test_tui_zeroth_order import chart_titled
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


async def test_each_stage_draws_its_own_curves_while_it_runs_and_the_header_shows_the_timeline(
    tmp_path: Path,
):
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

            writer.emit("stage_end", stage="reward", iteration=None, step=8, global_step=at + 8, wall_s=0.8)
            judged = {"judge/agreement_with_gold": 0.75}  # logged once the judge has spoken, then refinement
            stage(
                writer,
                "refine",
                4,
                lambda s: {"loss/reward_refine": 0.6 - s * 0.01, "reward/refine_accuracy": 0.6, **judged},
                start=at + 8,
                elapsed=5.0,
            )
            title = "reward refinement: loss, accuracy, judge agreement"
            await wait_for(pilot, lambda: shows(title), 10, "refinement's curves during refinement")
            chart = chart_titled(curves, title)
            assert [s.label for s in chart.data.series] == ["loss", "acc", "judge agrees"]
    finally:
        writer.close()


async def test_a_run_that_fails_or_warns_is_announced_wherever_the_user_is(tmp_path: Path, monkeypatch):
    import json

    from engine.rundir.alerts import AlertTracker
    from tests.test_tui import live_copy
    from zopro_tui import alerts
    from zopro_tui.screens.help import HelpScreen
    from zopro_tui.screens.runs import RunsScreen

    looks: list[int] = []  # alerts found by each of the watcher's looks at the runs

    class CountedTracker(AlertTracker):  # the real tracker; the test only learns when a look is done
        def update(self, runs):
            found = super().update(runs)
            looks.append(len(found))
            return found

    monkeypatch.setattr(alerts, "AlertTracker", CountedTracker)
    run = live_copy(tmp_path)
    app = ZoproApp(tmp_path / "runs")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), 5, "the runs screen")
        await pilot.press("question_mark")  # the user is reading the help screen
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), 5, "the help screen")
        await wait_for(pilot, lambda: looks, 10, "the alert watcher's first look")
        assert looks[0] == 0 and not app._notifications  # the first look is the baseline: no news
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
            lambda: any(
                n.severity == "error" and "NaN in the policy loss" in n.message for n in app._notifications
            ),
            10,
            "the failure notification",
        )
        assert isinstance(app.screen, HelpScreen)  # announced without leaving the help screen


def write_sweep(root: Path, recipe: Path) -> Path:
    """A 2x2 sweep whose points finished with known final scores (gold rises with lr, win falls with it)."""
    from engine.jobs.sweep import create_sweep

    sweep = create_sweep(recipe, ["seed=0,1", "rloo.lr=0.0001,0.001"], [], root=root, sweep_dir=root / "grid")
    for index, point in enumerate(sweep.points):
        lr, seed = point["values"]["rloo.lr"], point["values"]["seed"]
        gold = 0.2 + (0.3 if lr == 0.001 else 0.0) + 0.01 * seed
        latest = {"eval/gold": gold, "eval/gold_se": 0.02, "eval/win_rate_vs_sft": 0.9 - gold, "eval/kl": 1.0}
        with RunWriter(sweep.point_dir(point)) as writer:
            writer.update_status(
                state="finished", method="rloo", stage="done", started=time.time() - 30, latest=latest
            )
            writer.emit(
                "eval", stage="eval", iteration=0, step=0, global_step=10 + index, elapsed=5.0, metrics=latest
            )
    return sweep.path


async def test_a_sweep_is_one_group_in_the_runs_list_and_opens_as_one_compare_view(
    tmp_path: Path, fast_recipe
):
    from textual.widgets import DataTable

    from zopro_tui.screens.compare import CompareScreen
    from zopro_tui.screens.runs import RunsScreen
    from zopro_tui.screens.sweep import SweepScreen

    root = tmp_path / "runs"
    write_sweep(root, fast_recipe)
    app = ZoproApp(root)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), 5, "the runs screen")
        table = app.screen.query_one("#runs", DataTable)
        await wait_for(pilot, lambda: table.row_count == 5, 10, "the sweep's row and its 4 points")
        first = table.get_row_at(0)
        assert "grid" in str(first[0]) and "sweep seed, lr" in str(first[1]) and "4/4 done" in str(first[3])
        assert "└ 0-seed=0_lr=0.0001" in str(table.get_row_at(1)[0])
        await pilot.press("enter")  # the cursor is on the sweep's row
        await wait_for(pilot, lambda: isinstance(app.screen, SweepScreen), 5, "the sweep screen")
        screen = app.screen
        points = screen.query_one("#sweep-table", DataTable)
        await wait_for(pilot, lambda: len(screen.infos) == 4 and points.row_count == 4, 10, "the points")
        order = [str(points.get_row_at(i)[0]) for i in range(4)]
        assert order == ["3", "1", "2", "0"], "sorted by final gold, best first"
        assert "0.510 ± 0.020" in str(points.get_row_at(0))
        assert screen.chart.data.title == "final gold vs seed"
        assert [s.label for s in screen.chart.data.series] == ["lr=0.0001", "lr=0.001"]
        await pilot.press("k")  # plot against the other swept key: lr, on a log axis (a decade apart)
        assert screen.chart.data.title == "final gold vs log10 rloo.lr"
        assert list(screen.chart.data.series[0].x) == [-4.0, -3.0]
        assert list(screen.chart.data.series[0].y) == [0.2, 0.5]
        await pilot.press("m")  # sort by win rate instead
        order = [str(points.get_row_at(i)[0]) for i in range(4)]
        assert order == ["0", "2", "1", "3"]
        await pilot.press("o")  # every point's curves overlaid
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), 5, "the compare screen")
        assert len(app.screen.runs) == 4


async def test_a_queue_built_in_the_tui_runs_in_order_after_the_tui_quits(tmp_path: Path, monkeypatch):
    import contextlib
    import os
    import signal

    from engine.jobs.queue import load_items, queue_dir
    from engine.rundir.reader import run_info
    from tests.conftest import FAST_RECIPE
    from zopro_tui.screens.queue import QueueScreen

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "fast.toml").write_text(FAST_RECIPE)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs"
    try:
        app = ZoproApp(root)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.3)
            await pilot.press("Q")
            await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), 5, "the queue screen")
            screen = app.screen
            for seed in (1, 2, 3):
                await pilot.press("a")
                await pilot.pause(0.3)
                await choose_recipe(pilot, app, "fast.toml")
                await pilot.press("enter")
                await pilot.press(*"train.iterations=1", "space", *f"seed={seed}", "enter")
                await wait_for(pilot, lambda seed=seed: len(screen.items) == seed, 10, f"entry {seed} queued")
            assert [i.state for i in screen.items][1:] == ["pending", "pending"]
            await pilot.press("down", "down", "K")  # the third entry goes before the second
            assert [i.id for i in load_items(root) if i.state == "pending"] == ["0003", "0002"]
            await wait_for(
                pilot, lambda: [i.id for i in screen.items][1:] == ["0003", "0002"], 5, "the new order"
            )
            await pilot.press("down", "d")  # the cursor stays on 0003; below it, 0002: cancel it
            await pilot.pause(0.3)
            await pilot.press("y")
            await wait_for(
                pilot,
                lambda: next(i for i in screen.items if i.id == "0002").state == "cancelled",
                5,
                "the cancelled entry",
            )

        # the TUI is gone; the detached worker goes on
        def done() -> bool:
            return all(i.state in ("finished", "failed", "cancelled") for i in load_items(root))

        deadline = time.monotonic() + 400
        while not done() and time.monotonic() < deadline:
            time.sleep(1)
        items = {i.id: i for i in load_items(root)}
        assert [items[k].state for k in ("0001", "0002", "0003")] == ["finished", "cancelled", "finished"]
        assert items["0003"].started >= items["0001"].ended  # one after the other, in the new order
        for key in ("0001", "0003"):
            assert run_info(Path(items[key].target)).status == "finished"
        assert not Path(items["0002"].target).exists()
    finally:
        from engine.jobs.queue import worker_running

        if worker_running(root):  # the lock is held: its pid is our worker, leader of its own session
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int((queue_dir(root) / "worker.lock").read_text().strip()), signal.SIGTERM)
