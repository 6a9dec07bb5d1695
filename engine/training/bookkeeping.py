"""The bookkeeping beside the training loop: the loop position (`RunState`), and `RunBook`, which turns
what the loop does into the run directory's events, status, warnings and checkpoints, and answers control
requests and signals between steps. It never trains anything."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import StopRun, TrainingFailed
from engine.recipe import Recipe
from engine.rundir.wording import ITERATION_STAGES, stage_message
from engine.rundir.writer import RunWriter, iteration_checkpoint_name
from engine.training.distributed import Distributed
from engine.training.telemetry import Counters, Stopwatch, memory_metrics, peak_rss_mib, reset_peak

STATUS_WARNINGS = 20  # status.json keeps the last this many warnings

STAGES = ("sft", "reward", "policy", "refine", "eval", "done")  # in order; policy, refine and eval repeat


@dataclass
class RunState:
    """The loop position and the small per-iteration state; saved as JSON in every checkpoint."""

    stage: str = "sft"
    iteration: int = 0
    step: int = 0
    global_step: int = 0
    policy_updates: int = 0
    elapsed: float = 0.0
    paused_s: float = 0.0  # of `elapsed`, the time spent paused
    event_seq: int = 0
    rollouts: list[dict] = field(default_factory=list)  # this iteration's (prompt, response, score)
    judged_pairs: list[dict] | None = None
    judge_stats: dict[str, int] = field(default_factory=dict)
    sft_eval_answers: list[tuple[str, bool]] = field(default_factory=list)  # (answer, finished)
    history: list[dict] = field(default_factory=list)  # one row per evaluation (sft baseline, iterations)
    counters: dict = field(default_factory=dict)
    latest: dict[str, float] = field(default_factory=dict)
    warnings: list[dict] = field(default_factory=list)  # the last STATUS_WARNINGS warnings
    warning_count: int = 0
    world_size: int = 1  # how many ranks trained up to this point


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

    def end_stage(self, checkpoint: str | None = None) -> None:
        """The `stage_end` event, then on to the next stage of STAGES (after eval: the next iteration's
        policy stage, or done), then the checkpoint `checkpoint` if named."""
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
        if finished == "eval":
            next_stage = "done" if self.state.iteration >= self.recipe.train.iterations else "policy"
        else:
            next_stage = STAGES[STAGES.index(finished) + 1]
        self.state.stage = next_stage
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
        r = self.recipe
        section = stage if stage in ("sft", "reward", "refine") else r.policy.method
        if (
            section == "zopro"
            and self.state.iteration == 0
            and getattr(r.zopro, "first_iteration", "") == "rloo"
        ):
            section = "rloo"  # zopro's iteration 0 is a first-order rloo update
        lr = getattr(getattr(r, section, None), "lr", None)
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
                (folder / "state.json").write_text(json.dumps(asdict(self.state), indent=1))
        self.dist.barrier()
        self.emit("checkpoint", name=name)

    def iteration_checkpoint(self, iteration: int) -> Path:
        """The checkpoint saved at the end of `iteration` (-1: the start of iteration 0, after the reward model)."""
        return self.writer.checkpoints_dir / iteration_checkpoint_name(iteration)

    def between_steps(self) -> None:
        """Poll control requests and signals; pause, checkpoint or stop here, where the state is whole."""
        requests = self.agreed_requests()
        if "checkpoint" in requests:
            self.checkpoint("resume")
        if "pause" in requests and "resume" not in requests and "stop" not in requests:
            paused_at = time.monotonic()
            self.writer.update_status(state="paused", elapsed=self.clock.elapsed())
            self.emit("paused")
            while True:
                time.sleep(0.2)
                later = self.agreed_requests()
                if "checkpoint" in later:
                    self.checkpoint("resume")
                if "stop" in later or self.signal_received:
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
        if "stop" in requests or self.signal_received:
            reason = self.signal_received or "stop request"
            self.checkpoint("resume")
            raise StopRun(reason)

    def agreed_requests(self) -> list[str]:
        """The control requests rank 0 took, and a signal any rank received, the same on every rank: all
        ranks pause, checkpoint and stop at the same step."""
        requests = self.writer.take_requests()
        if not self.dist.enabled:
            return requests
        every = self.dist.gather([(requests, self.signal_received)], "agreeing on control requests")
        signals = [signal_name for _, signal_name in every if signal_name]
        if signals and not self.signal_received:
            self.signal_received = signals[0]
        return every[0][0]

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.signal_received = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                _leave_the_terminal()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGHUP, handler)  # the SSH connection dropped: stop cleanly, like SIGTERM


def out_of_memory(recipe: Recipe, stage: str) -> str:
    r = recipe
    batch = {
        "sft": f"sft.batch_size = {r.sft.batch_size}",
        "reward": f"reward.batch_size = {r.reward.batch_size} pairs",
        "policy": f"train.prompts_per_update x train.samples_per_prompt = "
        f"{r.train.prompts_per_update * r.train.samples_per_prompt} sequences of up to "
        f"{r.model.max_prompt_tokens} + {r.model.max_new_tokens} tokens",
        "refine": f"refine.batch_size = {r.refine.batch_size} pairs",
        "eval": f"task.eval_prompts = {r.task.eval_prompts}",
    }.get(stage, "the batch")
    return (
        f"CUDA ran out of memory in the {stage} stage with {batch}; lower that (or model.max_new_tokens), "
        "or use a smaller model or model.dtype = 'bfloat16', then resume"
    )


def run_state(data: Any) -> RunState:
    """A RunState from checkpoint JSON, or TypeError/ValueError when the JSON is not one."""
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    state = RunState(**data)
    if state.stage not in STAGES:
        raise ValueError(f"unknown stage {state.stage!r}")
    for name in ("iteration", "step", "global_step", "policy_updates", "event_seq"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} is not a count: {value!r}")
    if not isinstance(state.elapsed, (int, float)) or not isinstance(state.counters, dict):
        raise ValueError("elapsed or counters has the wrong type")
    return state


def _leave_the_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): send what went there to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                os.dup2(devnull, fd)
    os.close(devnull)
