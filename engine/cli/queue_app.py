"""`zopro queue`: recipes and sweeps that run one after another on this machine, detached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from engine.cli.output import console, err, fail

queue_app = typer.Typer(
    help="Recipes and sweeps that run one after another on this machine, detached.",
    short_help="Queue recipes and sweeps to run one after another.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@queue_app.command("add")
def queue_add(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key: key.path=value"),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", metavar="KEY=V1,V2", help="queue a sweep: KEY=V1,V2,... (repeatable)"),
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
) -> None:
    """Queue a recipe (or, with --grid, a sweep); the queue's worker starts if none runs."""
    from engine.jobs.queue import QueueError, add, start_worker

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

    from engine.jobs.queue import load_items, worker_running

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
    from engine.jobs.queue import QueueError, cancel

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
    from engine.jobs.queue import QueueError, move

    try:
        item, place, pending = move(root, item_id, where)
    except QueueError as error:
        fail(str(error))
    console.print(f"{item.id}: pending, {place} of {pending} in line", markup=False)


@queue_app.command("work")
def queue_work(
    root: Annotated[Path, typer.Option("--root", help="folder of runs")] = Path("runs"),
    lock_fd: Annotated[int | None, typer.Option("--lock-fd", hidden=True)] = None,
) -> None:
    """Run the queue here until nothing is pending (`queue add` starts one in the background)."""
    from engine.jobs.queue import work

    raise typer.Exit(work(root, log=lambda text: print(text, flush=True), lock_fd=lock_fd))
