"""The stages of docs/method.md section 1, one function each, every one resumable at `run.state.step`:
supervised fine-tuning, the reward model, policy optimisation, judging and refining the reward model,
and the metrics at the end of an iteration. Their order is `engine.training.loop`, their bookkeeping
`run.book`, and what one leaves for the next is in the run's typed state, `run.state` (`RunState`)."""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING

import torch

from engine.data.examples import PreferencePair
from engine.recipe import GROUP_METHODS
from engine.seeds import generator, seeded
from engine.training.dynamic_sampling import refill
from engine.training.judges import GoldJudge
from engine.training.methods.group import policy_rewards
from engine.training.reward_model import (
    bradley_terry_step,
    center_reward,
    keep_close,
    reward_accuracy,
    reward_snapshot,
)
from engine.training.rollout import Rollout, encode_responses, sample, token_logprobs
from engine.training.telemetry import PhasePeak

if TYPE_CHECKING:
    from engine.training.run import Run


# -- 1. SFT on (prompt, chosen) -------------------------------------------------------------------------
def supervised_fine_tuning(run: Run) -> None:
    recipe, models, book, state = run.recipe, run.models, run.book, run.state
    examples = run.task.sft_examples(recipe.task.sft_examples)
    models.use("sft")
    params = list(models.adapter_parameters("sft").values())
    while state.step < recipe.sft.steps:
        order = torch.randperm(len(examples), generator=generator(run.seed, "sft", state.step))
        batch = [examples[i] for i in order[: recipe.sft.batch_size].tolist()][
            run.dist.shard(recipe.sft.batch_size)
        ]
        seqs = encode_responses(
            models,
            [e.prompt for e in batch],
            [e.response for e in batch],
            max_prompt_tokens=recipe.model.max_prompt_tokens,
            max_new_tokens=recipe.model.max_new_tokens,
        )
        # next-token cross-entropy on the response tokens, without the batch's full logits
        logprobs = token_logprobs(models, seqs, run.counters)
        loss = -logprobs.sum() / seqs.response_mask.sum().clamp(min=1)
        loss.backward()
        run.dist.sync_gradients(params, float(seqs.response_mask.sum()))  # the mean over tokens
        run.sft_optimizer.step()
        run.sft_optimizer.zero_grad(set_to_none=True)
        run.counters.add(backward_passes=1)
        book.check_finite(loss.detach(), "sft", "loss/sft")
        book.advance()
        if state.step % 10 == 0 or state.step == recipe.sft.steps:
            book.metrics({"loss/sft": float(loss.detach())})
        book.between_steps()


# -- 2. the Bradley-Terry reward model on (prompt, chosen, rejected) -------------------------------------
def train_reward_model(run: Run) -> None:
    recipe, book, state = run.recipe, run.book, run.state
    pairs = run.task.preference_pairs(recipe.task.preference_pairs)
    while state.step < recipe.reward.steps:
        order = torch.randperm(len(pairs), generator=generator(run.seed, "reward", state.step))
        batch = [pairs[i] for i in order[: recipe.reward.batch_size].tolist()][
            run.dist.shard(recipe.reward.batch_size)
        ]
        loss, accuracy = bradley_terry_step(
            run.models, run.counters, recipe, batch, run.reward_optimizer, score_targets=True, dist=run.dist
        )
        book.check_finite(loss, "reward", "loss/reward")
        book.advance()
        if state.step % 10 == 0 or state.step == recipe.reward.steps:
            book.metrics({"loss/reward": loss, "reward/accuracy": accuracy})
        book.between_steps()
    center_reward(run.models, run.counters, recipe, pairs)
    held_out = run.task.held_out_pairs(recipe.reward.eval_pairs)
    state.reward_initial = reward_snapshot(
        run.models
    )  # the fixed RM: eval/reward_initial, and no-gold win rates
    book.metrics({"reward/eval_accuracy": reward_accuracy(run.models, run.counters, recipe, held_out)})


# -- 3a. policy optimisation: one rollout and one update of the chosen method per step -------------------
def optimise_policy(run: Run) -> None:
    recipe, book, state = run.recipe, run.book, run.state
    i = state.iteration
    updates = recipe.train.updates_per_iteration
    if run.interplay is not None and not run.interplay.started:
        run.interplay.start(*run.adapter_views())
    method = recipe.policy.method
    switches = getattr(recipe, method) if method in GROUP_METHODS else None
    while state.step < updates:
        step = state.step
        started = time.monotonic()
        rollout = run.fresh_rollout((i, step))  # this rank's share
        sampling_metrics = {}
        if switches is not None and switches.dynamic_sampling:  # DAPO: refill the uninformative groups

            def draw(extra: int, step: int = step) -> Rollout:  # the extra-th refill of this step
                return run.fresh_rollout((i, step, extra))

            rollout, sampling_metrics = refill(
                rollout,
                draw,
                lambda r: policy_rewards(r, switches.kl_penalty),
                max_refills=switches.max_refills,
                pad_id=run.models.tokenizer.pad_token_id,
            )
        update_started, sent = time.monotonic(), run.dist.sent_bytes()
        with PhasePeak(run.device) as phase:
            update_metrics = run.method.update(
                rollout, update_index=state.policy_updates, step_in_iteration=step
            )
        if "loss/policy" in update_metrics:
            book.check_finite(update_metrics["loss/policy"], "policy", "loss/policy")
        update_metrics["time/policy_update_s"] = time.monotonic() - update_started
        if run.dist.enabled:  # what the update itself sent: a gradient bucket, or q scalars
            update_metrics["dist/update_bytes"] = run.dist.sent_bytes() - sent
        kl_sum, rows = run.dist.sum_floats([rollout.kl.sum(), rollout.kl.numel()], "the mean KL")
        run.kl_controller.update(kl_sum / rows)  # the same controller on every rank
        update_metrics["mem/update_peak_mib"] = round(phase.growth_mib, 2)
        seqs = rollout.sequences
        finished = seqs.finished.tolist()
        gold = (
            [run.task.gold(p, a, f) for p, a, f in zip(seqs.prompts, seqs.responses, finished, strict=True)]
            if run.task.has_gold
            else None
        )
        scores = rollout.scores.tolist()
        answers = run.dist.gather(  # every rank's answers, in the order of the whole batch
            list(zip(seqs.prompts, seqs.responses, scores, gold or [None] * len(scores), strict=True)),
            "gathering the rollout",
        )
        state.rollouts.extend({"prompt": p, "response": a, "score": s} for p, a, s, _ in answers)
        tokens = seqs.response_mask.sum(-1).clamp(min=1)
        entropy = float((-rollout.old_logprobs.sum(-1) / tokens).mean())
        state.policy_updates += 1
        if run.interplay is not None and recipe.interplay.every_step:
            with torch.no_grad():
                update_metrics.update(run.interplay.observe_policy_step(run.adapter_views()[0]))
        book.advance()
        book.metrics(
            {
                "objective/scores": float(rollout.scores.mean()),
                "objective/rlhf_reward": float(rollout.rlhf_reward.mean()),
                "objective/kl": float(rollout.kl.mean()),
                "policy/kl_coef": rollout.kl_coef,
                "objective/entropy": entropy,
                **({"objective/gold": sum(gold) / len(gold)} if gold else {}),
                "objective/response_length": float(seqs.response_mask.sum(-1).float().mean()),
                "objective/finished": sum(finished) / len(finished),
                "policy/update": state.policy_updates,
                "time/update_s": time.monotonic() - started,
                **update_metrics,
                **sampling_metrics,
            }
        )
        if state.policy_updates % recipe.log.samples_every == 0 or step == updates - 1:
            answer_prompts, responses, answer_scores, golds = (
                list(column) for column in zip(*answers, strict=True)
            )
            book.write_samples(
                run.user_texts(answer_prompts), responses, answer_scores, golds if gold is not None else None
            )
        if recipe.log.checkpoint_every and state.policy_updates % recipe.log.checkpoint_every == 0:
            book.checkpoint("resume")
        book.between_steps()


# -- 3b-d. least-confident rollouts, a second answer each, the judge's verdicts ------------------------------
def judge_pairs(run: Run) -> None:
    """Keep the least confident fraction of this iteration's unique rollouts (smallest |score|), sample a
    second answer per kept prompt from the updated policy, and let the judge pick the better one (order
    randomised against position bias; unparseable verdicts are dropped and counted)."""
    recipe, models, state = run.recipe, run.models, run.state
    i = state.iteration
    seen: set[tuple[str, str]] = set()
    unique = []
    for row in state.rollouts:
        key = (row["prompt"], row["response"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    unique.sort(key=lambda row: abs(row["score"]))
    kept = unique[: max(1, math.ceil(recipe.refine.keep_fraction * len(unique)))]
    prompts = [row["prompt"] for row in kept]
    dist, share = run.dist, run.dist.shard(len(prompts))  # each rank answers and judges its share
    with torch.no_grad(), models.adapter("policy"):
        second = sample(
            models,
            prompts,
            max_new_tokens=recipe.model.max_new_tokens,
            max_prompt_tokens=recipe.model.max_prompt_tokens,
            temperature=recipe.policy.temperature,
            generator=generator(run.seed, "second", i),
            counters=run.counters,
            rows=share if dist.enabled else None,
        )
    seconds_answers = dist.gather(second.responses, "gathering the second answers")
    judge = run.judge()
    coin = random.Random(seeded(run.seed, "judge-order", i))
    flips = [coin.random() < 0.5 for _ in kept]  # order randomised against position bias
    firsts = [row["response"] if not f else b for row, b, f in zip(kept, seconds_answers, flips, strict=True)]
    seconds = [
        b if not f else row["response"] for row, b, f in zip(kept, seconds_answers, flips, strict=True)
    ]

    def judged(by) -> list:
        return dist.gather(by.compare(prompts[share], firsts[share], seconds[share]), "gathering verdicts")

    verdicts = judged(judge)
    pairs = [
        PreferencePair(prompt, a if verdict == 0 else b, b if verdict == 0 else a)
        for prompt, a, b, verdict in zip(prompts, firsts, seconds, verdicts, strict=True)
        if verdict is not None
    ]
    state.judged_pairs = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    state.judge_stats = {
        "rollouts": len(state.rollouts),
        "unique": len(unique),
        "kept": len(kept),
        "judged": len(pairs),
        "no_verdict": len(kept) - len(pairs),
    }
    if judge.name == "gold" and pairs:  # the gold judge is the truth
        state.judge_stats["agreement_with_gold"] = 1.0
    elif run.task.has_gold:  # how often this judge agrees with the truth
        truth = judged(GoldJudge(run.task))
        both = [(v, t) for v, t in zip(verdicts, truth, strict=True) if v is not None and t is not None]
        if both:
            agreement = sum(v == t for v, t in both) / len(both)
            state.judge_stats["agreement_with_gold"] = round(agreement, 4)
            state.judge_stats["agreement_with_gold_pct"] = round(100 * agreement)
    state.reward_before_refine = reward_snapshot(models)


# -- 3e-f. refine the reward model on the judged pairs, then keep it close ---------------------------------
def refine_reward_model(run: Run) -> None:
    recipe, book, state = run.recipe, run.book, run.state
    i = state.iteration
    if state.judged_pairs is None:
        judge_pairs(run)
        book.emit("judge", **state.judge_stats, judge=recipe.refine.judge)
        if "agreement_with_gold" in state.judge_stats:  # drawn beside the refinement's loss
            book.metrics({"judge/agreement_with_gold": state.judge_stats["agreement_with_gold"]})
    pairs = [PreferencePair(**pair) for pair in state.judged_pairs]
    per_epoch = math.ceil(len(pairs) / recipe.refine.batch_size) if pairs else 0
    steps = recipe.refine.epochs * per_epoch
    while state.step < steps:
        epoch, k = divmod(state.step, per_epoch)
        order = torch.randperm(len(pairs), generator=generator(run.seed, "refine", i, epoch)).tolist()
        batch = [pairs[j] for j in order[k * recipe.refine.batch_size : (k + 1) * recipe.refine.batch_size]]
        batch = batch[run.dist.shard(len(batch))]
        loss, accuracy = bradley_terry_step(
            run.models, run.counters, recipe, batch, run.refine_optimizer, dist=run.dist
        )
        if batch:  # with several ranks a small last batch may leave a rank without pairs
            book.check_finite(loss, "refine", "loss/reward_refine")
        book.advance()
        book.metrics({"loss/reward_refine": loss, "reward/refine_accuracy": accuracy} if batch else {})
        book.between_steps()
    if recipe.refine.keep_close and state.reward_before_refine is not None:
        keep_close(run.models, state.reward_before_refine, recipe.refine.keep_close_alpha)
    state.global_step += max(0, run.planned_refine_steps - steps)  # on to the plan: a fixed total


# -- the end of an iteration ----------------------------------------------------------------------------
@torch.no_grad()
def iteration_metrics(run: Run) -> None:
    """The interplay tracker's and the method's numbers over the iteration just ended."""
    if run.interplay is not None:
        run.book.metrics(run.interplay.end_iteration(*run.adapter_views()))
    metrics = run.method.end_iteration(run.state.iteration)
    if metrics:
        run.book.metrics(metrics)
