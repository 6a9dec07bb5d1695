"""`zopro sweep`: run a sweep's points in turn (or N at a time, one `zopro run` process each) and print
the summary table. The sweep directory itself (the grid, sweep.json, the summary rows, listing) is
`engine.jobs.sweep`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from engine.cli.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from engine.cli.runner import run_training
from engine.jobs.command import run_command
from engine.jobs.sweep import SUMMARY_JSON, Sweep, point_state, short_keys, sorted_rows, write_summary
from engine.rundir.files import append_log
from engine.rundir.reader import is_run_dir
from engine.rundir.report import STATUS_STYLE, fmt_duration, fmt_value, fmt_with_se, warnings_cell
from engine.rundir.safe_io import is_link, is_plain_file


# -- the summary table -----------------------------------------------------------------------------------
def summary_table(sweep: Sweep, rows: list[dict], sort: str = "final_gold", width: int = 120) -> Table:
    table = Table(
        title=f"sweep {sweep.name}: {len(rows)} points, sorted by {sort}",
        header_style="bold",
        title_justify="left",
    )
    short = short_keys(list(sweep.grid))
    table.add_column("#", justify="right", no_wrap=True)
    for key in sweep.grid:
        table.add_column(short[key], justify="right", no_wrap=True)
    for column in ("status", "gold", "win vs SFT", "KL", "wall", "warnings"):
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True)
    with_se = width >= 110  # narrower, the standard errors go (they are in summary.json)
    for row in sorted_rows(rows, sort):
        table.add_row(
            row["point"].split("-", 1)[0],
            *(str(row["values"].get(key, "-")) for key in sweep.grid),
            Text(row["status"], style=STATUS_STYLE.get(row["status"], "dim")),
            fmt_with_se(row.get("final_gold"), row.get("final_gold_se") if with_se else None),
            fmt_with_se(row.get("win_rate_vs_sft"), row.get("win_rate_vs_sft_se") if with_se else None),
            fmt_value(row.get("kl")),
            fmt_duration(row.get("wall_time_s")),
            Text(warnings_cell(row.get("warnings") or []), style="bold yellow"),
        )
    return table


LINKED_POINT = "its folder is a symbolic link; zopro writes nothing through links inside a sweep"


# -- running ---------------------------------------------------------------------------------------------
def _resumable(folder: Path) -> bool:
    return (folder / "recipe.toml").exists() and is_run_dir(folder)


def run_sweep(
    sweep: Sweep, *, quiet: bool, console: Console, err: Console, parallel: int | None = None
) -> int:
    """Run every point that has not finished, in grid order; a point that fails does not stop the sweep,
    an interrupt (Ctrl-C, SIGTERM, SIGHUP) does, after that point's checkpoint."""
    parallel = parallel or sweep.parallel
    todo = []
    for point in sweep.points:
        state, _ = point_state(sweep, point)
        if state == "finished":
            continue
        if state in ("running", "paused"):
            err.print(
                f"point {point['name']} is still {state} in another process; this sweep skips it",
                soft_wrap=True,
            )
            continue
        todo.append(point)
    if todo and not is_plain_file(sweep.recipe):  # every point trains it: never a recipe elsewhere
        err.print(
            f"{sweep.recipe} is missing, a symbolic link or not a plain file; no point was run",
            soft_wrap=True,
        )
        return EXIT_BAD_INPUT
    done = len(sweep.points) - len(todo)
    console.print(
        f"sweep [bold]{escape(str(sweep.path))}[/]: {len(sweep.points)} points"
        + (f", {done} already done" if done else "")
        + (f", {parallel} at a time" if parallel > 1 and len(todo) > 1 else ""),
        soft_wrap=True,
    )
    if parallel > 1 and len(todo) > 1:
        code = _run_parallel(sweep, todo, parallel, console, err)
    else:
        code = _run_sequential(sweep, todo, quiet, console, err)
    rows = write_summary(sweep)
    console.print(summary_table(sweep, rows, width=console.width))
    console.print(f"summary in {sweep.path / SUMMARY_JSON}", soft_wrap=True)
    return code


def _run_sequential(sweep: Sweep, todo: list[dict], quiet: bool, console: Console, err: Console) -> int:
    worst = EXIT_OK
    for point in todo:
        folder = sweep.point_dir(point)  # killed before its recipe.toml: a new run takes it, nothing removed
        if is_link(folder):
            err.print(f"point {point['name']}: {LINKED_POINT}; the sweep goes on", soft_wrap=True)
            worst = EXIT_FAILED
            continue
        resume = _resumable(folder)
        console.print(
            f"[bold]{escape(point['name'])}[/] {'(resuming) ' if resume else ''}-> {escape(str(folder))}",
            soft_wrap=True,
        )
        if resume:
            code = run_training(None, [], run_dir=folder, resume=True, quiet=quiet, console=console, err=err)
        else:
            code = run_training(
                sweep.recipe,
                [*sweep.overrides, *point["overrides"]],
                run_dir=folder,
                resume=False,
                quiet=quiet,
                console=console,
                err=err,
            )
        write_summary(sweep)
        if code in (129, 130, 143):
            err.print(f"the sweep stops here; continue it with `zopro sweep --resume {sweep.path}`")
            return code
        if code != EXIT_OK:
            err.print(f"point {point['name']} ended with exit code {code}; the sweep goes on", soft_wrap=True)
            worst = EXIT_FAILED
    return worst


def gpu_slots() -> list[str]:
    """The GPUs to spread parallel points over: CUDA_VISIBLE_DEVICES if set, else those nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def point_command(sweep: Sweep, point: dict) -> list[str]:
    folder = sweep.point_dir(point)
    overrides = [*sweep.overrides, *point["overrides"]]
    return run_command(sweep.recipe, run_dir=folder, resume=_resumable(folder), overrides=overrides)


def _run_parallel(sweep: Sweep, todo: list[dict], parallel: int, console: Console, err: Console) -> int:
    """N points at a time, each a `zopro run` process with its output in <point>.log, one GPU each when
    there are several (round robin over CUDA_VISIBLE_DEVICES or nvidia-smi's list)."""
    gpus = gpu_slots()
    pending = list(todo)
    running: dict[str, tuple[subprocess.Popen, dict, str | None]] = {}
    worst = EXIT_OK
    env_base = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    source_root = str(Path(__file__).resolve().parents[2])  # the folder that holds `engine`
    env_base["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env_base.get("PYTHONPATH", "")) if p)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                point = pending.pop(0)
                if is_link(sweep.point_dir(point)):
                    err.print(f"point {point['name']}: {LINKED_POINT}", soft_wrap=True)
                    worst = EXIT_FAILED
                    continue
                busy = {gpu for _, _, gpu in running.values()}
                gpu = next(
                    (g for g in gpus if g not in busy), gpus[len(running) % len(gpus)] if gpus else None
                )
                env = dict(env_base)
                if gpu is not None and len(gpus) > 1:
                    env["CUDA_VISIBLE_DEVICES"] = gpu
                try:
                    with append_log(sweep.path / f"{point['name']}.log") as log:
                        process = subprocess.Popen(
                            point_command(sweep, point),
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                        )
                except OSError as error:
                    err.print(f"point {point['name']}: {error.filename}: {error.strerror}", soft_wrap=True)
                    worst = EXIT_FAILED
                    continue
                running[point["name"]] = (process, point, gpu)
                where = f" on GPU {gpu}" if gpu is not None and len(gpus) > 1 else ""
                console.print(f"started {escape(point['name'])}{where} (pid {process.pid})", soft_wrap=True)
            time.sleep(0.5)
            for name, (process, _point, _gpu) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                write_summary(sweep)
                if code == EXIT_OK:
                    console.print(f"{escape(name)} finished", soft_wrap=True)
                else:
                    err.print(f"point {name} ended with exit code {code}", soft_wrap=True)
                    worst = EXIT_FAILED
    except KeyboardInterrupt:
        for process, _, _ in running.values():
            with contextlib.suppress(OSError):
                process.send_signal(2)
        for process, _, _ in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
        err.print(f"interrupted; continue with `zopro sweep --resume {sweep.path}`")
        return 130
    return worst
