"""The command lines that start the engine in another process, written once: `python -m engine.cli ...`
(`engine_command`) and a run, new or resumed (`run_command`), on one process or under torchrun. The TUI,
the queue's worker, sweeps, `zopro run --nproc-per-node` and `zopro bench distributed` all build theirs
here. Torch-free."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path


def engine_command(args: Iterable[str], *, nproc: int = 1, isolated: bool = True) -> list[str]:
    """`python [-P] -m engine.cli ARGS`; with `nproc` > 1 under `torchrun --standalone --nproc-per-node N`.
    `isolated` (-P): the current folder is not put on the module path, so a folder named `engine` there
    cannot stand in for the installed engine (for processes started from wherever the user is)."""
    python = [sys.executable, "-P"] if isolated else [sys.executable]
    if nproc > 1:
        python += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*python, "-m", "engine.cli", *args]


def run_command(
    recipe: str | Path | None = None,
    *,
    run_dir: str | Path,
    resume: bool = False,
    overrides: Iterable[str] = (),
    nproc: int = 1,
    isolated: bool = True,
) -> list[str]:
    """`zopro run RECIPE --run-dir DIR --quiet --set ...` for a new run, or `zopro run --resume DIR --quiet`
    to continue one (which takes the recipe saved in DIR, so `recipe` and `overrides` are not passed)."""
    if resume:
        args = ["run", "--resume", str(run_dir), "--quiet"]
    else:
        if recipe is None:
            raise ValueError("a new run needs a recipe")
        args = ["run", str(recipe), "--run-dir", str(run_dir), "--quiet"]
        for override in overrides:
            args += ["--set", override]
    return engine_command(args, nproc=nproc, isolated=isolated)
