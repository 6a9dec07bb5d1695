"""Running a recipe headless: validate, create the run directory, train with a live rich progress line,
print the summary, and map the outcome to an exit code (0 ok, 1 failed, 2 bad input, 130/143 interrupted)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from engine.cli.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_BY_SIGNAL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
)
from engine.cli.progress_line import ProgressView, plain_line, warning_line
from engine.recipe import RecipeError, load_recipe
from engine.rundir.checkpoints import latest_checkpoint
from engine.rundir.files import atomic_write_text
from engine.rundir.reader import read_events, run_info
from engine.rundir.report import evaluations_table, fmt_duration
from engine.rundir.safe_io import checked_inside
from engine.rundir.wording import RM_NOTE
from engine.rundir.writer import (
    FollowerWriter,
    RunDirError,
    RunWriter,
    default_run_dir,
    run_dir_problem,
    unstarted_leftovers,
)

if TYPE_CHECKING:
    from engine.training.bookkeeping import RunBook

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def run_training(
    recipe_path: Path | None,
    overrides: list[str],
    *,
    run_dir: Path | None,
    root: Path = Path("runs"),
    resume: bool,
    quiet: bool,
    console: Console,
    err: Console,
    stages_from: Path | None = None,
) -> int:
    """`stages_from`: a run whose SFT and reward stages this new run adopts (engine.training.shared_stages)."""

    def bad(message: str) -> int:
        err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        return EXIT_BAD_INPUT

    try:
        if resume:
            assert run_dir is not None
            if run_dir.is_dir() and not (run_dir / "recipe.toml").exists() and unstarted_leftovers(run_dir):
                return bad(
                    f"{run_dir} was stopped before its run started (no recipe.toml); start it again with "
                    f"`zopro run RECIPE --run-dir {run_dir}`"
                )
            if not run_dir.is_dir() or not (run_dir / "recipe.toml").exists():
                return bad(f"{run_dir} is not a run directory with a recipe.toml; nothing to resume")
            info = run_info(run_dir)
            if info.status == "finished":
                return bad(f"{run_dir} has already finished; start a new run instead")
            if info.status in ("running", "paused"):
                return bad(f"{run_dir} is still {info.status} (pid {info.pid}); stop it before resuming")
            if info.status == "unreadable":
                return bad(f"{run_dir} cannot be resumed: {info.error}")
            try:  # the run's own copy: never a link to a recipe elsewhere, never a FIFO's hang
                checked_inside(run_dir, run_dir / "recipe.toml")
            except OSError as error:
                return bad(f"{run_dir / 'recipe.toml'} {error.strerror}; it cannot be resumed")
            recipe = load_recipe(run_dir / "recipe.toml")
        else:
            assert recipe_path is not None
            recipe = load_recipe(recipe_path, overrides)
            problem = (
                run_dir_problem(run_dir)
                if run_dir is not None
                else run_dir_problem(
                    root / f"{recipe.name}-{recipe.policy.method}-00000000-000000-000", "--root"
                )
            )
            if problem is not None:
                return bad(problem)
            if stages_from is not None:
                from engine.training.shared_stages import StagesError, stages_source

                try:
                    stages_from = stages_source(stages_from, recipe)
                except StagesError as error:
                    return bad(str(error))
            for flag, folder in (("--run-dir", run_dir), ("--root", None if run_dir else root)):
                blocker = _file_in_the_way(folder)
                if blocker is not None:
                    return bad(
                        f"{flag} {folder}: {blocker} is a file, not a folder; choose another directory"
                    )
    except RecipeError as error:
        return bad(str(error))
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun started several ranks: rank 0 names the
        from engine.training.distributed import Distributed  # run directory and is the one that writes it

        dist = Distributed.from_environment(recipe.device)
    follower = dist is not None and not dist.is_main
    problem = None
    writer: RunWriter | None = None
    start_signals = SignalsBeforeTheRun()
    start_signals.install()  # remembered while the lock is taken, raised once the lock is let go on the way out
    if not follower:  # the lock first, before the model loads: no second run can take this folder
        try:
            if run_dir is None:
                run_dir = default_run_dir(root, recipe.name, recipe.policy.method, reserve=True)
                writer = RunWriter(run_dir)
                writer.created_folder = True
            else:
                writer = RunWriter(run_dir)
            writer.claim(new=not resume)
        except OSError as error:
            problem = f"--root {root} cannot hold a new run ({error.strerror or error})"
        except RunDirError as error:
            problem = str(error)
    if dist is not None:
        run_dir, problem = dist.broadcast((str(run_dir), problem), "naming the run directory")
        run_dir = Path(run_dir)
        if follower:
            quiet, console = True, Console(quiet=True)
            writer = FollowerWriter(run_dir)
    try:
        start_signals.arm()
        if problem is not None:
            return bad(problem)
        return _train(
            recipe,
            recipe_path,
            run_dir,
            resume,
            quiet,
            console,
            err,
            dist,
            bad,
            writer,
            stages_from,
            start_signals,
        )
    except KeyboardInterrupt:  # raised by SignalsBeforeTheRun: the run had not started, its lock goes below
        err.print("interrupted before the run started")
        return EXIT_BY_SIGNAL.get(start_signals.received or "SIGINT", EXIT_INTERRUPTED)
    finally:
        if writer is not None:
            writer.abandon()  # only before the run started: its lock and the folder it made go
        if dist is not None:
            dist.close()


class SignalsBeforeTheRun:
    """SIGINT and SIGTERM from the lock to the run's own handlers (RunBook.running). While the lock is taken
    they are only remembered (an interrupt there would leave the lock behind); once armed, inside the code that
    lets the lock go on the way out, they interrupt the start at once, as Python's default SIGINT does. Library
    code that loads a model may swallow the KeyboardInterrupt: `check` after loading ends the start anyway."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.armed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._interrupt)
            signal.signal(signal.SIGTERM, self._interrupt)

    def arm(self) -> None:
        self.armed = True
        self.check()

    def _interrupt(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signal.Signals(signum).name
        if self.armed:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt


def _train(
    recipe, recipe_path, run_dir, resume, quiet, console, err, dist, bad, writer, stages_from, start_signals
) -> int:
    from engine.mirror import Mirror, missing_package

    missing = missing_package(recipe.log.report_to)
    if missing is not None:
        return bad(f"{recipe_path or run_dir}: {missing}")

    from engine.training.models import ModelError, quiet_transformers

    quiet_transformers()
    from engine.errors import StopRun, TrainingFailed
    from engine.training import loop
    from engine.training.run import Run

    follower = dist is not None and not dist.is_main
    view_holder: list[ProgressView] = []
    mirror = Mirror([] if follower else recipe.log.report_to, run_dir, _mirror_config(recipe), err)

    def listener(event: dict) -> None:
        mirror.on_event(event)
        if event.get("type") == "resume" and not quiet:
            console.print(event.get("message", ""), markup=False)
        elif event.get("type") == "resume" and event.get(
            "skipped"
        ):  # quiet, but a damaged checkpoint is news
            err.print(f"note: {event.get('message', '')}", soft_wrap=True, markup=False)
        if event.get("type") == "warning":  # one line on stderr, also with --quiet and under the live line
            err.print(f"[bold yellow]{escape(warning_line(event))}[/]", soft_wrap=True)
        if view_holder:
            view_holder[0].on_event(event)
            if not live_enabled and not quiet:
                plain_line(event, view_holder[0], console)

    live_enabled = console.is_terminal and not quiet
    with (
        console.status("loading the model…", spinner="dots") if live_enabled else contextlib.nullcontext()
    ) as spinner:

        def notice(text: str) -> None:  # a step of the start that takes a while (building a built-in model)
            if spinner is not None:
                spinner.update(text + "…")
            elif not quiet:  # progress, like the stage lines: stdout (stderr is for what went wrong)
                console.print(text, soft_wrap=True, markup=False, highlight=False)

        try:
            run = Run(recipe, writer, listener=None if follower else listener, dist=dist, notice=notice)
        except ModelError as error:
            return bad(str(error))
    start_signals.check()
    view = ProgressView(run.total_steps, recipe.train.iterations, recipe.policy.method, run_dir)
    view_holder.append(view)
    try:
        writer.open()
    except RunDirError as error:
        return bad(str(error))
    for request in writer.dropped_requests:  # addressed to a process that is gone: not obeyed now
        err.print(
            f"note: dropped a leftover `{request}` request in {run_dir / 'control'} from an earlier process",
            soft_wrap=True,
        )
    if not quiet:
        console.print(
            f"{'resuming' if resume else 'run'} [bold]{run_dir}[/]  (method {recipe.policy.method}, "
            f"model {recipe.model.base}, device {run.device}"
            + (f", {dist.world_size} ranks, {dist.backend})" if dist is not None else ")")
        )
    code = EXIT_OK
    try:
        with (
            Live(view, console=console, refresh_per_second=4, transient=True)
            if live_enabled
            else contextlib.nullcontext()
        ):
            if resume:
                loop.resume(run)
            else:
                loop.start(run, stages_from)
    except StopRun as stop:
        code = EXIT_BY_SIGNAL.get(stop.reason, EXIT_OK)
        if stop.failed:  # a guard (policy.max_kl) stopped it: say so with the exit code too
            code = EXIT_FAILED
            err.print(f"[bold red]stopped:[/] {escape(stop.reason)}", soft_wrap=True)
        elif follower:
            pass
        elif latest_checkpoint(run_dir) is not None:
            err.print(
                f"stopped ({stop.reason}) after a checkpoint; continue with `zopro run --resume {run_dir}`"
            )
        else:
            err.print(
                f"stopped ({stop.reason}) before the first checkpoint; `zopro run --resume {run_dir}` starts "
                "it again from the first step"
            )
    except RunDirError as error:  # --resume found no checkpoint it can read; nothing was changed
        code = bad(str(error))
    except TrainingFailed as error:
        code = _record_failure(run.book, writer, str(error), err, run_dir)
    except Exception as error:  # a bug or an environment problem: keep the traceback in the run directory
        if _disk_full(error, run_dir):
            writer.recover_checkpoints()  # a half-written checkpoint goes, and gives its space back
            code = _record_failure(
                run.book,
                writer,
                f"the disk holding {run_dir} is full (no space left on device); nothing half-written was kept: "
                f"free some space, then continue with `zopro run --resume {run_dir}`",
                err,
                run_dir,
            )
        else:
            code = _record_bug(run.book, writer, error, err, run_dir)
    finally:
        mirror.close()
        writer.close()
    if run.state.history and not follower:
        console.print(
            evaluations_table(
                run.state.history,
                f"{run_dir.name}: held-out evaluation",
                warnings=[e for e in read_events(run_dir) if e.get("type") == "warning"],
            )
        )
    if run.state.history and not follower:
        # a terminal wraps it between words; a pipe or log keeps it on one line
        console.print(RM_NOTE, style="dim", soft_wrap=not console.is_terminal)
    if code == EXIT_OK and run.state.stage == "done":
        paused = run.state.paused_s
        console.print(
            f"finished in {fmt_duration(run.book.clock.elapsed())}"
            + (f" (of which {fmt_duration(paused)} paused)" if paused >= 1 else "")
            + f": {run_dir}",
            soft_wrap=True,
        )
    return code


def _mirror_config(recipe) -> dict:
    from engine.recipe import dump_recipe

    return {"recipe": recipe.to_dict(), "recipe_text": dump_recipe(recipe), "project": "zopro"}


def _file_in_the_way(folder: Path | None) -> Path | None:
    """The folder itself or its nearest existing parent, when that is not a folder (a run cannot go there)."""
    if folder is None:
        return None
    for existing in (folder, *folder.parents):
        if existing.exists():
            return None if existing.is_dir() else existing
    return None


def _disk_full(error: BaseException, run_dir: Path) -> bool:
    """An error from a full disk: ENOSPC itself, or torch's and safetensors' wrappers of it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return True
        if "No space left on device" in str(seen) or "file write failed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(run_dir).free < (1 << 20)
    except OSError:
        return False


def _record_bug(book: RunBook, writer: RunWriter, error: BaseException, err: Console, run_dir: Path) -> int:
    first = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    try:
        atomic_write_text(run_dir / "error.log", traceback.format_exc())
        first += f" (traceback in {run_dir / 'error.log'})"
    except OSError:
        pass
    return _record_failure(book, writer, first, err, run_dir)


def _record_failure(book: RunBook, writer: RunWriter, message: str, err: Console, run_dir: Path) -> int:
    with contextlib.suppress(OSError):  # the disk may be what failed
        writer.update_status(state="failed", error=message)
    try:
        book.emit("error", message=message)
        book.emit("run_end", status="failed", error=message)
    except Exception:  # noqa: BLE001 - the writer may be what failed
        pass
    err.print(f"[bold red]training failed:[/] {escape(message)}", soft_wrap=True)
    return EXIT_FAILED
