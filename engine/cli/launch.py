"""Where `zopro run` starts from: the embedded default recipe, and torchrun for `--nproc-per-node`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from engine.cli.output import fail
from engine.jobs.command import engine_command


def start_torchrun(nproc: int) -> None:
    """Replace this process by `torchrun --standalone --nproc-per-node N` running the same command
    without the option (one machine; several machines: run torchrun yourself, README)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("--nproc-per-node is for starting a run; under torchrun already, drop it")
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            args.append(arg)
    command = engine_command(args, nproc=nproc, isolated=False)
    sys.stdout.flush()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its banner
    os.execv(sys.executable, command)


def embedded_recipe() -> Path:
    """recipes/tiny.toml from the source tree, or the copy shipped inside the package."""
    package = Path(__file__).resolve().parents[1]  # engine/
    for candidate in (package.parent / "recipes" / "tiny.toml", package / "recipes" / "tiny.toml"):
        if candidate.exists():
            return candidate
    fail("the embedded recipe recipes/tiny.toml is missing from this installation; pass a recipe file")
    raise AssertionError
