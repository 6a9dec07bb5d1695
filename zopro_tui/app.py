"""`zopro-tui`: the Textual workbench; the app (screens, app-wide keys and commands) and its command line.

zopro-tui                        the runs under ./runs (or --root DIR)
zopro-tui recipes/tiny.toml      start that recipe as a detached run and open its dashboard
zopro-tui runs/mine              attach to a run, live or finished
zopro-tui --readonly runs/mine   no controls (a shared screen)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from engine.recipe import RecipeError
from engine.rundir.reader import is_run_dir
from zopro_tui.launch import LaunchedRun, RunPlan, launch, plan_run
from zopro_tui.screens.compare import CompareScreen
from zopro_tui.screens.dashboard import DashboardScreen
from zopro_tui.screens.help import HelpScreen
from zopro_tui.screens.runs import RunsScreen

EXIT_BAD_INPUT = 2


class ZoproApp(App):
    """Runs list, dashboards and compare views over run directories; starts runs detached."""

    CSS_PATH = "zopro.tcss"
    TITLE = "zopro"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("S", "screenshot_svg", "Save SVG", show=False),
    ]

    def __init__(
        self,
        root: Path = Path("runs"),
        *,
        readonly: bool = False,
        attach: Path | None = None,
        plan: RunPlan | None = None,
        export_dir: Path | None = None,
    ):
        super().__init__()
        self.root = Path(root)
        self.readonly = readonly
        self.attach = attach
        self.plan = plan
        self.export_dir = export_dir or Path.cwd()
        self.launched: dict[Path, LaunchedRun] = {}

    def on_mount(self) -> None:
        self.run_worker(self._watch_alerts, thread=True, group="alerts", exit_on_error=False)
        self.push_screen(RunsScreen(self.root))
        if self.plan is not None:
            self.start_run(self.plan)
        elif self.attach is not None:
            from engine.jobs.sweep import is_sweep_dir

            if is_sweep_dir(self.attach):
                self.open_sweep(self.attach)
            else:
                self.open_run(self.attach)

    def _watch_alerts(self) -> None:
        """A run that fails, goes stale or raises a warning: a notification wherever the user is."""
        from textual.worker import get_current_worker

        from zopro_tui import alerts

        worker = get_current_worker()

        def post(alert) -> None:
            if not worker.is_cancelled:
                with contextlib.suppress(RuntimeError):  # the app is closing
                    self.call_from_thread(alerts.notify, self, alert)

        alerts.watch(self.root, post, lambda: worker.is_cancelled)

    # -- what screens ask of the app -----------------------------------------------------------------------
    def open_run(self, run_dir: Path) -> None:
        self.push_screen(DashboardScreen(run_dir, readonly=self.readonly))

    def open_compare(self, run_dirs: list[Path]) -> None:
        self.push_screen(CompareScreen(run_dirs))

    def open_sweep(self, sweep_dir: Path) -> None:
        from zopro_tui.screens.sweep import SweepScreen

        self.push_screen(SweepScreen(sweep_dir))

    def start_run(self, plan: RunPlan | None) -> None:
        """Start a validated recipe detached, then open its dashboard (it fills in as the run starts)."""
        if plan is None:
            return
        if self.readonly:
            self.notify("read-only: starting runs is off", severity="warning")
            return
        if plan.grid:  # a sweep runs through the queue: its worker starts now when nothing else runs
            self.queue_sweep(plan)
            return
        try:
            plan.run_dir.mkdir(parents=True, exist_ok=False)  # reserves the name; the engine accepts it empty
            launched = launch(plan)
        except OSError as error:
            self.notify(f"could not start {plan.recipe}: {error}", severity="error")
            return
        self.launched[launched.run_dir] = launched
        self.notify(
            f"started {plan.run_dir.name} (pid {launched.pid}); its output goes to {launched.log_path}",
            timeout=4,
        )
        self.open_run(launched.run_dir)

    def queue_sweep(self, plan: RunPlan) -> None:
        from engine.jobs.queue import QueueError, add, start_worker
        from zopro_tui.screens.queue import QueueScreen

        try:
            item = add(self.root, plan.recipe, plan.overrides, plan.grid)
            pid = start_worker(self.root)
        except (QueueError, OSError) as error:
            self.notify(f"could not queue the sweep of {plan.recipe}: {error}", severity="error")
            return
        self.notify(
            f"sweep {item.id} queued: {item.label}"
            + (f"; the queue's worker started it (pid {pid})" if pid else "; it runs after what is queued"),
            timeout=6,
        )
        self.push_screen(QueueScreen(self.root))

    def alive_launched(self) -> list[LaunchedRun]:
        return [run for run in self.launched.values() if run.alive()]

    @work(thread=True, group="export", exit_on_error=False)
    def export_metrics(self, run_dir: Path) -> None:
        """Write the run's metrics as CSV and JSON (what `zopro export` writes) into the export folder."""
        from engine.rundir.files import atomic_write_text
        from engine.rundir.report import export_metrics

        written = []
        try:
            for fmt in ("csv", "json"):
                path = self.export_dir / f"{Path(run_dir).name}-metrics.{fmt}"
                atomic_write_text(path, export_metrics(Path(run_dir), fmt))  # a link there is replaced
                written.append(str(path))
        except OSError as error:
            self.call_from_thread(self.notify, f"export failed: {error}", severity="error")
            return
        self.call_from_thread(self.notify, "wrote " + " and ".join(written), timeout=6)

    # -- app-wide actions ----------------------------------------------------------------------------------
    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss(None)
            return
        self.push_screen(HelpScreen(self.screen))

    def action_screenshot_svg(self) -> None:
        name = type(self.screen).__name__.removesuffix("Screen").lower()
        filename = f"zopro-{name}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        from engine.rundir.files import atomic_write_text

        path = Path(self.export_dir) / filename
        try:  # by rename, as the metrics export: a link already at the name is replaced, not written through
            atomic_write_text(path, self.export_screenshot())
        except OSError as error:
            self.notify(f"the screen could not be saved: {error}", severity="error")
            return
        self.notify(f"saved the screen as {path}", timeout=5)

    async def action_quit(self) -> None:
        alive = self.alive_launched()
        message = None
        if alive:
            runs = ", ".join(f"{run.run_dir} (pid {run.pid})" for run in alive)
            message = (
                f"zopro-tui: {len(alive)} run{'s' if len(alive) > 1 else ''} started here keep"
                f"{'s' if len(alive) == 1 else ''} running in the background: {runs}. "
                f"Attach again with `zopro-tui {alive[0].run_dir}`."
            )
        self.exit(message)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette lists every action of the current screen (from its bindings), then Textual's own."""
        seen: set[str] = set()
        for key, active in screen.active_bindings.items():
            binding = active.binding
            if not binding.description or binding.description in seen or not active.enabled:
                continue
            seen.add(binding.description)
            yield SystemCommand(
                binding.description, f"key: {key}", partial(self.run_binding, active.node, binding.action)
            )
        yield from super().get_system_commands(screen)

    async def run_binding(self, node, action: str) -> None:
        await self.run_action(action, node)


def parse_overrides_argument(value: str) -> list[str]:
    """One --set value, kept whole (the shell already split the words)."""
    if "=" not in value:
        raise ValueError(f"--set {value!r} has no '='; write key.path=value, e.g. train.iterations=2")
    return [value]


def resolve_target(
    target: str | None, root: Path, overrides: list[str]
) -> tuple[Path | None, RunPlan | None]:
    """A run directory to attach to, or a recipe to start; raises ValueError with one sentence otherwise."""
    if target is None:
        if overrides:
            raise ValueError("--set needs a recipe to override: zopro-tui RECIPE.toml --set key=value")
        return None, None
    path = Path(target).expanduser()
    if path.is_file() and path.suffix == ".toml":
        try:
            return None, plan_run(path, overrides, root)
        except RecipeError as error:
            raise ValueError(str(error)) from None
    if path.is_dir() and is_run_dir(path):
        if overrides:
            raise ValueError(f"--set applies to a recipe, and {path} is a run directory")
        return path, None
    from engine.jobs.sweep import is_sweep_dir

    if path.is_dir() and is_sweep_dir(path):
        if overrides:
            raise ValueError(f"--set applies to a recipe, and {path} is a sweep directory")
        return path, None
    if path.is_dir():
        raise ValueError(
            f"{path} is not a run directory (no status.json or events.jsonl); "
            f"to list the runs in it use `zopro-tui --root {path}`"
        )
    raise ValueError(f"{path} does not exist; give a recipe (.toml) or a run directory")


def workbench(
    target: Annotated[
        str | None,
        typer.Argument(help="a recipe .toml to start, a run directory to attach to, or a sweep folder"),
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    readonly: Annotated[
        bool, typer.Option("--readonly", help="no controls and no new runs (a shared screen)")
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="override a recipe key when starting a recipe (repeatable)"
        ),
    ] = None,
) -> None:
    """The zopro workbench: watch, start, control and compare preference-optimisation runs."""
    try:
        settings = [override for value in overrides or [] for override in parse_overrides_argument(value)]
        attach, plan = resolve_target(target, root, settings)
    except (ValueError, RecipeError) as error:
        print(f"zopro-tui: {error}", file=sys.stderr)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if plan is not None and readonly:
        print("zopro-tui: --readonly cannot start a recipe; drop one of them", file=sys.stderr)
        raise typer.Exit(EXIT_BAD_INPUT)
    app = ZoproApp(root, readonly=readonly, attach=attach, plan=plan)
    message = app.run()
    if message:
        print(message)


def main(argv: list[str] | None = None) -> None:
    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    cli.command()(workbench)
    cli(args=argv, prog_name="zopro-tui")


if __name__ == "__main__":
    main()
