"""Where `zopro` writes: the console for results, the one for messages, and `fail`, the one-sentence
refusal of what a user can fix (exit code 2 unless told)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from engine.cli.exit_codes import EXIT_BAD_INPUT

UNWRAPPED_WIDTH = 200  # to a file or pipe: lines are not hard-wrapped at 80 columns (tables keep their size)


class SteadyConsole(Console):
    """A console whose reader may go away (`zopro run | head`): when its pipe closes it falls silent and the
    command goes on, instead of exiting at once as rich does: a training run is not a listing, and one
    killed by its reader would leave no trace of why."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())  # later writes (and the flush at exit) go nowhere
            os.close(devnull)
        if self.file is not sys.stderr:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(
                    "zopro: its output was closed (broken pipe); it goes on without printing (a run: until "
                    "it ends; Ctrl-C stops it after a checkpoint)\n"
                )
                sys.stderr.flush()


def _console(stderr: bool = False) -> Console:
    """A terminal's own width; to a file or a pipe (no terminal, no COLUMNS) a width no line reaches."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    width = None if terminal or os.environ.get("COLUMNS") else UNWRAPPED_WIDTH
    return SteadyConsole(stderr=stderr, highlight=False, width=width)


console = _console()
err = _console(stderr=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)
