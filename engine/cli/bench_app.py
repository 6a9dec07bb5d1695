"""`zopro bench ...`: the benchmark commands (each prints JSON; the work is in engine.cli.bench and
engine.cli.bench_distributed)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from engine.cli.choices import Device, DType, one_of
from engine.cli.launch import embedded_recipe
from engine.cli.output import err, fail
from engine.recipe import RecipeError, load_recipe

bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True, rich_markup_mode=None)


@bench_app.command("methods")
def bench_methods(
    model: Annotated[
        str, typer.Option("--model", help="base model (builtin:NAME, hub id or folder)")
    ] = "builtin:base10m",
    methods: Annotated[
        str, typer.Option("--methods", help="comma-separated")
    ] = "rloo,ppo,online_dpo,mezo,zopro",
    prompts: Annotated[int, typer.Option("--prompts", help="prompts per update")] = 16,
    samples: Annotated[int, typer.Option("--samples", help="answers per prompt")] = 4,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="response length")] = 48,
    updates: Annotated[int, typer.Option("--updates", help="timed updates per method")] = 5,
    dtype: Annotated[DType, typer.Option("--dtype", parser=one_of(DType, "--dtype"))] = DType.float32,
    device: Annotated[
        Device, typer.Option("--device", parser=one_of(Device, "--device"), help="where the workers run")
    ] = Device.auto,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads per worker (0: default)")] = 0,
    checkpointing: Annotated[
        str, typer.Option("--checkpointing", help="model.gradient_checkpointing: auto, on or off")
    ] = "auto",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="also write the results to this file")
    ] = None,
) -> None:
    """Peak memory of the policy-update phase, time per update and forward passes per update, per method,
    each in a fresh process."""
    from engine.cli.bench import BENCH_METHODS, BenchConfig, bench_table, run_methods
    from engine.recipe import RecipeError, apply_overrides, recipe_from_dict, split_method_list, split_variant

    chosen = split_method_list(methods)
    unknown = [m for m in chosen if split_variant(m)[0] not in BENCH_METHODS]
    if unknown:
        fail(
            f"--methods: unknown {', '.join(unknown)}; accepted: {', '.join(BENCH_METHODS)}, each optionally "
            'with settings of its section ("zopro:sampler=subspace")'
        )
    if checkpointing not in ("auto", "on", "off"):
        fail(f"--checkpointing {checkpointing!r}: accepted: auto, on, off")
    for entry in chosen:
        method, variant = split_variant(entry)
        try:
            recipe_from_dict(apply_overrides({"policy": {"method": method}}, variant), f"--methods {entry}")
        except RecipeError as error:
            fail(str(error))
    config = BenchConfig(
        model=model,
        prompts=prompts,
        samples_per_prompt=samples,
        max_new_tokens=new_tokens,
        updates=updates,
        dtype=dtype.value,
        device=device.value,
        threads=threads,
        gradient_checkpointing=checkpointing,
    )
    with (
        err.status(f"benchmarking {', '.join(chosen)} on {model}…")
        if err.is_terminal
        else contextlib.nullcontext()
    ):
        report = run_methods(chosen, config)
    err.print(bench_table(report))
    text = json.dumps(report, indent=1)
    if json_path is not None:
        json_path.write_text(text + "\n")
    print(text)


@bench_app.command("all")
def bench_all(
    only: Annotated[
        str,
        typer.Option(
            "--only", help="comma-separated: demo, learning, methods, large_vocab, trl, distributed, tui_open"
        ),
    ] = "demo,learning,methods,large_vocab,trl,distributed,tui_open",
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="tiny shapes: checks the machinery; the figures mean nothing (needs --out)"
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="folder of figures.json and figures.md (default: docs/)")
    ] = None,
) -> None:
    """Every performance and learning figure the README quotes, regenerated on the current code into
    docs/figures.json and docs/figures.md, dated, with the commit (bench/all.py of a source checkout)."""
    import subprocess
    import sys

    import engine

    script = Path(engine.__file__).resolve().parents[1] / "bench" / "all.py"
    if not script.exists():
        fail(
            f"zopro bench all runs the repository's bench/ scripts, and {script} is missing: run it from a source checkout (pip install -e .)"
        )
    command = [sys.executable, str(script), "--only", only, *(["--quick"] if quick else [])]
    command += ["--out", str(out.resolve())] if out is not None else []
    raise typer.Exit(subprocess.call(command))


@bench_app.command("distributed")
def bench_distributed(
    recipe: Annotated[
        Path | None, typer.Argument(help="recipe TOML (default: the embedded recipes/tiny.toml)")
    ] = None,
    methods: Annotated[str, typer.Option("--methods", help="comma-separated")] = "rloo,zopro",
    nproc: Annotated[int, typer.Option("--nproc-per-node", min=2, help="the ranks to compare with one")] = 2,
    updates: Annotated[int, typer.Option("--updates", min=1, help="policy updates per iteration")] = 4,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key (repeatable)")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="also write the results to this file")
    ] = None,
) -> None:
    """Bytes communicated and time per policy update with 1 and N ranks (torchrun; gloo on CPU),
    for a first-order and a zeroth-order method: real short runs, read back from their events."""
    from engine.cli.bench_distributed import run_distributed_bench

    path = recipe if recipe is not None else embedded_recipe()
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        for method in chosen:
            load_recipe(path, [f"policy.method={method}", *(set_ or [])])
    except RecipeError as error:
        fail(str(error))
    with err.status("benchmarking ranks…") if err.is_terminal else contextlib.nullcontext():
        report = run_distributed_bench(path, chosen, [1, nproc], updates, set_ or [])
    text = json.dumps(report, indent=1)
    if json_path is not None:
        json_path.write_text(text + "\n")
    print(text)
