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
from engine.recipe import FIRST_ORDER_METHODS, ZEROTH_ORDER_METHODS, RecipeError, load_recipe

app = typer.Typer(
    name="zopro",
    help=(
        "Preference optimisation of language models from the terminal: SFT, a reward model, then "
        f"iterations of policy optimisation with a first-order method ({', '.join(FIRST_ORDER_METHODS)}) "
        f"or a zeroth-order one ({', '.join(ZEROTH_ORDER_METHODS)}), each followed by refining the reward "
        "model. Pick the method with policy.method in the recipe or --set policy.method=NAME; watch runs "
        "with zopro-tui."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without type tags (<bool>), no boxes that wrap at 80 columns
)


@app.command(
    short_help="Train a recipe with any method (policy.method).",
    help=(
        "Train: SFT, a reward model, then iterations of policy optimisation (policy.method: "
        f"{', '.join(FIRST_ORDER_METHODS)}, or zeroth-order {', '.join(ZEROTH_ORDER_METHODS)}) and "
        "reward-model refinement."
    ),
)
def run(
    recipe: Annotated[
        Path | None, typer.Argument(help="recipe TOML (default: the embedded recipes/tiny.toml)")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="where to write the run (default: ROOT/NAME-METHOD-TIME)")
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key: key.path=value (repeatable)"),
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
            metavar="N",
            help="train on N processes of this machine (N GPUs, or N CPU processes): starts torchrun for you",
        ),
    ] = 1,
    stages_from: Annotated[
        Path | None,
        typer.Option(
            "--stages-from",
            metavar="RUN",
            help="take the SFT and reward models of RUN (same seed, model, task, data, sft, reward and eval "
            "settings; any method) instead of training them again",
        ),
    ] = None,
) -> None:
    """Train a recipe (the command's help says how)."""
    from engine.cli.runner import run_training

    if nproc_per_node > 1:
        start_torchrun(nproc_per_node)

    if resume is not None:
        if recipe is not None or set_:
            fail("--resume takes the recipe saved in the run directory; drop the recipe argument and --set")
        if stages_from is not None:
            fail("--stages-from starts a new run; a resumed run already has its stages")
        code = run_training(None, [], run_dir=resume, resume=True, quiet=quiet, console=console, err=err)
    else:
        path = recipe if recipe is not None else embedded_recipe()
        if compare_runs_all(path):
            from engine.cli.compare import run_comparison

            if run_dir is not None or stages_from is not None:
                fail(
                    "--run-dir and --stages-from name one run; a [compare] run_all recipe writes one folder per "
                    "method under --root (and trains the SFT and reward stages once)"
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
            stages_from=stages_from,
        )
    raise typer.Exit(code)


@app.command(short_help="Run several methods of one recipe and compare them.")
def compare(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML")],
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="comma-separated (default: the recipe's [compare] methods)"),
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key: key.path=value"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live progress, only the summary")] = False,
    share_stages: Annotated[
        bool,
        typer.Option(
            "--share-stages/--no-share-stages",
            help="train the SFT and reward models once and start every method from them (the same models "
            "each method would train itself: same seed and settings)",
        ),
    ] = True,
) -> None:
    """Run several methods of one recipe in turn (same seed, same data) and compare them."""
    from engine.cli.compare import run_comparison
    from engine.recipe import split_method_list

    chosen = split_method_list(methods) if methods else compare_methods_of(recipe)
    if len(chosen) < 2:
        fail(f"{recipe}: name at least two methods with --methods or in [compare] methods")
    raise typer.Exit(
        run_comparison(
            recipe,
            chosen,
            set_ or [],
            root=root,
            quiet=quiet,
            console=console,
            err=err,
            share_stages=share_stages,
        )
    )


@app.command(short_help="Run a recipe over a grid of settings.")
def sweep(
    recipe: Annotated[Path | None, typer.Argument(help="recipe TOML")] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            metavar="KEY=V1,V2",
            help="a swept key and its values: KEY=V1,V2,... (repeatable: every combination)",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="override a recipe key for every point: key.path=value"
        ),
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live progress, only the summary")] = False,
) -> None:
    """Run a recipe over a grid of settings, one run directory per point, and summarise them side by side."""
    from engine.cli.sweep import run_sweep
    from engine.jobs.sweep import SweepError, create_sweep, load_sweep

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
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key: key.path=value"),
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="print the fully resolved recipe")] = False,
) -> None:
    """Check recipes without running anything."""
    from engine.data.files import recipe_data_problem
    from engine.recipe import dump_recipe
    from engine.rundir.wording import plural

    bad = 0
    for path in recipes:
        try:
            resolved = load_recipe(path, set_ or [])
            problem = recipe_data_problem(resolved)
            if problem is not None:
                raise RecipeError(f"{path}: {problem}")
        except RecipeError as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
            bad += 1
            continue
        console.print(
            f"[green]ok[/] {path}: method {resolved.policy.method}, model {resolved.model.base}, "
            f"{plural(resolved.train.iterations, 'iteration')} x "
            f"{plural(resolved.train.updates_per_iteration, 'update')}"
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
    from engine.jobs.sweep import list_sweeps
    from engine.rundir.alerts import alert_line
    from engine.rundir.reader import list_runs
    from engine.rundir.report import runs_table

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
        console.print(runs_table(runs, console.width))
    for group in sweeps:
        console.print(
            f"[bold]sweep {escape(group.name)}[/]  {escape(', '.join(group.grid))}  {group.counts()}"
            + (f"  [bold red]{escape(group.error)}[/]" if group.error else ""),
            soft_wrap=True,
        )
        if group.runs:
            console.print(runs_table(group.runs, console.width))
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
    samples: Annotated[
        int, typer.Option("--samples", "-s", min=0, help="also show the newest N samples in full")
    ] = 0,
) -> None:
    """One run's state, latest metrics and per-iteration evaluations (and its newest samples)."""
    from engine.cli.samples_view import samples_view
    from engine.rundir.reader import is_run_dir, latest_samples, read_events, run_info
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
    rows = latest_samples(run_dir) if samples else []
    if as_json:
        data = info.to_json()
        data["evaluations"] = [{"iteration": e.get("iteration"), **e.get("metrics", {})} for e in evals]
        if samples:
            data["samples"] = rows[:samples]
        print(json.dumps(data, indent=1, default=str))
        return
    console.print(status_panel(info, evals))
    if samples:
        console.print(samples_view(rows, samples))


@app.command(short_help="Write a run's metrics as CSV or JSON.")
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    format: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", parser=one_of(ExportFormat, "--format"), help="what to write"),
    ] = ExportFormat.csv,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file to write (default: stdout)")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="write the trained model to this new folder instead of the metrics"),
    ] = None,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="with --model: iter-N, latest, sft or reward")
    ] = "latest",
    merge: Annotated[
        bool,
        typer.Option(
            "--merge", help="with --model: fold the LoRA into the base (a plain transformers model)"
        ),
    ] = False,
    reward: Annotated[
        bool,
        typer.Option("--reward", help="with --model: the reward model, as a sequence-classification model"),
    ] = False,
) -> None:
    """Write a run's metrics as CSV (one row per metrics event) or JSON; with --model, the trained policy
    (a peft adapter, or merged with --merge) or the reward model (--reward) with a model card."""
    from engine.rundir.reader import is_run_dir
    from engine.rundir.report import export_metrics

    if model is not None:
        from engine.cli.after_training import export_model_command

        if output is not None:
            fail("--model writes a folder; drop --output (or --model to export the metrics)")
        export_model_command(run_dir, model, checkpoint, merge, reward)
        return
    if merge or reward or checkpoint != "latest":
        fail("--checkpoint, --merge and --reward go with --model DIR (the folder to write the model to)")
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


@app.command(short_help="How the policy's and the reward model's updates relate.")
def interplay(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (finished or running)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead")] = False,
) -> None:
    """How the policy's and the reward model's updates relate, from the run's iteration checkpoints."""
    from engine.export.interplay_report import build_report, render_report

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


from engine.cli.after_training_app import generate, plot, report  # noqa: E402 - in their own module

for command in (generate, plot, report):
    app.command()(command)

from engine.cli.bench_app import bench_app  # noqa: E402 - registered after the commands above
from engine.cli.queue_app import queue_app  # noqa: E402

app.add_typer(queue_app, name="queue")
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
