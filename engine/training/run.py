"""The pipeline of one run (method.md section 1): SFT, reward model, then iterations of
[policy updates -> least-confident rollouts -> second sample -> judge -> reward refinement -> keep-close]
each closed by a held-out evaluation. Resumable at any step: every random draw comes from a generator
seeded by (run seed, what, where), and a checkpoint holds adapters, optimisers and the loop position.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.analysis.interplay import InterplayTracker, adapter_views, pair_adapter_tensors
from engine.data.preference_data import DataError
from engine.data.tasks import make_task
from engine.errors import StopRun, TrainingFailed  # noqa: F401 (re-exported)
from engine.recipe import Recipe, dump_recipe
from engine.rundir.writer import (
    RunDirError,
    RunWriter,
    atomic_write_json,
    atomic_write_text,
    checkpoint_candidates,
)
from engine.seeds import generator, seeded
from engine.training.judges import GoldJudge, LLMJudge, RewardJudge
from engine.training.kl_control import KLController
from engine.training.methods import make_update
from engine.training.models import (
    ModelError,
    apply_adapters,
    load_preference_model,
    read_adapters,
    resolve_base,
    resolve_device,
    save_adapters,
)
from engine.training.objectives import bradley_terry_loss, sft_loss
from engine.training.rollout import (
    Rollout,
    collect_rollout,
    encode_responses,
    position_ids,
    reward_scores,
    sample,
    token_logprobs,
)
from engine.training.telemetry import Counters, PhasePeak, Stopwatch, memory_metrics, peak_rss_mib, reset_peak
from engine.training.watchdog import check as check_runaway

STATUS_WARNINGS = 20  # status.json keeps the last this many warnings

STAGES = ("sft", "reward", "policy", "refine", "eval", "done")


class CheckpointUnreadable(ValueError):
    """A checkpoint folder that cannot be loaded (truncated, garbage, or not plain tensors); one phrase."""


@dataclass
class RunState:
    """The loop position and the small per-iteration state; saved as JSON in every checkpoint."""

    stage: str = "sft"
    iteration: int = 0
    step: int = 0
    global_step: int = 0
    policy_updates: int = 0
    elapsed: float = 0.0
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


class Pipeline:
    """One run: owns the model, the task, the writer and the loop state."""

    def __init__(self, recipe: Recipe, writer: RunWriter, *, listener: Callable[[dict], None] | None = None):
        self.recipe = recipe
        self.writer = writer
        self.listener = listener
        self.seed = recipe.seed
        self.state = RunState()
        self.counters = Counters()
        self.clock = Stopwatch()
        self.signal_received: str | None = None
        self.stage_started = time.monotonic()
        try:
            self.task = make_task(recipe)
        except DataError as error:
            raise ModelError(f"data.path = {recipe.data.path!r}: {error}") from None
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        self.device = resolve_device(recipe.device)
        base = resolve_base(
            recipe.model.base,
            self.task.corpus(),
            recipe.seed,
            recipe.model.cache_dir,
            self.task.pretraining_text(),
        )
        m = recipe.model
        self.pm = load_preference_model(
            base,
            dtype=m.dtype,
            device=self.device,
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha,
            target_modules=m.target_modules,
            seed=recipe.seed,
        )
        if hasattr(self.task, "bind"):  # a dataset: format prompts for this tokenizer, drop over-long rows
            try:
                self.data_report = self.task.bind(self.pm.tokenizer, m.max_prompt_tokens + m.max_new_tokens)
            except DataError as error:
                raise ModelError(f"data.path = {recipe.data.path!r}: {error}") from None
        self.train_prompts = self.task.prompts(recipe.task.train_prompts, "train")
        self.eval_prompts = self.task.prompts(recipe.task.eval_prompts, "eval")
        self.sft_optimizer = torch.optim.AdamW(self.pm.adapter_parameters("sft").values(), lr=recipe.sft.lr)
        self.reward_optimizer = self._reward_optimizer(recipe.reward.lr)
        self.refine_optimizer = self._reward_optimizer(recipe.refine.lr)
        self.reduce_scalar = None  # set by distributed runs: averages a float across ranks
        self.interplay: InterplayTracker | None = None
        if recipe.interplay.enabled or recipe.policy.method == "zopro":
            try:
                keys = [key for key, _, _ in pair_adapter_tensors(dict(self.pm.model.named_parameters()))]
            except ValueError as error:
                raise ModelError(
                    f"the policy and reward adapters do not pair up key by key, which zopro and "
                    f"interplay need: {error}"
                ) from None
            if recipe.interplay.enabled:
                self.interplay = InterplayTracker(
                    keys, sketch_size=recipe.interplay.sketch_size, seed=recipe.seed
                )
        self.method = make_update(recipe.policy.method, self)
        policy = recipe.policy
        self.kl_controller = KLController(policy.kl_coef, policy.kl_target, policy.kl_horizon)
        self.reward_before_refine: dict[str, torch.Tensor] | None = None
        self.reward_initial: dict[str, torch.Tensor] | None = None
        self.judge = None

    def _reward_optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = list(self.pm.adapter_parameters("reward").values()) + list(self.pm.score_head.parameters())
        return torch.optim.AdamW(params, lr=lr)

    # -- the run -----------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        r = self.recipe
        kept = math.ceil(
            r.refine.keep_fraction
            * r.train.prompts_per_update
            * r.train.samples_per_prompt
            * r.train.updates_per_iteration
        )
        refine = r.refine.epochs * math.ceil(kept / r.refine.batch_size)
        return r.sft.steps + r.reward.steps + r.train.iterations * (r.train.updates_per_iteration + refine)

    def start(self) -> None:
        """A new run: write the resolved recipe and meta, then train."""
        path = self.writer.path
        atomic_write_text(path / "recipe.toml", dump_recipe(self.recipe))
        meta = {
            "zopro": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "device": str(self.device),
            "seed": self.seed,
            "pid": os.getpid(),
            "started": time.time(),
            "method": self.recipe.policy.method,
            "base": self.pm.base_path,
            "argv": sys.argv,
        }
        with contextlib.suppress(ImportError):
            import peft
            import transformers  # noqa: E401

            meta.update(transformers=transformers.__version__, peft=peft.__version__)
        if self.device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(self.device)
        atomic_write_json(path / "meta.json", meta)
        self.writer.update_status(
            state="running",
            method=self.recipe.policy.method,
            started=meta["started"],
            iterations=self.recipe.train.iterations,
            total_steps=self.total_steps,
            name=path.name,
        )
        report = getattr(self, "data_report", None)
        self.emit(
            "run_start",
            recipe=self.recipe.to_dict(),
            total_steps=self.total_steps,
            **({"data": report.as_dict()} if report is not None else {}),
        )
        self.train()

    def resume(self) -> None:
        """Continue from the newest intact checkpoint: same data order, same sampling, same directions.
        One that cannot be read is skipped (and named); with none left, RunDirError and nothing changes."""
        candidates = checkpoint_candidates(self.writer.path)
        skipped: list[str] = []
        checkpoint = None
        for folder in candidates:
            try:
                self.load_checkpoint(folder)
            except CheckpointUnreadable as error:
                skipped.append(f"{folder.name} ({error})")
                continue
            checkpoint = folder
            break
        if candidates and checkpoint is None:
            raise RunDirError(
                f"no checkpoint in {self.writer.checkpoints_dir} can be read ({'; '.join(skipped)}); "
                "nothing was changed: start a new run"
            )
        self.writer.load_status()
        self.writer.seq = self.state.event_seq if checkpoint is not None else 0
        self.writer.update_status(
            state="running",
            error=None,
            pid=os.getpid(),
            warnings=self.state.warnings,
            warning_count=self.state.warning_count,
        )
        self.emit(
            "resume",
            rewind_to_seq=self.writer.seq,
            checkpoint=checkpoint.name if checkpoint is not None else None,
            warning_count=self.state.warning_count,
            **({"skipped": skipped} if skipped else {}),
            message=(
                f"resuming from checkpoint {checkpoint.name}"
                if checkpoint is not None
                else "no checkpoint yet: starting again from the first SFT step"
            )
            + (f"; skipped {', '.join(skipped)}" if skipped else ""),
        )
        self.train()

    def train(self) -> None:
        self._install_signal_handlers()
        try:
            while self.state.stage != "done":
                stage = self.state.stage
                self.counters.enter(stage)
                if self.state.step == 0:
                    self.stage_started = time.monotonic()
                    reset_peak(self.device)
                    self.emit("stage_start", message=_stage_title(stage, self.state.iteration))
                    self.writer.update_status(stage=stage, iteration=self._iteration_or_none(), step=0)
                run_stage = {
                    "sft": self.run_sft,
                    "reward": self.run_reward,
                    "policy": self.run_policy,
                    "refine": self.run_refine,
                    "eval": self.run_eval,
                }[stage]
                try:
                    run_stage()
                except torch.cuda.OutOfMemoryError:
                    raise TrainingFailed(self._out_of_memory(stage)) from None
                except RuntimeError as error:
                    if "probability tensor contains" not in str(error):
                        raise
                    raise TrainingFailed(  # sampling from NaN or infinite logits: the weights diverged
                        f"the model's next-token probabilities became NaN or infinite in the {stage} stage at "
                        f"step {self.state.step}; the weights diverged: lower {self._lr_setting(stage)} (in a "
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

    # -- stage 1: SFT ------------------------------------------------------------------------------------
    def run_sft(self) -> None:
        r = self.recipe
        examples = self.task.sft_examples(r.task.sft_examples)
        self.pm.use("sft")
        while self.state.step < r.sft.steps:
            step = self.state.step
            order = torch.randperm(len(examples), generator=generator(self.seed, "sft", step))[
                : r.sft.batch_size
            ]
            batch = [examples[i] for i in order.tolist()]
            seqs = encode_responses(
                self.pm,
                [e.prompt for e in batch],
                [e.response for e in batch],
                max_prompt_tokens=r.model.max_prompt_tokens,
                max_new_tokens=r.model.max_new_tokens,
            )
            mask = seqs.attention_mask
            logits = self.pm.model(
                input_ids=seqs.input_ids, attention_mask=mask, position_ids=position_ids(mask)
            ).logits
            labels = seqs.input_ids.clone()
            labels[:, : seqs.prompt_width] = -100
            labels[:, seqs.prompt_width :][seqs.response_mask == 0] = -100
            loss = sft_loss(logits, labels)
            loss.backward()
            self.sft_optimizer.step()
            self.sft_optimizer.zero_grad(set_to_none=True)
            self.counters.add(forward_passes=1, backward_passes=1, tokens=int(mask.sum()))
            self._check_finite(loss.detach(), "sft", "loss/sft")
            self.advance()
            if self.state.step % 10 == 0 or self.state.step == r.sft.steps:
                self.metrics({"loss/sft": float(loss.detach())})
            self.between_steps()
        self.pm.copy_adapter("sft", "policy")  # the policy starts as a copy of the SFT model
        self.end_stage("reward", checkpoint="sft")

    # -- stage 2: the reward model -----------------------------------------------------------------------
    def run_reward(self) -> None:
        r = self.recipe
        pairs = self.task.preference_pairs(r.task.preference_pairs)
        while self.state.step < r.reward.steps:
            step = self.state.step
            order = torch.randperm(len(pairs), generator=generator(self.seed, "reward", step))[
                : r.reward.batch_size
            ]
            batch = [pairs[i] for i in order.tolist()]
            loss, accuracy = self._bradley_terry_step(
                [p.prompt for p in batch],
                [p.chosen for p in batch],
                [p.rejected for p in batch],
                self.reward_optimizer,
                targets=[p.score for p in batch],
            )
            self._check_finite(loss, "reward", "loss/reward")
            self.advance()
            if self.state.step % 10 == 0 or self.state.step == r.reward.steps:
                self.metrics({"loss/reward": loss, "reward/accuracy": accuracy})
            self.between_steps()
        self._center_reward(pairs)
        held_out = self.task.held_out_pairs(256)
        self.reward_initial = self._reward_snapshot()  # the fixed judge of win rates when there is no gold
        accuracy = self._reward_accuracy(held_out)
        self.metrics({"reward/eval_accuracy": accuracy})
        self.evaluate(label="sft")
        self.end_stage("policy", checkpoint="reward")

    def _bradley_terry_step(
        self,
        prompts: list[str],
        chosen: list[str],
        rejected: list[str],
        optimizer: torch.optim.Optimizer,
        targets: list[float | None] | None = None,
    ) -> tuple[float, float]:
        r = self.recipe
        # the reward adapter stays active (and so trainable) through the backward pass
        with self.pm.adapter("reward"):
            seqs = encode_responses(
                self.pm,
                prompts + prompts,
                chosen + rejected,
                max_prompt_tokens=r.model.max_prompt_tokens,
                max_new_tokens=r.model.max_new_tokens,
            )
            scores = reward_scores(self.pm, seqs.input_ids, seqs.attention_mask, self.counters)
            n = len(prompts)
            loss = bradley_terry_loss(scores[:n], scores[n:])
            weight = r.reward.score_mse_weight
            if weight and targets and any(t is not None for t in targets):
                # data with a quality score (WMT20 MLQE z_mean): also regress r(p, chosen) on it
                keep = [k for k, t in enumerate(targets) if t is not None]
                wanted = torch.tensor([targets[k] for k in keep], device=scores.device, dtype=scores.dtype)
                loss = loss + weight * torch.nn.functional.mse_loss(scores[:n][keep], wanted)
            loss.backward()
            self.counters.add(backward_passes=1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), float((scores[:n] > scores[n:]).float().mean())

    @torch.no_grad()
    def _score_texts(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        r = self.recipe
        out = []
        for start in range(0, len(prompts), 64):
            seqs = encode_responses(
                self.pm,
                prompts[start : start + 64],
                responses[start : start + 64],
                max_prompt_tokens=r.model.max_prompt_tokens,
                max_new_tokens=r.model.max_new_tokens,
            )
            out.append(reward_scores(self.pm, seqs.input_ids, seqs.attention_mask, self.counters))
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def _center_reward(self, pairs: list) -> None:
        """Shift the score head so the reward model's mean score on its training answers is 0: then
        'least confident' (smallest |score|) means near the decision boundary, as method.md intends."""
        sample_pairs = pairs[:256]
        scores = self._score_texts(
            [p.prompt for p in sample_pairs] * 2,
            [p.chosen for p in sample_pairs] + [p.rejected for p in sample_pairs],
        )
        if len(scores):
            self.pm.score_head.bias -= scores.mean()

    @torch.no_grad()
    def _reward_accuracy(self, pairs: list) -> float:
        if not pairs:
            return float("nan")
        chosen = self._score_texts([p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = self._score_texts([p.prompt for p in pairs], [p.rejected for p in pairs])
        return float((chosen > rejected).float().mean())

    # -- stage 3a: policy optimisation -------------------------------------------------------------------
    def iteration_prompts(self, iteration: int) -> list[str]:
        """Iteration i trains on its own chunk of the training prompts."""
        per = max(
            len(self.train_prompts) // self.recipe.train.iterations, self.recipe.train.prompts_per_update
        )
        start = (iteration * per) % len(self.train_prompts)
        chunk = (self.train_prompts + self.train_prompts)[start : start + per]
        return chunk

    def iteration_checkpoint(self, iteration: int) -> Path:
        """The checkpoint saved at the end of `iteration` (-1: the start of iteration 0, after the reward model)."""
        name = "reward" if iteration < 0 else f"iter-{iteration:04d}"
        return self.writer.checkpoints_dir / name

    def adapter_views(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """{key: tensor} of the policy and of the reward adapter, keyed alike (peft's saved names)."""
        return adapter_views(pair_adapter_tensors(dict(self.pm.model.named_parameters())))

    def rollout(self, prompts: list[str], gen: torch.Generator) -> Rollout:
        """The shared rollout of one update on `prompts` with this run's settings."""
        r = self.recipe
        return collect_rollout(
            self.pm,
            prompts,
            k=r.train.samples_per_prompt,
            kl_coef=self.kl_controller.value,
            missing_eos_penalty=r.policy.missing_eos_penalty,
            reward_clip=r.policy.reward_clip,
            whiten_advantages=r.policy.whiten_advantages,
            max_new_tokens=r.model.max_new_tokens,
            max_prompt_tokens=r.model.max_prompt_tokens,
            temperature=r.policy.temperature,
            generator=gen,
            counters=self.counters,
        )

    def fresh_rollout(self, where: tuple) -> Rollout:
        """A rollout on training prompts of this iteration drawn from `where` (diagnostics)."""
        chunk = self.iteration_prompts(self.state.iteration)
        order = torch.randperm(len(chunk), generator=generator(self.seed, "prompts", *where))
        prompts = [chunk[j] for j in order[: self.recipe.train.prompts_per_update].tolist()]
        return self.rollout(prompts, generator(self.seed, "rollout", *where))

    @torch.no_grad()
    def score_policy(self, *where: Any) -> dict[str, float]:
        """Mean reward-model score (and gold) of one fresh answer per held-out prompt from the active
        adapter, on the generator of `where`: a quick probe (the premise check), not the evaluation."""
        r = self.recipe
        prompts = self.eval_prompts[: r.zopro.premise_prompts]
        seqs = sample(
            self.pm,
            prompts,
            max_new_tokens=r.model.max_new_tokens,
            max_prompt_tokens=r.model.max_prompt_tokens,
            temperature=r.eval.temperature,
            generator=generator(self.seed, *where),
            counters=self.counters,
        )
        scores = reward_scores(self.pm, seqs.input_ids, seqs.attention_mask, self.counters)
        out = {"reward": float(scores.mean())}
        if self.task.has_gold:
            finished = seqs.finished.tolist()
            gold = [
                self.task.gold(p, a, f) for p, a, f in zip(prompts, seqs.responses, finished, strict=True)
            ]
            out["gold"] = sum(gold) / len(gold)
        return out

    def run_policy(self) -> None:
        r = self.recipe
        i = self.state.iteration
        chunk = self.iteration_prompts(i)
        updates = r.train.updates_per_iteration
        if self.interplay is not None and not self.interplay.started:
            self.interplay.start(*self.adapter_views())
        while self.state.step < updates:
            step = self.state.step
            started = time.monotonic()
            order = torch.randperm(len(chunk), generator=generator(self.seed, "prompts", i, step))
            prompts = [chunk[j] for j in order[: r.train.prompts_per_update].tolist()]
            rollout = self.rollout(prompts, generator(self.seed, "rollout", i, step))
            update_started = time.monotonic()
            with PhasePeak(self.device) as phase:
                update_metrics = self.method.update(
                    rollout, update_index=self.state.policy_updates, step_in_iteration=step, lr_scale=1.0
                )
            if "loss/policy" in update_metrics:
                self._check_finite(update_metrics["loss/policy"], "policy", "loss/policy")
            update_metrics["time/policy_update_s"] = time.monotonic() - update_started
            self.kl_controller.update(float(rollout.kl.mean()))
            update_metrics["mem/update_peak_mib"] = round(phase.growth_mib, 2)
            seqs = rollout.sequences
            finished = seqs.finished.tolist()
            gold = (
                [
                    self.task.gold(p, a, f)
                    for p, a, f in zip(seqs.prompts, seqs.responses, finished, strict=True)
                ]
                if self.task.has_gold
                else None
            )
            scores = rollout.scores.tolist()
            self.state.rollouts.extend(
                {"prompt": p, "response": a, "score": s}
                for p, a, s in zip(seqs.prompts, seqs.responses, scores, strict=True)
            )
            tokens = seqs.response_mask.sum(-1).clamp(min=1)
            entropy = float((-rollout.old_logprobs.sum(-1) / tokens).mean())
            self.state.policy_updates += 1
            if self.interplay is not None and r.interplay.every_step:
                with torch.no_grad():
                    update_metrics.update(self.interplay.observe_policy_step(self.adapter_views()[0]))
            self.advance()
            self.metrics(
                {
                    "objective/scores": float(rollout.scores.mean()),
                    "objective/rlhf_reward": float(rollout.rlhf_reward.mean()),
                    "objective/kl": float(rollout.kl.mean()),
                    "policy/kl_coef": rollout.kl_coef,
                    "objective/entropy": entropy,
                    **({"objective/gold": sum(gold) / len(gold)} if gold else {}),
                    "objective/response_length": float(seqs.response_mask.sum(-1).float().mean()),
                    "objective/finished": sum(finished) / len(finished),
                    "policy/update": self.state.policy_updates,
                    "time/update_s": time.monotonic() - started,
                    **update_metrics,
                }
            )
            if self.state.policy_updates % r.log.samples_every == 0 or step == updates - 1:
                self.write_samples(seqs.prompts, seqs.responses, scores, gold)
            if r.log.checkpoint_every and self.state.policy_updates % r.log.checkpoint_every == 0:
                self.checkpoint("resume")
            self.between_steps()
        self.end_stage("refine")

    # -- stage 3b-f: least-confident rollouts, second sample, judge, reward refinement, keep-close -------------
    def judge_pairs(self) -> None:
        r = self.recipe
        i = self.state.iteration
        seen: set[tuple[str, str]] = set()
        unique = []
        for row in self.state.rollouts:
            key = (row["prompt"], row["response"])
            if key not in seen:
                seen.add(key)
                unique.append(row)
        unique.sort(key=lambda row: abs(row["score"]))
        kept = unique[: max(1, math.ceil(r.refine.keep_fraction * len(unique)))]
        with torch.no_grad(), self.pm.adapter("policy"):
            second = sample(
                self.pm,
                [row["prompt"] for row in kept],
                max_new_tokens=r.model.max_new_tokens,
                max_prompt_tokens=r.model.max_prompt_tokens,
                temperature=r.policy.temperature,
                generator=generator(self.seed, "second", i),
                counters=self.counters,
            )
        judge = self.make_judge()
        coin = random.Random(seeded(self.seed, "judge-order", i))
        flips = [coin.random() < 0.5 for _ in kept]  # order randomised against position bias
        firsts = [
            row["response"] if not f else b for row, b, f in zip(kept, second.responses, flips, strict=True)
        ]
        seconds = [
            b if not f else row["response"] for row, b, f in zip(kept, second.responses, flips, strict=True)
        ]
        verdicts = judge.compare([row["prompt"] for row in kept], firsts, seconds)
        pairs, undecided = [], 0
        for row, a, b, verdict in zip(kept, firsts, seconds, verdicts, strict=True):
            if verdict is None:
                undecided += 1
                continue
            pairs.append(
                {
                    "prompt": row["prompt"],
                    "chosen": a if verdict == 0 else b,
                    "rejected": b if verdict == 0 else a,
                }
            )
        self.state.judged_pairs = pairs
        self.state.judge_stats = {
            "rollouts": len(self.state.rollouts),
            "unique": len(unique),
            "kept": len(kept),
            "judged": len(pairs),
            "no_verdict": undecided,
        }
        if judge.name != "gold" and self.task.has_gold:  # how often this judge agrees with the truth
            truth = GoldJudge(self.task).compare([row["prompt"] for row in kept], firsts, seconds)
            both = [(v, t) for v, t in zip(verdicts, truth, strict=True) if v is not None and t is not None]
            if both:
                self.state.judge_stats["agreement_with_gold_pct"] = round(
                    100 * sum(v == t for v, t in both) / len(both)
                )
        self.reward_before_refine = self._reward_snapshot()

    def make_judge(self):
        r = self.recipe
        if r.refine.judge == "gold":
            return GoldJudge(self.task)
        if r.refine.judge == "reward":
            return RewardJudge(self.pm, self.counters, r.model.max_prompt_tokens, r.model.max_new_tokens)
        if self.judge is None:  # loaded once, on first use
            self.judge = LLMJudge(
                r.refine.judge_model, device=self.device, dtype=r.refine.judge_dtype, counters=self.counters
            )
        return self.judge

    @contextlib.contextmanager
    def _reward_weights(self, snapshot: dict[str, torch.Tensor]):
        """Score with other reward weights (the initial reward model) for a moment, then restore."""
        current = self._reward_snapshot()
        self._load_reward(snapshot)
        try:
            yield
        finally:
            self._load_reward(current)

    @torch.no_grad()
    def _load_reward(self, snapshot: dict[str, torch.Tensor]) -> None:
        live = dict(self.pm.adapter_parameters("reward"))
        live.update({f"score_head.{n}": p for n, p in self.pm.score_head.named_parameters()})
        for name, param in live.items():
            param.copy_(snapshot[name].to(param.device))

    def _reward_snapshot(self) -> dict[str, torch.Tensor]:
        snapshot = {n: p.detach().clone() for n, p in self.pm.adapter_parameters("reward").items()}
        snapshot.update(
            {f"score_head.{n}": p.detach().clone() for n, p in self.pm.score_head.named_parameters()}
        )
        return snapshot

    def run_refine(self) -> None:
        r = self.recipe
        i = self.state.iteration
        if self.state.judged_pairs is None:
            self.judge_pairs()
            self.emit("judge", **self.state.judge_stats, judge=r.refine.judge)
        pairs = self.state.judged_pairs
        per_epoch = math.ceil(len(pairs) / r.refine.batch_size) if pairs else 0
        steps = r.refine.epochs * per_epoch
        while self.state.step < steps:
            step = self.state.step
            epoch, k = divmod(step, per_epoch)
            order = torch.randperm(len(pairs), generator=generator(self.seed, "refine", i, epoch)).tolist()
            batch = [pairs[j] for j in order[k * r.refine.batch_size : (k + 1) * r.refine.batch_size]]
            loss, accuracy = self._bradley_terry_step(
                [p["prompt"] for p in batch],
                [p["chosen"] for p in batch],
                [p["rejected"] for p in batch],
                self.refine_optimizer,
            )
            self._check_finite(loss, "refine", "loss/reward_refine")
            self.advance()
            self.metrics({"loss/reward_refine": loss, "reward/refine_accuracy": accuracy})
            self.between_steps()
        if r.refine.keep_close and self.reward_before_refine is not None:
            self._keep_close(r.refine.keep_close_alpha)
        self.end_stage("eval")

    @torch.no_grad()
    def _keep_close(self, alpha: float) -> None:
        """reward <- alpha * previous + (1 - alpha) * refined (the paper's code uses alpha = 0.5)."""
        current = dict(self.pm.adapter_parameters("reward"))
        current.update({f"score_head.{n}": p for n, p in self.pm.score_head.named_parameters()})
        for name, param in current.items():
            param.mul_(1 - alpha).add_(self.reward_before_refine[name].to(param.device), alpha=alpha)

    # -- held-out evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, label: str) -> dict[str, float]:
        """Mean gold score of the policy on held-out prompts and its win rate against the SFT policy, each
        with its standard error over prompts (`eval/<name>_se`). `eval.samples_per_prompt` answers per
        prompt; the same eval generator every time, so iterations differ only by the policy."""
        r = self.recipe
        n = r.eval.samples_per_prompt
        prompts = [p for p in self.eval_prompts for _ in range(n)]  # prompt-major: n answers each
        kwargs = dict(
            max_new_tokens=r.model.max_new_tokens,
            max_prompt_tokens=r.model.max_prompt_tokens,
            temperature=r.eval.temperature,
            counters=self.counters,
        )
        if not self.state.sft_eval_answers:
            with self.pm.adapter("sft"):
                sft = sample(self.pm, prompts, generator=generator(self.seed, "eval"), **kwargs)
            self.state.sft_eval_answers = list(zip(sft.responses, sft.finished.tolist(), strict=True))
        with self.pm.adapter("policy"):
            seqs = sample(self.pm, prompts, generator=generator(self.seed, "eval"), **kwargs)
            logprobs = token_logprobs(self.pm, seqs, self.counters)
        with self.pm.adapter("sft"):
            ref = token_logprobs(self.pm, seqs, self.counters)
        scores = reward_scores(self.pm, seqs.input_ids, seqs.attention_mask, self.counters)
        finished = seqs.finished.tolist()
        per_answer: dict[str, list[float]] = {
            "reward": scores.tolist(),
            "kl": (logprobs - ref).sum(-1).tolist(),
            "response_length": seqs.response_mask.sum(-1).float().tolist(),
        }
        if self.task.has_gold:
            gold = [
                self.task.gold(p, a, f) for p, a, f in zip(prompts, seqs.responses, finished, strict=True)
            ]
            sft_gold = [
                self.task.gold(p, a, f)
                for p, (a, f) in zip(prompts, self.state.sft_eval_answers, strict=True)
            ]
            per_answer["gold"] = gold
            per_answer["win_rate_vs_sft"] = [_win(g, s, 1e-9) for g, s in zip(gold, sft_gold, strict=True)]
        elif self.reward_initial is not None:  # no gold: the fixed initial reward model judges
            with self._reward_weights(self.reward_initial):
                mine = reward_scores(self.pm, seqs.input_ids, seqs.attention_mask, self.counters)
                theirs = self._score_texts(prompts, [a for a, _ in self.state.sft_eval_answers])
            per_answer["win_rate_vs_sft"] = [
                _win(a, b, 0.0) for a, b in zip(mine.tolist(), theirs.tolist(), strict=True)
            ]
            per_answer["reward_initial"] = mine.tolist()
        metrics: dict[str, float] = {}
        for name, values in per_answer.items():
            mean, se = mean_and_standard_error(values, n)
            metrics[f"eval/{name}"] = mean
            if name != "response_length":
                metrics[f"eval/{name}_se"] = se
        self.metrics(metrics, type="eval")
        row = {
            "label": label,
            "iteration": self.state.iteration if label != "sft" else None,
            "elapsed": self.clock.elapsed(),
            **metrics,
        }
        self.state.history.append(row)
        self.write_samples(
            prompts[:16],
            seqs.responses[:16],
            scores[:16].tolist(),
            [self.task.gold(p, a) for p, a in zip(prompts[:16], seqs.responses[:16], strict=True)]
            if self.task.has_gold
            else None,
            kind="eval",
        )
        return metrics

    def run_eval(self) -> None:
        i = self.state.iteration
        if self.interplay is not None:
            with torch.no_grad():
                self.metrics(self.interplay.end_iteration(*self.adapter_views()))
        if hasattr(self.method, "end_iteration"):
            with torch.no_grad():
                iteration_metrics = self.method.end_iteration(i)
            if iteration_metrics:
                self.metrics(iteration_metrics)
        runaway = self.watch(self.evaluate(label=f"iter {i}"))
        if runaway and self.recipe.policy.max_kl_action == "rollback":
            self.roll_back(i, runaway)
            return
        self.state.rollouts = []
        self.state.judged_pairs = None
        self.state.judge_stats = {}
        self.reward_before_refine = None
        self.state.iteration += 1
        done = self.state.iteration >= self.recipe.train.iterations
        self.end_stage("done" if done else "policy", checkpoint=f"iter-{i:04d}")
        if runaway:
            raise StopRun(f"{runaway}; the run stopped after checkpoint iter-{i:04d}", failed=True)

    # -- runaway detection -------------------------------------------------------------------------------
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

    def watch(self, metrics: dict[str, float]) -> str | None:
        """After a held-out evaluation: the watchdog's warnings, and the reason to stop (or roll back) when
        the held-out KL exceeds policy.max_kl."""
        w = self.recipe.watchdog
        earlier = self.state.history[:-1]  # evaluate() appended this evaluation's row last
        for warning in check_runaway(
            metrics,
            earlier,
            kl_jump_factor=w.kl_jump_factor,
            kl_jump_min=w.kl_jump_min,
            gold_drop=w.gold_drop,
        ):
            self.warn(warning.code, warning.message, **warning.fields)
        limit, kl = self.recipe.policy.max_kl, metrics.get("eval/kl")
        if limit and kl is not None and kl > limit:
            action = self.recipe.policy.max_kl_action
            self.warn(
                "max_kl",
                f"held-out KL {kl:.2f} exceeds policy.max_kl = {limit:g} after iteration "
                f"{self.state.iteration}: {'rolling back to the last checkpoint' if action == 'rollback' else 'stopping'}",
                kl=kl,
                max_kl=limit,
                action=action,
            )
            return f"held-out KL {kl:.2f} > policy.max_kl = {limit:g} after iteration {self.state.iteration}"
        return None

    def roll_back(self, iteration: int, reason: str) -> None:
        """Restore the checkpoint written at the end of the previous iteration (the reward model's for
        iteration 0) and finish the run with that policy; time, compute and warnings are kept."""
        folder = self.iteration_checkpoint(iteration - 1)
        elapsed, counters = self.clock.elapsed(), self.counters.state_dict()
        warnings, count, global_step = self.state.warnings, self.state.warning_count, self.state.global_step
        self.load_checkpoint(folder)
        self.clock = Stopwatch(elapsed)
        self.counters.load_state_dict(counters)
        self.state.warnings, self.state.warning_count, self.state.global_step = warnings, count, global_step
        self.state.stage, self.state.step = "done", 0
        self.emit("rollback", checkpoint=folder.name, reason=reason)
        self.writer.update_status(rolled_back_to=folder.name, stopped_by=reason)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _iteration_or_none(self) -> int | None:
        return self.state.iteration if self.state.stage in ("policy", "refine", "eval") else None

    def advance(self) -> None:
        self.state.step += 1
        self.state.global_step += 1

    def emit(self, type: str, **fields: Any) -> dict:
        event = self.writer.emit(
            type,
            stage=self.state.stage,
            iteration=self._iteration_or_none(),
            step=self.state.step,
            global_step=self.state.global_step,
            elapsed=round(self.clock.elapsed(), 3),
            **fields,
        )
        if self.listener is not None:
            self.listener(event)
        return event

    def metrics(self, values: dict[str, float], type: str = "metrics") -> None:
        values = dict(values)
        values.update(self.counters.metrics())
        values["time/elapsed_s"] = round(self.clock.elapsed(), 3)
        values.update(memory_metrics(self.device))
        self.state.latest.update({k: v for k, v in values.items() if isinstance(v, (int, float))})
        self.emit(type, metrics=values)
        self.writer.update_status(
            stage=self.state.stage,
            iteration=self._iteration_or_none(),
            step=self.state.step,
            global_step=self.state.global_step,
            latest=self.state.latest,
            elapsed=self.clock.elapsed(),
        )

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
                "iteration": self._iteration_or_none(),
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

    def _out_of_memory(self, stage: str) -> str:
        r = self.recipe
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

    def _check_finite(self, loss: torch.Tensor | float, stage: str, name: str) -> None:
        if not math.isfinite(float(loss)):
            raise TrainingFailed(
                f"{name} became {float(loss)} at {stage} step {self.state.step}; lower the learning rate "
                f"({self._lr_setting(stage)}) in a new run, or in the run's recipe.toml before `zopro run --resume`"
            )

    def _lr_setting(self, stage: str) -> str:
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

    def end_stage(self, next_stage: str, checkpoint: str | None = None) -> None:
        finished = self.state.stage
        self.emit(
            "stage_end",
            wall_s=round(time.monotonic() - self.stage_started, 3),
            peak_rss_mib=round(peak_rss_mib(), 1),
            counters=self.counters.per_stage.get(finished, {}),
            **(
                {"cuda_peak_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}
                if self.device.type == "cuda"
                else {}
            ),
        )
        self.state.stage = next_stage
        self.state.step = 0
        if checkpoint:
            self.checkpoint(checkpoint)

    # -- checkpoints and control -------------------------------------------------------------------------
    def checkpoint(self, name: str) -> None:
        self.state.elapsed = self.clock.elapsed()
        self.state.event_seq = self.writer.seq + 1  # the checkpoint event itself is kept
        self.state.counters = self.counters.state_dict()
        with self.writer.checkpoint(name) as folder:
            save_adapters(self.pm, folder)
            torch.save(
                {
                    "sft_optimizer": self.sft_optimizer.state_dict(),
                    "reward_optimizer": self.reward_optimizer.state_dict(),
                    "refine_optimizer": self.refine_optimizer.state_dict(),
                    "method": self.method.state_dict(),
                    "kl_controller": self.kl_controller.state_dict(),
                    "reward_before_refine": self.reward_before_refine,
                    "interplay": self.interplay.state_dict() if self.interplay is not None else None,
                    "reward_initial": self.reward_initial,
                },
                folder / "trainer_state.pt",
            )
            (folder / "state.json").write_text(json.dumps(asdict(self.state), indent=1))
        self.emit("checkpoint", name=name)

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint; CheckpointUnreadable (nothing applied) when a file is truncated or garbage.
        trainer_state.pt is read with weights_only: tensors and plain values, never code."""
        try:
            state = _run_state(json.loads((folder / "state.json").read_text()))
        except (OSError, ValueError, TypeError, RecursionError) as error:
            raise CheckpointUnreadable(f"state.json: {_first_line(error)}") from None
        try:
            adapters = read_adapters(folder, self.device)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointUnreadable(f"adapters: {_first_line(error)}") from None
        try:
            trainer = torch.load(folder / "trainer_state.pt", map_location=self.device, weights_only=True)
        except Exception as error:  # noqa: BLE001 - truncated zip, a pickle that is not plain data, ...
            raise CheckpointUnreadable(f"trainer_state.pt: {_first_line(error)}") from None
        try:
            apply_adapters(self.pm, adapters)
            self.sft_optimizer.load_state_dict(trainer["sft_optimizer"])
            self.reward_optimizer.load_state_dict(trainer["reward_optimizer"])
            self.refine_optimizer.load_state_dict(trainer["refine_optimizer"])
            self.method.load_state_dict(trainer["method"])
            self.kl_controller.load_state_dict(trainer.get("kl_controller"))
            self.reward_before_refine = trainer["reward_before_refine"]
            self.reward_initial = trainer.get("reward_initial")
            if self.interplay is not None and trainer.get("interplay") is not None:
                self.interplay.load_state_dict(trainer["interplay"])
            self.counters.load_state_dict(state.counters)
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as error:
            raise CheckpointUnreadable(f"does not fit this run ({_first_line(error)})") from None
        self.state = state
        self.clock = Stopwatch(self.state.elapsed)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.signal_received = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                _leave_the_terminal()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGHUP, handler)  # the SSH connection dropped: stop cleanly, like SIGTERM

    def between_steps(self) -> None:
        """Poll control requests and signals; pause, checkpoint or stop here, where the state is whole."""
        requests = self.writer.take_requests()
        if "checkpoint" in requests:
            self.checkpoint("resume")
        if "pause" in requests and "resume" not in requests and "stop" not in requests:
            self.writer.update_status(state="paused")
            self.emit("paused")
            while True:
                time.sleep(0.2)
                later = self.writer.take_requests()
                if "checkpoint" in later:
                    self.checkpoint("resume")
                if "stop" in later or self.signal_received:
                    requests = ["stop"]
                    break
                if "resume" in later:
                    break
            self.writer.update_status(state="running")
            self.emit("resumed")
        if "stop" in requests or self.signal_received:
            reason = self.signal_received or "stop request"
            self.checkpoint("resume")
            raise StopRun(reason)


def _win(mine: float, theirs: float, tie: float) -> float:
    return 1.0 if mine > theirs + tie else 0.0 if mine < theirs - tie else 0.5


def mean_and_standard_error(values: list[float], per_prompt: int) -> tuple[float, float]:
    """The mean of prompt-major values (`per_prompt` answers per prompt) and its standard error over
    prompts: the answers of one prompt are averaged first, since they are not independent."""
    means = torch.tensor(values, dtype=torch.float64).view(-1, per_prompt).mean(-1)
    se = float(means.std(unbiased=True) / math.sqrt(len(means))) if len(means) > 1 else 0.0
    return float(means.mean()), se


def _leave_the_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): send what went there to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                os.dup2(devnull, fd)
    os.close(devnull)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _run_state(data: Any) -> RunState:
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


def _stage_title(stage: str, iteration: int) -> str:
    return {
        "sft": "supervised fine-tuning",
        "reward": "reward model (Bradley-Terry)",
        "policy": f"iteration {iteration}: policy optimisation",
        "refine": f"iteration {iteration}: judge and refine the reward model",
        "eval": f"iteration {iteration}: held-out evaluation",
    }.get(stage, stage)
