"""One run's parts: the recipe, the task and its prompts, the model with its adapters, the optimisers, the
policy-update method, the KL controller, the interplay tracker and the bookkeeping (`RunBook`); what a
checkpoint holds of them; and the run's shared services (the rollout of one update, a quick score probe).
The stages are in `engine.training.stages`, the order they run in is `engine.training.loop`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.analysis.interplay import InterplayTracker
from engine.data.chat_task import PromptTooLong, speak_through_chat_template
from engine.data.preference_data import DataError
from engine.data.tasks import make_task
from engine.recipe import GROUP_METHODS, Recipe
from engine.rundir.safe_io import plain_tree
from engine.rundir.writer import RunWriter
from engine.seeds import generator
from engine.training.adapter_history import AdapterHistory
from engine.training.adapter_keys import adapter_views, pair_adapter_tensors
from engine.training.bookkeeping import CheckpointUnreadable, RunBook
from engine.training.distributed import Distributed
from engine.training.gguf_base import is_gguf_reference
from engine.training.judges import GoldJudge, Judge, LLMJudge, RewardJudge
from engine.training.kl_control import KLController
from engine.training.methods import make_update
from engine.training.methods.context import MethodContext
from engine.training.models import (
    ModelError,
    apply_adapters,
    load_preference_model,
    read_adapters,
    resolve_base,
    resolve_device,
    save_adapters,
)
from engine.training.rollout import Rollout, collect_rollout, reward_scores, sample
from engine.training.run_state import RunState, run_state
from engine.training.telemetry import Counters, Stopwatch

__all__ = ["CheckpointUnreadable", "Run"]


class Run:
    """One run: owns the model, the task, the optimisers, the method and the bookkeeping."""

    def __init__(
        self,
        recipe: Recipe,
        writer: RunWriter,
        *,
        listener=None,
        dist: Distributed | None = None,
        notice: Callable[[str], None] | None = None,
    ):
        """`notice`: told, in one sentence, of a slow step of the start (building the built-in model)."""
        self.recipe = recipe
        self.dist = dist if dist is not None else Distributed()
        self.book = RunBook(recipe, writer, listener=listener, dist=self.dist)
        self.seed = recipe.seed
        self._check_split(recipe)
        try:
            self.task = make_task(recipe)
        except DataError as error:
            raise ModelError(f"data.path = {recipe.data.path!r}: {error}") from None
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        self.device = self.book.device = self.dist.device(resolve_device(recipe.device))
        with self.dist.main_first():  # rank 0 builds (or downloads) into the shared cache, the others read it
            base = resolve_base(
                recipe.model.base,
                self.task.corpus(),
                recipe.seed,
                recipe.model.cache_dir,
                self.task.pretraining_text(),
                on_build=notice,
            )
        m = recipe.model
        self.models = load_preference_model(
            base,
            dtype=m.dtype,
            device=self.device,
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha,
            target_modules=m.target_modules,
            seed=recipe.seed,
            gradient_checkpointing=m.gradient_checkpointing,
        )
        self.data_report = None
        if hasattr(self.task, "bind"):  # a dataset: format prompts for this tokenizer, drop over-long rows
            try:
                self.data_report = self.task.bind(
                    self.models.tokenizer, m.max_prompt_tokens + m.max_new_tokens
                )
            except DataError as error:
                raise ModelError(f"data.path = {recipe.data.path!r}: {error}") from None
        self.dist.broadcast_parameters(
            [p for p in self.models.model.parameters() if p.requires_grad]
            + list(self.models.score_head.parameters())
        )
        try:  # a built-in task meets a real instruct model through its chat template
            self.task = speak_through_chat_template(self.task, self.models.tokenizer, m.max_prompt_tokens)
        except PromptTooLong as error:
            raise ModelError(str(error)) from None
        self.train_prompts = self.task.prompts(recipe.task.train_prompts, "train")
        self.eval_prompts = self.task.prompts(recipe.task.eval_prompts, "eval")
        self.sft_optimizer = torch.optim.AdamW(
            self.models.adapter_parameters("sft").values(), lr=recipe.sft.lr
        )
        self.reward_optimizer = self._reward_optimizer(recipe.reward.lr)
        self.refine_optimizer = self._reward_optimizer(recipe.refine.lr)
        self.interplay: InterplayTracker | None = None
        if recipe.interplay.enabled or recipe.policy.method == "zopro":
            try:
                keys = [key for key, _, _ in pair_adapter_tensors(dict(self.models.model.named_parameters()))]
            except ValueError as error:
                raise ModelError(
                    f"the policy and reward adapters do not pair up key by key, which zopro and "
                    f"interplay need: {error}"
                ) from None
            if recipe.interplay.enabled:
                self.interplay = InterplayTracker(
                    keys, sketch_size=recipe.interplay.sketch_size, seed=recipe.seed
                )
        # ZOPrO's mu and v: the adapters at the last two iteration boundaries, in memory
        self.adapter_history = AdapterHistory(keep=2) if recipe.policy.method == "zopro" else None
        self.method_context = MethodContext(
            models=self.models,
            counters=self.counters,
            recipe=recipe,
            current_iteration=lambda: self.state.iteration,
            warn=self.book.warn,
            score_policy=self.score_policy,
            fresh_rollout=self.fresh_rollout,
            adapter_history=self.adapter_history,
            dist=self.dist,
        )
        self.method = make_update(recipe.policy.method, self.method_context)
        policy = recipe.policy
        self.kl_controller = KLController(policy.kl_coef, policy.kl_target, policy.kl_horizon)
        self.llm_judge: LLMJudge | None = None
        self.book.fill_checkpoint = self.save_training_state

    def _check_split(self, recipe: Recipe) -> None:
        """The recipe's batches are global: with N ranks each must give every rank a share, and the
        update's prompts an equal one (the zeroth-order g of a direction is the mean of the ranks')."""
        world = self.dist.world_size
        if world == 1:
            return
        if recipe.train.prompts_per_update % world:
            raise ModelError(
                f"train.prompts_per_update = {recipe.train.prompts_per_update} cannot be split evenly over "
                f"{world} ranks; use a multiple of {world}, or another --nproc-per-node"
            )
        method = recipe.policy.method
        if method in GROUP_METHODS and getattr(recipe, method).dynamic_sampling:
            raise ModelError(
                f"{method}.dynamic_sampling = true runs on one process (it refills one rank's batch); set it "
                "to false with several ranks"
            )
        for key, value in (
            ("sft.batch_size", recipe.sft.batch_size),
            ("reward.batch_size", recipe.reward.batch_size),
        ):
            if value < world:
                raise ModelError(f"{key} = {value} is smaller than the {world} ranks; use at least {world}")

    def _reward_optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = list(self.models.adapter_parameters("reward").values()) + list(
            self.models.score_head.parameters()
        )
        return torch.optim.AdamW(params, lr=lr)

    # -- the bookkeeping's view of the loop position -----------------------------------------------------
    @property
    def state(self) -> RunState:
        return self.book.state

    @property
    def counters(self) -> Counters:
        return self.book.counters

    @property
    def planned_refine_steps(self) -> int:
        """The refinement's steps when every rollout is unique and judged: the most it takes. It takes fewer
        when rollouts repeat or the judge gives no verdict; the step count then jumps to the plan at the end
        of the refinement, so that `total_steps` is fixed from the start."""
        recipe = self.recipe
        kept = math.ceil(
            recipe.refine.keep_fraction
            * recipe.train.prompts_per_update
            * recipe.train.samples_per_prompt
            * recipe.train.updates_per_iteration
        )
        return recipe.refine.epochs * math.ceil(kept / recipe.refine.batch_size)

    @property
    def total_steps(self) -> int:
        recipe = self.recipe
        iteration = recipe.train.updates_per_iteration + self.planned_refine_steps
        return recipe.sft.steps + recipe.reward.steps + recipe.train.iterations * iteration

    # -- shared services of the stages and the methods ---------------------------------------------------
    def iteration_prompts(self, iteration: int) -> list[str]:
        """Iteration i trains on its own chunk of the training prompts."""
        per = max(
            len(self.train_prompts) // self.recipe.train.iterations, self.recipe.train.prompts_per_update
        )
        start = (iteration * per) % len(self.train_prompts)
        chunk = (self.train_prompts + self.train_prompts)[start : start + per]
        return chunk

    def adapter_views(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """{key: tensor} of the policy and of the reward adapter, keyed alike (peft's saved names)."""
        return adapter_views(pair_adapter_tensors(dict(self.models.model.named_parameters())))

    def remember_adapters(self, iteration: int) -> None:
        """The adapters as the end of `iteration` leaves them (-1: the reward model's), for ZOPrO's history."""
        if self.adapter_history is not None:
            self.adapter_history.record(iteration, *self.adapter_views())

    def rollout(self, prompts: list[str], gen: torch.Generator) -> Rollout:
        """The shared rollout of one update on `prompts` with this run's settings (this rank's share of
        the prompts when there are several; advantages whitened over the whole batch)."""
        recipe, dist = self.recipe, self.dist
        return collect_rollout(
            self.models,
            prompts,
            k=recipe.train.samples_per_prompt,
            kl_coef=self.kl_controller.value,
            missing_eos_penalty=recipe.policy.missing_eos_penalty,
            reward_clip=recipe.policy.reward_clip,
            whiten_advantages=recipe.policy.whiten_advantages,
            max_new_tokens=recipe.model.max_new_tokens,
            max_prompt_tokens=recipe.model.max_prompt_tokens,
            temperature=recipe.policy.temperature,
            generator=gen,
            counters=self.counters,
            prompt_rows=dist.shard(len(prompts)) if dist.enabled else None,
            sums=dist.sum_floats if dist.enabled else None,
        )

    def fresh_rollout(self, where: tuple) -> Rollout:
        """A rollout on train.prompts_per_update training prompts of this iteration, drawn and sampled on the
        generators of `where`: an update's (iteration, step), a refill's, a diagnostic's."""
        chunk = self.iteration_prompts(self.state.iteration)
        order = torch.randperm(len(chunk), generator=generator(self.seed, "prompts", *where))
        prompts = [chunk[j] for j in order[: self.recipe.train.prompts_per_update].tolist()]
        return self.rollout(prompts, generator(self.seed, "rollout", *where))

    @torch.no_grad()
    def score_policy(self, *where: Any, count: int) -> dict[str, float]:
        """Mean reward-model score (and gold) of one fresh answer on each of the first `count` held-out
        prompts from the active adapter, on the generator of `where`: a quick probe (the premise check),
        not the evaluation."""
        recipe = self.recipe
        prompts = self.eval_prompts[:count]
        seqs = sample(
            self.models,
            prompts,
            max_new_tokens=recipe.model.max_new_tokens,
            max_prompt_tokens=recipe.model.max_prompt_tokens,
            temperature=recipe.eval.temperature,
            generator=generator(self.seed, *where),
            counters=self.counters,
        )
        scores = reward_scores(self.models, seqs.input_ids, seqs.attention_mask, self.counters)
        out = {"reward": float(scores.mean())}
        if self.task.has_gold:
            finished = seqs.finished.tolist()
            gold = [
                self.task.gold(p, a, f) for p, a, f in zip(prompts, seqs.responses, finished, strict=True)
            ]
            out["gold"] = sum(gold) / len(gold)
        return out

    def user_texts(self, prompts: list[str]) -> list[str]:
        """The words a person asked, for the samples: a chat-rendered built-in prompt without its markup."""
        user_text = getattr(self.task, "user_text", None)
        return [user_text(p) for p in prompts] if user_text is not None else list(prompts)

    def judge(self) -> Judge:
        """The recipe's judge (refine.judge); the llm judge is loaded once, on first use."""
        recipe = self.recipe
        if recipe.refine.judge == "gold":
            return GoldJudge(self.task)
        if recipe.refine.judge == "reward":
            return RewardJudge(
                self.models, self.counters, recipe.model.max_prompt_tokens, recipe.model.max_new_tokens
            )
        if self.llm_judge is None:
            judge_model = recipe.refine.judge_model
            if is_gguf_reference(judge_model):  # a GGUF judge is read from the model cache too
                judge_model = resolve_base(judge_model, [], recipe.seed, recipe.model.cache_dir)
            self.llm_judge = LLMJudge(
                judge_model,
                device=self.device,
                dtype=recipe.refine.judge_dtype,
                counters=self.counters,
                user_text=getattr(self.task, "user_text", None),
            )
        return self.llm_judge

    # -- what a checkpoint holds -------------------------------------------------------------------------
    def save_training_state(self, folder: Path) -> None:
        """Adapters (loadable with peft) and the optimisers, the method, the controllers and the run
        state's reward snapshots; RunBook.checkpoint adds state.json (the rest of the run state)."""
        save_adapters(self.models, folder)
        torch.save(
            {
                "sft_optimizer": self.sft_optimizer.state_dict(),
                "reward_optimizer": self.reward_optimizer.state_dict(),
                "refine_optimizer": self.refine_optimizer.state_dict(),
                "method": self.method.state_dict(),
                "kl_controller": self.kl_controller.state_dict(),
                "reward_before_refine": self.state.reward_before_refine,
                "interplay": self.interplay.state_dict() if self.interplay is not None else None,
                "reward_initial": self.state.reward_initial,
            },
            folder / "trainer_state.pt",
        )

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint; CheckpointUnreadable (nothing applied) when a file is truncated or garbage.
        trainer_state.pt is read with weights_only: tensors and plain values, never code."""
        try:  # a link would read another file, a FIFO would hang the read
            plain_tree(folder)
        except OSError as error:
            raise CheckpointUnreadable(f"{Path(error.filename).name} {error.strerror}") from None
        try:
            state = run_state(json.loads((folder / "state.json").read_text()))
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
            apply_adapters(self.models, adapters)
            self.sft_optimizer.load_state_dict(trainer["sft_optimizer"])
            self.reward_optimizer.load_state_dict(trainer["reward_optimizer"])
            self.refine_optimizer.load_state_dict(trainer["refine_optimizer"])
            self.method.load_state_dict(trainer["method"])
            self.kl_controller.load_state_dict(trainer.get("kl_controller"))
            state.reward_before_refine = trainer["reward_before_refine"]
            state.reward_initial = trainer.get("reward_initial")
            if self.interplay is not None and trainer.get("interplay") is not None:
                self.interplay.load_state_dict(trainer["interplay"])
            self.counters.load_state_dict(state.counters)
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as error:
            raise CheckpointUnreadable(
                f"does not fit this run's model and adapters ({_first_line(error)}); were model settings "
                "changed in recipe.toml?"
            ) from None
        self.book.state = state
        self.book.clock = Stopwatch(state.elapsed)
        if self.adapter_history is not None:  # the one place the history is read from files
            self.adapter_history.clear()
            if state.stage in ("policy", "refine", "eval"):
                for boundary in (state.iteration - 2, state.iteration - 1):
                    if boundary >= -1:
                        self.adapter_history.read_checkpoint(
                            boundary, self.book.iteration_checkpoint(boundary)
                        )

    def roll_back(self, iteration: int, reason: str) -> None:
        """Restore the checkpoint written at the end of the previous iteration (the reward model's for
        iteration 0) and finish the run with that policy; time, compute and warnings are kept."""
        book = self.book
        folder = book.iteration_checkpoint(iteration - 1)
        elapsed, counters = book.clock.elapsed(), self.counters.state_dict()
        warnings, count, global_step = self.state.warnings, self.state.warning_count, self.state.global_step
        self.load_checkpoint(folder)
        book.clock = Stopwatch(elapsed)
        self.counters.load_state_dict(counters)
        self.state.warnings, self.state.warning_count, self.state.global_step = warnings, count, global_step
        self.state.stage, self.state.step = "done", 0
        book.emit("rollback", checkpoint=folder.name, reason=reason)
        book.writer.update_status(rolled_back_to=folder.name, stopped_by=reason)


def _first_line(error: BaseException) -> str:
    """The gist of an error in one line: its first line, and the next one when the first only announces
    a list (torch's "Error(s) in loading state_dict for PeftModel:")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text[:300]
