"""The bookkeeping beside the training loop: `RunBook` opens a new run directory or reopens one from its
newest readable checkpoint, turns what the loop does into the run directory's events, status, warnings
and checkpoints (through its `RunWriter`), and answers control requests and signals between steps. It holds
the run's typed state (`RunState`) and never trains anything."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.errors import StopRun, TrainingFailed
from engine.recipe import Recipe, dump_recipe
from engine.rundir.checkpoints import checkpoint_candidates, iteration_checkpoint_name
from engine.rundir.files import RunDirError
from engine.rundir.wording import ITERATION_STAGES, checkpoint_phrase, stage_message
from engine.rundir.writer import RunWriter
from engine.training.distributed import Distributed
from engine.training.run_state import STATUS_WARNINGS, RunState
from engine.training.telemetry import Counters, Stopwatch, memory_metrics, peak_rss_mib, reset_peak


class CheckpointUnreadable(ValueError):
    """A checkpoint folder that cannot be loaded (truncated, garbage, or not plain tensors); one phrase."""


class RunBook:
    """Events, status.json, warnings, stage boundaries, checkpoints, control requests and signals of one
    run. `fill_checkpoint(folder)` (set by the run) writes the training state into a checkpoint folder.
    With several ranks every rank keeps the same book; rank 0's writer writes, the others' write nothing
    (`FollowerWriter`); metrics are averaged over the ranks, control requests and signals agreed on."""

    def __init__(
        self,
        recipe: Recipe,
        writer: RunWriter,
        *,
        listener: Callable[[dict], None] | None = None,
        dist: Distributed | None = None,
    ):
        self.recipe = recipe
        self.writer = writer
        self.listener = listener
        self.dist = dist if dist is not None else Distributed()
        self.device = torch.device("cpu")  # the run's device, once resolved
        self.state = RunState()
        self.counters = Counters()
        self.clock = Stopwatch()
        self.signal_received: str | None = None
        self.stage_started = time.monotonic()
        self.stage_paused = 0.0  # seconds paused since the stage started
        self.fill_checkpoint: Callable[[Path], None] = lambda folder: None

    # -- opening the run directory -----------------------------------------------------------------------
    def open_new_run(
        self, *, base: str, total_steps: int, data_report: Any = None, stages_from: Path | None = None
    ) -> None:
        """A new run: the resolved recipe, meta.json, the first status and the `run_start` event.
        `stages_from`: the run whose SFT and reward stages this one adopts (named in meta.json)."""
        recipe, writer = self.recipe, self.writer
        meta = run_meta(recipe, self.device, self.dist, base)
        if stages_from is not None:
            meta["stages_from"] = str(stages_from)
        writer.write_recipe(dump_recipe(recipe))
        writer.write_meta(meta)
        writer.update_status(
            state="running",
            method=recipe.policy.method,
            started=meta["started"],
            iterations=recipe.train.iterations,
            total_steps=total_steps,
            name=writer.path.name,
            elapsed=self.clock.elapsed(),  # the run's one clock, from the start of the process
            paused_s=0.0,
        )
        self.emit(
            "run_start",
            recipe=recipe.to_dict(),
            total_steps=total_steps,
            world_size=self.dist.world_size,
            **({"data": data_report.as_dict()} if data_report is not None else {}),
        )
        if data_report is not None and data_report.malformed and stages_from is None:  # (adopted: theirs)
            self.warn(
                "data_malformed_rows",
                f"data.path = {recipe.data.path}: {data_report.malformed} rows are malformed (a missing or "
                f"ill-typed field, an empty answer; in hh-rlhf, dialogues that part before the last answer) and "
                f"were left out; {data_report.summary()}",
                **data_report.as_dict(),
            )

    def _fit_iterations(self, checkpoint: Path | None) -> None:
        """train.iterations in recipe.toml lowered below where the checkpoint is: exactly at an iteration's
        start, the run is done there (it finishes, training nothing); inside or past it, RunDirError."""
        state, iterations = self.state, self.recipe.train.iterations
        if checkpoint is None or state.stage == "done" or state.iteration < iterations:
            return
        if state.iteration == iterations and state.stage == "policy" and state.step == 0:
            state.stage = "done"
            return
        raise RunDirError(
            f"{self.writer.path / 'recipe.toml'} sets train.iterations = {iterations}, but checkpoint "
            f"{checkpoint.name} is already in iteration {state.iteration + 1}; set train.iterations to "
            f"{state.iteration + 1} or more to continue (nothing was changed)"
        )

    def reopen(self, load_checkpoint: Callable[[Path], None], adopted_from: Path | None = None) -> None:
        """Continue a run from its newest intact checkpoint (`load_checkpoint(folder)` restores the
        training state, or raises CheckpointUnreadable, and that folder is skipped and named); events are
        numbered on from the checkpoint's, and a `resume` event tells readers to drop what came after.
        With checkpoints but none readable, RunDirError and nothing changes. `adopted_from`: the run whose
        SFT and reward stages a new run has just copied in (the event says so instead of "resuming")."""
        writer = self.writer
        candidates = checkpoint_candidates(writer.path)
        skipped: list[str] = []
        checkpoint = None
        for folder in candidates:
            try:
                load_checkpoint(folder)
            except CheckpointUnreadable as error:
                skipped.append(f"{folder.name} ({error})")
                continue
            checkpoint = folder
            break
        if candidates and checkpoint is None:
            raise RunDirError(
                f"no checkpoint in {writer.checkpoints_dir} can be read ({'; '.join(skipped)}); "
                "nothing was changed: start a new run"
            )
        self._fit_iterations(checkpoint)
        writer.load_status()
        writer.number_events_from(self.state.event_seq if checkpoint is not None else 0)
        writer.update_status(
            state="running",
            error=None,
            pid=os.getpid(),
            warnings=self.state.warnings,
            warning_count=self.state.warning_count,
        )
        world, before = self.dist.world_size, self.state.world_size
        changed = checkpoint is not None and world != before
        self.emit(
            "resume",
            rewind_to_seq=writer.seq,
            checkpoint=checkpoint.name if checkpoint is not None else None,
            warning_count=self.state.warning_count,
            world_size=world,
            **({"skipped": skipped} if skipped else {}),
            **({"previous_world_size": before} if changed else {}),
            **({"stages_from": str(adopted_from)} if adopted_from is not None else {}),
            message=(
                (
                    f"the SFT and reward stages adopted from {adopted_from}; next: "
                    if adopted_from is not None
                    else f"resuming from {checkpoint_phrase(checkpoint.name)}: "
                )
                + stage_message(self.state.stage, self.state.iteration, self.recipe.train.iterations)
                + (f", step {self.state.step}" if self.state.step else "")
                if checkpoint is not None
                else "no checkpoint yet: starting again from the first SFT step"
            )
            + (f"; skipped {', '.join(skipped)}" if skipped else "")
            + (
                f"; on {world} rank{'s' if world > 1 else ''} where it ran on {before}: the global batch "
                "is the same, so updates mean the same, but sampling on other batch shapes is not "
                "bit-identical"
                if changed
                else ""
            ),
        )

    # -- the loop position -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state.stage == "done"

    def iteration_or_none(self) -> int | None:
        return self.state.iteration if self.state.stage in ("policy", "refine", "eval") else None

    def begin(self, stage: str) -> bool:
        """Whether the run is at `stage` now (a resumed run skips the stages its checkpoint has done); at
        the stage's first step, its `stage_start` event and status."""
        if self.state.stage != stage:
            return False
        self.counters.enter(stage)
        if self.state.step == 0:
            self.stage_started = time.monotonic()
            self.stage_paused = 0.0
            reset_peak(self.device)
            iteration = self.state.iteration if stage in ITERATION_STAGES else None
            self.emit("stage_start", message=stage_message(stage, iteration, self.recipe.train.iterations))
            self.writer.update_status(stage=stage, iteration=self.iteration_or_none(), step=0)
        return True

    def advance(self) -> None:
        self.state.step += 1
        self.state.global_step += 1

    def end_stage(self, then: str, checkpoint: str | None = None) -> None:
        """The `stage_end` event, then on to stage `then` (the loop names it), then the checkpoint
        `checkpoint` if named."""
        finished = self.state.stage
        self.emit(
            "stage_end",
            wall_s=round(time.monotonic() - self.stage_started, 3),
            paused_s=round(self.stage_paused, 3),  # of wall_s
            peak_rss_mib=round(peak_rss_mib(), 1),
            counters=self.counters.per_stage.get(finished, {}),
            **(
                {"cuda_peak_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}
                if self.device.type == "cuda"
                else {}
            ),
        )
        self.state.stage = then
        self.state.step = 0
        if checkpoint:
            self.checkpoint(checkpoint)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around the loop: signals stop it cleanly; a stage's out-of-memory or NaN sampling becomes one
        sentence (TrainingFailed); the end is recorded (finished, or stopped with the reason)."""
        self._install_signal_handlers()
        try:
            try:
                yield
            except torch.cuda.OutOfMemoryError:
                raise TrainingFailed(out_of_memory(self.recipe, self.state.stage)) from None
            except RuntimeError as error:
                if "probability tensor contains" not in str(error):
                    raise
                stage = self.state.stage
                raise TrainingFailed(  # sampling from NaN or infinite logits: the weights diverged
                    f"the model's next-token probabilities became NaN or infinite in the {stage} stage at "
                    f"step {self.state.step}; the weights diverged: lower {self.lr_setting(stage)} (in a "
                    "new run, or in the run's recipe.toml before `zopro run --resume`)"
                ) from None
            self.writer.update_status(
                state="finished",
                stage="done",
                latest=self.state.latest,
                elapsed=self.clock.elapsed(),
                total_steps=self.state.global_step,
            )
            self.emit("run_end", status="finished", history=self.state.history)
        except StopRun as stop:
            self.writer.update_status(state="stopped", stopped_by=stop.reason, latest=self.state.latest)
            self.emit("run_end", status="stopped", reason=stop.reason)
            raise

    # -- events and status -------------------------------------------------------------------------------
    def emit(self, type: str, **fields: Any) -> dict:
        event = self.writer.emit(
            type,
            stage=self.state.stage,
            iteration=self.iteration_or_none(),
            step=self.state.step,
            global_step=self.state.global_step,
            elapsed=round(self.clock.elapsed(), 3),
            **fields,
        )
        if self.listener is not None:
            self.listener(event)
        return event

    def metrics(self, values: dict[str, float], type: str = "metrics") -> None:
        """A metrics event: the values averaged over the ranks, this rank's counters and time, and the
        memory of every rank (`mem/rank<r>/...` beside rank 0's `mem/...` when there are several)."""
        values = dict(values)
        memory = memory_metrics(self.device)
        if self.dist.enabled:
            every = self.dist.gather([(values, memory)], "averaging metrics")
            values = self.dist.mean_of([v for v, _ in every])
            for rank, (_, mem) in enumerate(every):
                values.update({f"mem/rank{rank}/{k[4:]}": v for k, v in mem.items()})
            values["dist/world_size"] = self.dist.world_size
            values.update({f"dist/{kind}_bytes": float(n) for kind, n in self.dist.bytes.items()})
        values.update(self.counters.metrics())
        values["time/elapsed_s"] = round(self.clock.elapsed(), 3)
        values.update(memory)
        self.state.latest.update({k: v for k, v in values.items() if isinstance(v, (int, float))})
        self.emit(type, metrics=values)
        self.writer.update_status(
            stage=self.state.stage,
            iteration=self.iteration_or_none(),
            step=self.state.step,
            global_step=self.state.global_step,
            latest=self.state.latest,
            elapsed=self.clock.elapsed(),
        )

    def warn(self, code: str, message: str, **fields: Any) -> dict:
        """A `warning` event (code, message and the fields), also kept in status.json's `warnings` (the last
        STATUS_WARNINGS) for `zopro status`/`ls`, the progress line, the TUI and the summary tables."""
        event = self.emit("warning", code=code, message=message, **fields)
        self.state.warnings.append(
            {"code": code, "message": message, "iteration": event["iteration"], "step": event["step"]}
        )
        del self.state.warnings[:-STATUS_WARNINGS]
        self.state.warning_count += 1
        self.writer.update_status(warnings=self.state.warnings, warning_count=self.state.warning_count)
        return event

    def write_samples(
        self,
        prompts: list[str],
        responses: list[str],
        scores: list[float],
        gold: list[float] | None,
        kind: str = "train",
    ) -> None:
        rows = []
        for j, (p, a, s) in enumerate(zip(prompts, responses, scores, strict=True)):
            row = {
                "kind": kind,
                "iteration": self.iteration_or_none(),
                "step": self.state.step,
                "prompt": p,
                "response": a,
                "score": round(float(s), 4),
            }
            if gold is not None:
                row["gold"] = gold[j]
            rows.append(row)
        self.writer.write_samples(self.state.global_step, rows)
        self.emit("samples", count=len(rows), kind=kind)

    def check_finite(self, loss: torch.Tensor | float, stage: str, name: str) -> None:
        if not math.isfinite(float(loss)):
            raise TrainingFailed(
                f"{name} became {float(loss)} at {stage} step {self.state.step}; lower the learning rate "
                f"({self.lr_setting(stage)}) in a new run, or in the run's recipe.toml before `zopro run --resume`"
            )

    def lr_setting(self, stage: str) -> str:
        """The recipe key and value of the learning rate that drives `stage` (policy-side for the rest)."""
        recipe = self.recipe
        section = stage if stage in ("sft", "reward", "refine") else recipe.policy.method
        if (
            section == "zopro"
            and self.state.iteration == 0
            and getattr(recipe.zopro, "first_iteration", "mezo") != "mezo"
        ):
            section = recipe.zopro.first_iteration  # zopro's iteration 0 is a first-order update
        lr = getattr(getattr(recipe, section, None), "lr", None)
        return f"{section}.lr = {lr:g}" if isinstance(lr, float) else f"{section}.lr"

    # -- checkpoints, control requests and signals -------------------------------------------------------
    def checkpoint(self, name: str) -> None:
        self.state.elapsed = self.clock.elapsed()
        self.state.event_seq = self.writer.seq + 1  # the checkpoint event itself is kept
        self.state.counters = self.counters.state_dict()
        self.state.world_size = self.dist.world_size
        if self.dist.is_main:  # the ranks hold the same state: rank 0 writes it, the others wait for it
            with self.writer.checkpoint(name) as folder:
                self.fill_checkpoint(folder)
                (folder / "state.json").write_text(json.dumps(self.state.plain(), indent=1))
        self.dist.barrier()
        self.emit("checkpoint", name=name)

    def iteration_checkpoint(self, iteration: int) -> Path:
        """The checkpoint saved at the end of `iteration` (-1: the start of iteration 0, after the reward model)."""
        return self.writer.checkpoints_dir / iteration_checkpoint_name(iteration)

    def between_steps(self) -> None:
        """Poll control requests and signals; pause, checkpoint or stop here, where the state is whole."""
        requests, signal_name = self.agreed_requests()
        if "checkpoint" in requests:
            self.checkpoint("resume")
        if "pause" in requests and "resume" not in requests and "stop" not in requests and not signal_name:
            paused_at = time.monotonic()
            self.writer.update_status(state="paused", elapsed=self.clock.elapsed())
            self.emit("paused")
            while True:
                time.sleep(0.2)
                later, signal_name = self.agreed_requests()
                if "checkpoint" in later:
                    self.checkpoint("resume")
                if "stop" in later or signal_name:
                    requests = ["stop"]
                    break
                if "resume" in later:
                    break
            pause = time.monotonic() - paused_at
            self.stage_paused += pause
            self.state.paused_s += pause
            self.writer.update_status(
                state="running", elapsed=self.clock.elapsed(), paused_s=self.state.paused_s
            )
            self.emit("resumed", paused_s=round(pause, 3))
        if "stop" in requests or signal_name:
            self.checkpoint("resume")
            raise StopRun(signal_name or "stop request")

    def agreed_requests(self) -> tuple[list[str], str | None]:
        """The control requests rank 0 took, and the first signal any rank had received when they were
        gathered, the same on every rank: all ranks pause, checkpoint and stop at the same step. Only the
        gathered value decides: a signal whose handler runs once the gather returns (Python defers handlers
        while a collective blocks) would otherwise stop that rank alone, and the others would wait for it in
        their next collective for ever. It is agreed at the next poll."""
        received = self.signal_received
        requests = self.writer.take_requests()
        if not self.dist.enabled:
            return requests, received
        every = self.dist.gather([(requests, received)], "agreeing on control requests")
        signals = [signal_name for _, signal_name in every if signal_name]
        if signals and not self.signal_received:
            self.signal_received = signals[0]
        return every[0][0], signals[0] if signals else None

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.signal_received = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                _leave_the_terminal()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGHUP, handler)  # the SSH connection dropped: stop cleanly, like SIGTERM


def run_meta(recipe: Recipe, device: torch.device, dist: Distributed, base: str) -> dict[str, Any]:
    """meta.json: versions, host, device, seed, start time, pid, method, base model, command line."""
    meta = {
        "zopro": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": str(device),
        "seed": recipe.seed,
        "pid": os.getpid(),
        "started": time.time(),
        "method": recipe.policy.method,
        "base": base,
        "argv": sys.argv,
    }
    with contextlib.suppress(ImportError):
        import peft
        import transformers  # noqa: E401

        meta.update(transformers=transformers.__version__, peft=peft.__version__)
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    if dist.enabled:
        meta.update(world_size=dist.world_size, backend=dist.backend)
    return meta


def out_of_memory(recipe: Recipe, stage: str) -> str:
    batch = {
        "sft": f"sft.batch_size = {recipe.sft.batch_size}",
        "reward": f"reward.batch_size = {recipe.reward.batch_size} pairs",
        "policy": f"train.prompts_per_update x train.samples_per_prompt = "
        f"{recipe.train.prompts_per_update * recipe.train.samples_per_prompt} sequences of up to "
        f"{recipe.model.max_prompt_tokens} + {recipe.model.max_new_tokens} tokens",
        "refine": f"refine.batch_size = {recipe.refine.batch_size} pairs",
        "eval": f"task.eval_prompts = {recipe.task.eval_prompts}",
    }.get(stage, "the batch")
    return (
        f"CUDA ran out of memory in the {stage} stage with {batch}; lower that (or model.max_new_tokens), "
        "or use a smaller model or model.dtype = 'bfloat16', then resume"
    )


def _leave_the_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): send what went there to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                os.dup2(devnull, fd)
    os.close(devnull)
