"""What a headless run shows while it trains: the live progress line in a terminal, one plain line per
stage and evaluation in a pipe, and the one-line form of a warning."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.rundir.progress import eta_seconds, steps_per_second
from engine.rundir.report import fmt_duration, fmt_value, fmt_with_se, stage_end_text
from engine.rundir.wording import FIXED_RM_METRIC, iteration_text, short_iteration


class ProgressView:
    """The live line: stage, iteration, step, reward-model score, gold, KL, steps/s, ETA."""

    def __init__(self, total_steps: int, iterations: int, method: str, run_dir: Path):
        self.total_steps, self.iterations, self.method, self.run_dir = (
            total_steps,
            iterations,
            method,
            run_dir,
        )
        self.event: dict = {}
        self.latest: dict = {}
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.stage_title = "loading"
        self.warnings = 0
        self.last_warning = ""

    def on_event(self, event: dict) -> None:
        self.event = event
        self.latest.update(event.get("metrics", {}))
        if event.get("type") == "stage_start":
            self.stage_title = event.get("message", event.get("stage", ""))
        if event.get("type") == "warning":
            self.warnings += 1
            self.last_warning = event.get("code", "")
        if event.get("type") == "resume":  # the resumed run re-emits what came after its checkpoint
            self.warnings = event.get("warning_count", 0)
        if self.first_step is None:
            self.first_step = event.get("global_step", 0)
            self.started = time.monotonic()

    def rate(self) -> float | None:
        done = self.event.get("global_step", 0) - (self.first_step or 0)
        return steps_per_second(done, time.monotonic() - self.started)

    def __rich_console__(self, console: Console, options) -> Iterator[Table]:
        """The cells that fit the terminal's width: the rate, then the method, then the word `step` go
        first, so that the scores and the ETA are never cut."""
        e, m = self.event, self.latest
        step = e.get("global_step", 0)
        rate = self.rate()
        eta = eta_seconds(self.total_steps, step, rate)
        iteration = e.get("iteration")
        cells = [  # (text, style, rank: the highest goes first when the line is too long)
            (self.method, "bold cyan", 2),
            (e.get("stage", "loading"), "bold", 0),
            (short_iteration(iteration, self.iterations) or f"it -/{self.iterations}", "", 0),
            (f"step {step}/{self.total_steps}", "", 1),
            (f"RM score {fmt_value(m.get('objective/scores'), 2)}", "", 0),
            (f"gold {fmt_value(m.get('eval/gold'), 3)}", "green", 0),
            (f"KL {fmt_value(m.get('objective/kl'), 2)}", "", 0),
            (f"{rate:.1f} st/s" if rate else "- st/s", "dim", 3),
            (f"ETA {fmt_duration(eta)}", "", 0),
        ]
        if self.warnings:
            plural = "s" if self.warnings > 1 else ""
            cells.append(
                (f"! {self.warnings} warning{plural} {self.last_warning}".rstrip(), "bold yellow", 0)
            )
        while sum(len(text) + 1 for text, _, _ in cells) - 1 > options.max_width:
            rank = max(rank for _, _, rank in cells)
            if rank == 0:
                break
            cells = [cell for cell in cells if cell[2] != rank]
        grid = Table.grid(padding=(0, 1))
        for _ in cells:
            grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row(*(Text(text, style=style) for text, style, _ in cells))
        yield grid


def warning_line(event: dict) -> str:
    """One line for a `warning` event: where, the code and the message."""
    iteration = event.get("iteration")
    where = iteration_text(iteration) if iteration is not None else event.get("stage", "")
    return f"warning [{event.get('code', '?')}] {where}: {event.get('message', '')}"


def plain_line(event: dict, view: ProgressView, console: Console) -> None:
    """Without a terminal (CI, pipes, logs): one line per stage and per evaluation; none for the stages a
    run adopts from another (`--stages-from`: the `resume` line names them)."""
    kind = event.get("type")
    if event.get("adopted"):
        return
    when = f"[{fmt_duration(event.get('elapsed'))}]"
    if kind == "stage_start":
        console.print(f"{when} {event.get('message')}", markup=False, soft_wrap=True)
    elif kind == "stage_end" and event.get("paused_s"):
        console.print(f"{when}   {stage_end_text(event)}", markup=False, soft_wrap=True)
    elif kind == "paused":
        console.print(
            f"{when}   paused by a request in {view.run_dir / 'control'}; it waits for a `resume` request "
            "(the TUI, or a file named resume there)",
            markup=False,
            soft_wrap=True,
        )
    elif kind == "resumed":
        console.print(f"{when}   resumed", markup=False, soft_wrap=True)
    elif kind == "eval":
        m = event.get("metrics", {})
        console.print(
            f"{when}   eval: gold {fmt_with_se(m.get('eval/gold'), m.get('eval/gold_se'))}  "
            f"win vs SFT {fmt_with_se(m.get('eval/win_rate_vs_sft'), m.get('eval/win_rate_vs_sft_se'))}  "
            f"fixed-RM score {fmt_value(m.get(FIXED_RM_METRIC))}  "
            f"RM score {fmt_value(m.get('eval/reward'))}  "
            f"KL {fmt_value(m.get('eval/kl'))}",
            markup=False,
            soft_wrap=True,
        )
