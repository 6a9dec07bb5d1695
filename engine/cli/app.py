"""`zopro`: the headless command line (run, validate, ls, status, export). Never imports textual."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from engine.cli.choices import ExportFormat, one_of
from engine.cli.exit_codes import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK
from engine.cli.launch import embedded_recipe, start_torchrun
from engine.cli.output import console, err, fail
from engine.recipe import RecipeError, load_recipe

app = typer.Typer(
    name="zopro",
    help="Preference optimisation of language models, first-order (RLOO) and zeroth-order, from the terminal.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    recipe: Annotated[
        Path | None, typer.Argument(help="recipe TOML (default: the embedded recipes/tiny.toml)")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="where to write the run (default: ROOT/NAME-METHOD-TIME)")
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key: key.path=value (repeatable)")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="continue the run in this directory from its last checkpoint"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live progress, only the summary")] = False,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            "--nproc-per-node",
            min=1,
            help="train on N processes of this machine (N GPUs, or N CPU processes): starts torchrun for you",
        ),
    ] = 1,
) -> None:
    """Train: SFT, reward model, then iterations of policy optimisation and reward refinement."""
    from engine.cli.runner import run_training

    if nproc_per_node > 1:
        start_torchrun(nproc_per_node)

    if resume is not None:
        if recipe is not None or set_:
            fail("--resume takes the recipe saved in the run directory; drop the recipe argument and --set")
        code = run_training(None, [], run_dir=resume, resume=True, quiet=quiet, console=console, err=err)
    else:
        path = recipe if recipe is not None else embedded_recipe()
        if compare_runs_all(path):
            from engine.cli.compare import run_comparison

            if run_dir is not None:
                fail(
                    "--run-dir names one run; a [compare] run_all recipe writes one folder per method under --root"
                )
            raise typer.Exit(
                run_comparison(
                    path,
                    compare_methods_of(path),
                    set_ or [],
                    root=root,
                    quiet=quiet,
                    console=console,
                    err=err,
                )
            )
        code = run_training(
            path,
            set_ or [],
            run_dir=run_dir or None,
            root=root,
            resume=False,
            quiet=quiet,
            console=console,
            err=err,
        )
    raise typer.Exit(code)


@app.command()
def compare(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML")],
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="comma-separated (default: the recipe's [compare] methods)"),
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key: key.path=value")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run several methods of one recipe in turn (same seed, same data) and compare them."""
    from engine.cli.compare import run_comparison
    from engine.recipe import split_method_list

    chosen = split_method_list(methods) if methods else compare_methods_of(recipe)
    if len(chosen) < 2:
        fail(f"{recipe}: name at least two methods with --methods or in [compare] methods")
    raise typer.Exit(
        run_comparison(recipe, chosen, set_ or [], root=root, quiet=quiet, console=console, err=err)
    )


@app.command()
def sweep(
    recipe: Annotated[Path | None, typer.Argument(help="recipe TOML")] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid", help="a swept key and its values: KEY=V1,V2,... (repeatable: every combination)"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key for every point: key.path=value")
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    sweep_dir: Annotated[
        Path | None,
        typer.Option("--sweep-dir", help="where to write the sweep (default: ROOT/NAME-sweep-TIME)"),
    ] = None,
    parallel: Annotated[
        int, typer.Option("--parallel", help="points at a time (one per GPU when there are several)")
    ] = 1,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="continue the sweep in this directory: skip finished points"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run a recipe over a grid of settings, one run directory per point, and summarise them side by side."""
    from engine.cli.sweep import run_sweep
    from engine.rundir.sweep import SweepError, create_sweep, load_sweep

    try:
        if resume is not None:
            if recipe is not None or grid or set_ or sweep_dir is not None:
                fail(
                    "--resume takes the grid saved in the sweep directory; drop the recipe, --grid and --set"
                )
            if parallel < 1:
                fail(f"--parallel {parallel} is not accepted; it must be 1 or more")
            chosen = load_sweep(resume)
            raise typer.Exit(
                run_sweep(
                    chosen, quiet=quiet, console=console, err=err, parallel=parallel if parallel > 1 else None
                )
            )
        if recipe is None:
            fail("name a recipe: zopro sweep RECIPE --grid KEY=V1,V2 (or --resume DIR)")
        chosen = create_sweep(
            recipe, grid or [], set_ or [], root=root, sweep_dir=sweep_dir, parallel=parallel
        )
    except SweepError as error:
        fail(str(error))
    raise typer.Exit(run_sweep(chosen, quiet=quiet, console=console, err=err))


def compare_runs_all(recipe: Path) -> bool:
    import tomllib

    try:
        raw = tomllib.loads(recipe.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError):
        return False  # load_recipe reports the problem
    return isinstance(raw.get("compare"), dict) and raw["compare"].get("run_all") is True


def compare_methods_of(recipe: Path) -> list[str]:
    import tomllib

    try:
        raw = tomllib.loads(recipe.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError):
        return []
    methods = raw.get("compare", {}).get("methods", []) if isinstance(raw.get("compare"), dict) else []
    return [m for m in methods if isinstance(m, str)]


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="recipe files")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key: key.path=value")
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="print the fully resolved recipe")] = False,
) -> None:
    """Check recipes without running anything."""
    from engine.recipe import dump_recipe

    bad = 0
    for path in recipes:
        try:
            resolved = load_recipe(path, set_ or [])
        except RecipeError as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
            bad += 1
            continue
        console.print(
            f"[green]ok[/] {path}: method {resolved.policy.method}, model {resolved.model.base}, "
            f"{resolved.train.iterations} iterations x {resolved.train.updates_per_iteration} updates"
        )
        if show:
            console.print(dump_recipe(resolved), markup=False)
    raise typer.Exit(EXIT_BAD_INPUT if bad else EXIT_OK)


@app.command("ls")
def list_runs_command(
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="one JSON list instead of a table")] = False,
) -> None:
    """The runs under ROOT: name, method, status, iteration, scores."""
    from engine.rundir.alerts import alert_line
    from engine.rundir.reader import list_runs
    from engine.rundir.report import runs_table
    from engine.rundir.sweep import list_sweeps

    runs = list_runs(root)
    sweeps = list_sweeps(root)
    if as_json:  # sweeps' runs follow the others, each with "sweep": its folder's name
        listed = [r.to_json() for r in runs]
        listed += [{**r.to_json(), "sweep": s.name} for s in sweeps for r in s.runs]
        print(json.dumps(listed, indent=1, default=str))
        return
    if not runs and not sweeps:
        console.print(f"no runs under {root}/ yet: start one with `zopro run`")
        return
    if runs:
        console.print(runs_table(runs))
    for group in sweeps:
        console.print(
            f"[bold]sweep {escape(group.name)}[/]  {escape(', '.join(group.grid))}  {group.counts()}"
            + (f"  [bold red]{escape(group.error)}[/]" if group.error else ""),
            soft_wrap=True,
        )
        if group.runs:
            console.print(runs_table(group.runs))
    styles = {
        "failed": "bold red",
        "stale": "bold magenta",
        "unreadable": "bold red",
        "warning": "bold yellow",
    }
    for info in [*runs, *(r for s in sweeps for r in s.runs)]:
        alert = alert_line(info)
        if alert is not None:
            err.print(f"[{styles[alert[0]]}]{alert[0]}:[/] {escape(alert[1])}", soft_wrap=True)


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """One run's state, latest metrics and per-iteration evaluations."""
    from engine.rundir.reader import is_run_dir, read_events, run_info
    from engine.rundir.report import status_panel

    if not run_dir.is_dir() or not is_run_dir(run_dir):
        fail(f"{run_dir} is not a run directory (no status.json or events.jsonl)")
    info = run_info(run_dir)
    if info.status == "unreadable":
        fail(f"{run_dir} cannot be read: {info.error}")
    problems: list[str] = []
    evals = [e for e in read_events(run_dir, problems) if e.get("type") == "eval"]
    for problem in problems:
        err.print(f"warning: {run_dir}: {escape(problem)}", soft_wrap=True)
    if as_json:
        data = info.to_json()
        data["evaluations"] = [{"iteration": e.get("iteration"), **e.get("metrics", {})} for e in evals]
        print(json.dumps(data, indent=1, default=str))
        return
    console.print(status_panel(info, evals))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    format: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", parser=one_of(ExportFormat, "--format"), help="what to write"),
    ] = ExportFormat.csv,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file to write (default: stdout)")
    ] = None,
) -> None:
    """Write a run's metrics as CSV (one row per metrics event) or JSON."""
    from engine.rundir.reader import is_run_dir
    from engine.rundir.report import export_metrics

    if not run_dir.is_dir() or not is_run_dir(run_dir):
        fail(f"{run_dir} is not a run directory (no status.json or events.jsonl)")
    events = run_dir / "events.jsonl"
    if events.exists() and not events.is_file():
        fail(f"{events} is not a file; nothing to export")
    problems: list[str] = []
    text = export_metrics(run_dir, format.value, problems)
    for problem in problems:
        err.print(f"warning: {run_dir}: {escape(problem)}", soft_wrap=True)
    if output is None:
        sys.stdout.write(text)
    else:
        if output.is_dir():
            fail(f"--output {output} is a folder; name a file to write, such as {output / 'metrics.csv'}")
        if not output.parent.is_dir():
            fail(f"--output {output}: the folder {output.parent} does not exist; create it or choose another")
        try:
            output.write_text(text)
        except OSError as error:
            fail(f"--output {output} cannot be written ({error.strerror or error})")
        err.print(f"wrote {output}")


@app.command()
def interplay(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (finished or running)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead")] = False,
) -> None:
    """How the policy's and the reward model's updates relate, from the run's iteration checkpoints."""
    from engine.analysis.interplay_report import build_report, render_report

    if not run_dir.is_dir():
        fail(f"{run_dir} is not a run directory")
    try:
        report = build_report(run_dir)
    except ValueError as error:
        fail(str(error))
    if as_json:
        print(json.dumps(report, indent=1, default=str))
        return
    render_report(report, console, width=min(console.width, 120))


queue_app = typer.Typer(
    help="Recipes and sweeps that run one after another on this machine, detached.", no_args_is_help=True
)
app.add_typer(queue_app, name="queue")


@queue_app.command("add")
def queue_add(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key: key.path=value")
    ] = None,
    grid: Annotated[
        list[str] | None, typer.Option("--grid", help="queue a sweep: KEY=V1,V2,... (repeatable)")
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
) -> None:
    """Queue a recipe (or, with --grid, a sweep); the queue's worker starts if none runs."""
    from engine.rundir.queue import QueueError, add, start_worker

    for text in set_ or []:
        if "=" not in text:
            fail(f"--set {text!r} has no '='; write key.path=value")
    try:
        item = add(root, recipe, set_ or [], grid or [])
    except QueueError as error:
        fail(str(error))
    try:
        pid = start_worker(root)
    except OSError as error:
        fail(f"queued {item.id}, but the worker cannot start: {error.filename}: {error.strerror}")
    console.print(
        f"queued {item.id}: {escape(item.label)} -> {escape(item.target)}"
        + (f"  (worker started, pid {pid})" if pid else "  (the worker runs it in turn)"),
        soft_wrap=True,
    )


@queue_app.command("ls")
def queue_ls(
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The queue, in order: pending, running, and what ran."""
    from rich.table import Table

    from engine.rundir.queue import load_items, worker_running

    damaged: list[str] = []
    items = load_items(root, damaged)
    for problem in damaged:
        err.print(f"warning: skipped a damaged queue entry {escape(problem)}", soft_wrap=True)
    if as_json:
        print(json.dumps({"worker": worker_running(root), "items": [i.to_json() for i in items]}, indent=1))
        return
    if not items:
        console.print(f"the queue under {root}/ is empty: add with `zopro queue add RECIPE`")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("id", "state", "what", "writes to"):
        table.add_column(column, no_wrap=column != "what", overflow="ellipsis")
    for item in items:
        table.add_row(item.id, item.state, item.label, Path(item.target).name)
    console.print(table)
    console.print(f"worker: {'running' if worker_running(root) else 'idle'}")


@queue_app.command("cancel")
def queue_cancel(
    item_id: Annotated[str, typer.Argument(help="the entry's id (zopro queue ls)")],
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
) -> None:
    """Drop a pending entry, or stop a running one after a checkpoint."""
    from engine.rundir.queue import QueueError, cancel

    try:
        item = cancel(root, item_id)
    except QueueError as error:
        fail(str(error))
    console.print(f"{item.id}: {'cancelled' if item.state == 'cancelled' else 'stopping after a checkpoint'}")


@queue_app.command("move")
def queue_move(
    item_id: Annotated[str, typer.Argument(help="the entry's id")],
    where: Annotated[str, typer.Argument(help="up, down, first or last")],
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
) -> None:
    """Move a pending entry in the queue."""
    from engine.rundir.queue import QueueError, move

    try:
        move(root, item_id, where)
    except QueueError as error:
        fail(str(error))


@queue_app.command("work", hidden=True)
def queue_work(
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    lock_fd: Annotated[int | None, typer.Option("--lock-fd", hidden=True)] = None,
) -> None:
    """Run the queue until nothing is pending (started by `queue add`, which hands it the worker lock)."""
    from engine.rundir.queue import work

    raise typer.Exit(work(root, log=lambda text: print(text, flush=True), lock_fd=lock_fd))


from engine.cli.bench_app import bench_app  # noqa: E402 - registered after the commands above

app.add_typer(bench_app, name="bench")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
