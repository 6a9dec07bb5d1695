"""The commands for what a run leaves: `zopro export --model`, `generate`, `plot` and `report` (the bodies;
`engine.cli.app` defines the options). Errors are one sentence and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from engine.cli.output import console, err, fail


def export_model_command(run_dir: Path, target: Path, checkpoint: str, merge: bool, reward: bool) -> None:
    from engine.export.checkpoints import ExportError
    from engine.export.model_export import export_model

    if merge and reward:
        fail("--reward writes the reward model merged into its base already; drop --merge")
    try:
        result = export_model(run_dir, target, checkpoint=checkpoint, merge=merge, reward=reward)
    except ExportError as error:
        fail(str(error))
    what = {"adapter": "policy adapter", "merged": "merged policy", "reward": "reward model"}[result.kind]
    console.print(
        f"wrote the {what} of {escape(result.checkpoint)} to {escape(str(result.path))}", soft_wrap=True
    )
    for note in result.notes:
        err.print(f"note: {escape(note)}", soft_wrap=True)
