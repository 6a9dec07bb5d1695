"""The training loop of one run, method.md section 1, top to bottom: SFT, the reward model, then for each
iteration policy optimisation, judge and refine, keep close, evaluate. `train` is the loop; `start` and
`resume` are its two ways in. Bookkeeping (events, status, checkpoints, signals, control requests) is
`run.book`; every stage continues from the step its checkpoint holds, and `book.begin(stage)` is false
for the stages a resumed run has already done."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time

import torch

from engine import __version__
from engine.errors import StopRun
from engine.recipe import dump_recipe
from engine.rundir.files import RunDirError, atomic_write_json, atomic_write_text
from engine.rundir.writer import checkpoint_candidates, iteration_checkpoint_name
from engine.training.evaluation import evaluate, watch
from engine.training.run import CheckpointUnreadable, Run
from engine.training.stages import (
    iteration_metrics,
    next_iteration,
    optimise_policy,
    refine_reward_model,
    supervised_fine_tuning,
    train_reward_model,
)


def train(run: Run) -> None:
    book = run.book
    with book.running():  # signals stop it cleanly; the end (finished or stopped) is recorded
        # 1. supervised fine-tuning on (prompt, chosen): the reference policy for KL
        if book.begin("sft"):
            supervised_fine_tuning(run)
            run.pm.copy_adapter("sft", "policy")  # the policy starts as a copy of the SFT model
            book.end_stage(checkpoint="sft")
        # 2. the Bradley-Terry reward model; then the SFT policy's held-out evaluation, the baseline
        if book.begin("reward"):
            train_reward_model(run)
            evaluate(run, label="sft")
            run.remember_adapters(-1)  # where iteration 0 starts (ZOPrO's adapter history)
            book.end_stage(checkpoint="reward")
        # 3. iterations i = 0 .. N-1, each on its own chunk of the training prompts
        while not book.done:
            i = run.state.iteration
            # a. policy optimisation with the chosen method (rloo, ppo, online_dpo, mezo, zopro)
            if book.begin("policy"):
                optimise_policy(run)
                book.end_stage()
            # b-f. least-confident rollouts, a second answer, the judge, reward refinement, keep close
            if book.begin("refine"):
                refine_reward_model(run)
                book.end_stage()
            # held-out evaluation; the watchdog warns, and policy.max_kl stops the run or rolls it back
            if book.begin("eval"):
                iteration_metrics(run)
                runaway = watch(run, evaluate(run, label=f"iter {i}"))
                if runaway and run.recipe.policy.max_kl_action == "rollback":
                    run.roll_back(i, runaway)  # the previous iteration's checkpoint ends the run
                    break
                run.remember_adapters(i)
                next_iteration(run)
                checkpoint = iteration_checkpoint_name(i)
                book.end_stage(checkpoint=checkpoint)
                if runaway:
                    raise StopRun(f"{runaway}; the run stopped after checkpoint {checkpoint}", failed=True)


def start(run: Run) -> None:
    """A new run: write the resolved recipe and meta, then train."""
    book, recipe = run.book, run.recipe
    path = book.writer.path
    meta = {
        "zopro": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": str(run.device),
        "seed": run.seed,
        "pid": os.getpid(),
        "started": time.time(),
        "method": recipe.policy.method,
        "base": run.pm.base_path,
        "argv": sys.argv,
    }
    with contextlib.suppress(ImportError):
        import peft
        import transformers  # noqa: E401

        meta.update(transformers=transformers.__version__, peft=peft.__version__)
    if run.device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(run.device)
    if run.dist.enabled:
        meta.update(world_size=run.dist.world_size, backend=run.dist.backend)
    if run.dist.is_main:  # rank 0 writes the run directory
        atomic_write_text(path / "recipe.toml", dump_recipe(recipe))
        atomic_write_json(path / "meta.json", meta)
    book.writer.update_status(
        state="running",
        method=recipe.policy.method,
        started=meta["started"],
        iterations=recipe.train.iterations,
        total_steps=run.total_steps,
        name=path.name,
    )
    report = run.data_report
    book.emit(
        "run_start",
        recipe=recipe.to_dict(),
        total_steps=run.total_steps,
        world_size=run.dist.world_size,
        **({"data": report.as_dict()} if report is not None else {}),
    )
    train(run)


def _fit_iterations(run: Run, checkpoint) -> None:
    """train.iterations in recipe.toml lowered below where the checkpoint is: exactly at an iteration's
    start, the run is done there (it finishes, training nothing); inside or past it, RunDirError."""
    state, iterations = run.state, run.recipe.train.iterations
    if checkpoint is None or state.stage == "done" or state.iteration < iterations:
        return
    if state.iteration == iterations and state.stage == "policy" and state.step == 0:
        state.stage = "done"
        return
    raise RunDirError(
        f"{run.book.writer.path / 'recipe.toml'} sets train.iterations = {iterations}, but checkpoint "
        f"{checkpoint.name} is already in iteration {state.iteration + 1}; set train.iterations to "
        f"{state.iteration + 1} or more to continue (nothing was changed)"
    )


def resume(run: Run) -> None:
    """Continue from the newest intact checkpoint: same data order, same sampling, same directions.
    One that cannot be read is skipped (and named); with none left, RunDirError and nothing changes."""
    book = run.book
    candidates = checkpoint_candidates(book.writer.path)
    skipped: list[str] = []
    checkpoint = None
    for folder in candidates:
        try:
            run.load_checkpoint(folder)
        except CheckpointUnreadable as error:
            skipped.append(f"{folder.name} ({error})")
            continue
        checkpoint = folder
        break
    if candidates and checkpoint is None:
        raise RunDirError(
            f"no checkpoint in {book.writer.checkpoints_dir} can be read ({'; '.join(skipped)}); "
            "nothing was changed: start a new run"
        )
    _fit_iterations(run, checkpoint)
    book.writer.load_status()
    book.writer.seq = run.state.event_seq if checkpoint is not None else 0
    book.writer.update_status(
        state="running",
        error=None,
        pid=os.getpid(),
        warnings=run.state.warnings,
        warning_count=run.state.warning_count,
    )
    world, before = run.dist.world_size, run.state.world_size
    changed = checkpoint is not None and world != before
    book.emit(
        "resume",
        rewind_to_seq=book.writer.seq,
        checkpoint=checkpoint.name if checkpoint is not None else None,
        warning_count=run.state.warning_count,
        world_size=world,
        **({"skipped": skipped} if skipped else {}),
        **({"previous_world_size": before} if changed else {}),
        message=(
            f"resuming from checkpoint {checkpoint.name}"
            if checkpoint is not None
            else "no checkpoint yet: starting again from the first SFT step"
        )
        + (f"; skipped {', '.join(skipped)}" if skipped else "")
        + (
            f"; on {world} rank{'s' if world > 1 else ''} where it ran on {before}: the global batch is "
            "the same, so updates mean the same, but sampling on other batch shapes is not bit-identical"
            if changed
            else ""
        ),
    )
    train(run)
