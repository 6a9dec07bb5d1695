"""A run that starts at iteration 1 from another run's SFT model and reward model (`zopro run --stages-from
RUN`; `zopro compare` trains them once per comparison): docs/architecture.md, "Shared stages".

The SFT and reward stages, and the SFT policy's held-out evaluation that ends them, read only the recipe's
`SHARED_KEYS`; two runs that agree on those compute the same adapters, optimiser states, events and samples
up to the `reward` checkpoint, whatever their policy method. So a run may adopt them from another: its
folder gets the other run's `sft` and `reward` checkpoints with the policy side (the method's state, the KL
controller, the refinement optimiser, the interplay tracker) made fresh for its own recipe, the other's
events and samples up to that checkpoint, and then continues as a resumed run does. What it holds is what
its own SFT and reward stages would have written: a run with shared stages resumes, exports and reads like
any other, and its clock and compute counters include the stages it adopted."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.recipe import Recipe, RecipeError, load_recipe
from engine.rundir.checkpoints import iteration_checkpoint_name
from engine.rundir.files import atomic_write_text
from engine.rundir.reader import read_events
from engine.rundir.safe_io import checked_inside, plain_tree, read_inside

# what the SFT stage, the reward stage and the SFT policy's evaluation read of a recipe
SHARED_KEYS = ("seed", "device", "threads", "model", "task", "data", "sft", "reward", "eval")
ADOPTED_CHECKPOINTS = ("sft", iteration_checkpoint_name(-1))
# trainer_state.pt entries that belong to the policy side: replaced by the adopting run's own, fresh ones
POLICY_SIDE = ("method", "kl_controller", "refine_optimizer", "interplay")
MAX_FILE_BYTES = 1 << 34


class StagesError(ValueError):
    """The run named to share its stages cannot: one sentence naming it and what is wrong."""


@dataclass
class StagesSource:
    """A run whose SFT and reward stages another run adopts: its folder and its `reward` checkpoint's place
    in its event stream."""

    path: Path
    event_seq: int  # the `reward` checkpoint's event: what came before it is adopted
    global_step: int


def first_difference(mine: object, theirs: object, key: str = "") -> str | None:
    """The first dotted key where two plain recipe values differ (None when equal)."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for name in sorted(set(mine) | set(theirs)):
            found = first_difference(mine.get(name), theirs.get(name), f"{key}.{name}" if key else name)
            if found is not None:
                return found
        return None
    return None if mine == theirs else key


def stages_difference(mine: dict, theirs: dict) -> str | None:
    """The first shared key where two recipes (as plain dicts) differ; None when the SFT and reward stages
    of a run of one are those a run of the other would train."""
    for name in SHARED_KEYS:
        key = first_difference(mine[name], theirs[name], name)
        if key is not None:
            return key
    return None


def stages_source(run_dir: Path, recipe: Recipe) -> StagesSource:
    """Check that `run_dir` holds a complete `reward` checkpoint of a run that agrees with `recipe` on every
    shared key; StagesError (one sentence) otherwise."""
    flag = f"--stages-from {run_dir}"
    try:
        checked_inside(run_dir, run_dir / "recipe.toml")
    except FileNotFoundError:
        raise StagesError(f"{flag}: not a run directory (it has no recipe.toml)") from None
    except OSError as error:
        raise StagesError(f"{flag}: its recipe.toml {error.strerror}") from None
    try:
        theirs = load_recipe(run_dir / "recipe.toml").to_dict()
    except RecipeError as error:
        raise StagesError(f"{flag}: its recipe cannot be read ({error})") from None
    key = stages_difference(recipe.to_dict(), theirs)
    if key is not None:
        raise StagesError(
            f"{flag}: its {key} differs from this recipe's, and the SFT and reward stages can only be "
            f"shared by runs that agree on {', '.join(SHARED_KEYS)}"
        )
    folder = run_dir / "checkpoints" / iteration_checkpoint_name(-1)
    try:
        state = json.loads(read_inside(run_dir, folder / "state.json", 1 << 24))
    except (OSError, ValueError, RecursionError):
        raise StagesError(
            f"{flag}: it has no complete reward checkpoint yet (checkpoints/reward/state.json); its reward "
            "stage must have finished"
        ) from None
    if not isinstance(state, dict) or (state.get("stage"), state.get("iteration"), state.get("step")) != (
        "policy",
        0,
        0,
    ):
        raise StagesError(f"{flag}: checkpoints/reward is not where its reward stage ended")
    seq, step = state.get("event_seq"), state.get("global_step")
    if not isinstance(seq, int) or not isinstance(step, int):
        raise StagesError(f"{flag}: checkpoints/reward/state.json has no event position")
    for name in ADOPTED_CHECKPOINTS:
        plain_files(run_dir / "checkpoints" / name, flag)
    return StagesSource(path=run_dir, event_seq=seq, global_step=step)


def plain_files(folder: Path, flag: str) -> list[Path]:
    """The files below `folder`, relative; StagesError when it or anything in it is a link or a special file
    (a run folder must never make zopro read or write elsewhere)."""
    try:
        return plain_tree(folder)
    except FileNotFoundError:
        raise StagesError(f"{flag}: it has no checkpoints/{folder.name}") from None
    except OSError as error:
        where = Path(error.filename).relative_to(folder.parent.parent) if error.filename else folder.name
        raise StagesError(f"{flag}: {where} {error.strerror}; nothing was copied") from None


def adopt_stages(run, source: StagesSource) -> None:
    """Copy the source's SFT and reward stages into `run`'s freshly opened folder (its `run_start` and
    meta.json written): checkpoints with this run's policy side (the `reward` one last, so `latest` names
    it), then the events and samples before the `reward` checkpoint.
    Rank 0 writes; the others wait, and all then reopen the folder as a resume does."""
    book = run.book
    writer = book.writer
    flag = f"--stages-from {source.path}"
    if run.dist.is_main:
        fresh = {
            "method": run.method.state_dict(),
            "kl_controller": run.kl_controller.state_dict(),
            "refine_optimizer": run.refine_optimizer.state_dict(),
            "interplay": run.interplay.state_dict() if run.interplay is not None else None,
        }
        for name in ADOPTED_CHECKPOINTS:
            origin = source.path / "checkpoints" / name
            with writer.checkpoint(name) as folder:
                for relative in plain_files(origin, flag):
                    data = read_inside(source.path, origin / relative, MAX_FILE_BYTES)
                    if relative == Path("trainer_state.pt"):
                        trainer = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                        trainer.update(fresh)
                        buffer = io.BytesIO()
                        torch.save(trainer, buffer)
                        data = buffer.getvalue()
                    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                    (folder / relative).write_bytes(data)
        for event in read_events(source.path):
            if 0 < event["seq"] < source.event_seq and event["type"] not in ("run_start", "resume"):
                writer.append_event(event)
                if book.listener is not None:  # marked, so a live printer need not show it as happening now
                    book.listener({**event, "adopted": True})
        for samples in sorted(source.path.glob("samples/samples-*.jsonl")):
            step = samples.stem.removeprefix("samples-")
            if step.isdigit() and int(step) <= source.global_step:
                try:  # through no link: a linked samples folder or file is not copied
                    text = read_inside(source.path, samples, 1 << 30).decode()
                except OSError:
                    continue
                atomic_write_text(writer.samples_dir / samples.name, text)
    run.dist.barrier()
