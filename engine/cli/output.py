"""Where `zopro` writes: the console for results, the one for messages, and `fail`, the one-sentence
refusal of what a user can fix (exit code 2 unless told)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from engine.cli.exit_codes import EXIT_BAD_INPUT

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)
