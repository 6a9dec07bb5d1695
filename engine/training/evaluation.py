"""The held-out evaluation that closes every iteration (and gives the SFT baseline), and the watchdog
that reads it: gold score, win rate against the SFT policy, reward, KL, each with its standard error.

Two reward-model scores: `eval/reward` under the reward model as it is now (refined every iteration, so
not comparable across iterations) and `eval/reward_initial` under the reward model of the reward stage,
never refined (the fixed-RM score: the one to compare across iterations)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from engine.seeds import generator
from engine.training.reward_model import reward_weights, score_texts
from engine.training.rollout import reward_scores, sample, token_logprobs
from engine.training.watchdog import check as check_runaway

if TYPE_CHECKING:
    from engine.training.run import Run


def win(ours: float, theirs: float, tie: float) -> float:
    return 1.0 if ours > theirs + tie else 0.0 if ours < theirs - tie else 0.5


def mean_and_standard_error(values: list[float], per_prompt: int) -> tuple[float, float]:
    """The mean of prompt-major values (`per_prompt` answers per prompt) and its standard error over
    prompts: the answers of one prompt are averaged first, since they are not independent."""
    means = torch.tensor(values, dtype=torch.float64).view(-1, per_prompt).mean(-1)
    se = float(means.std(unbiased=True) / math.sqrt(len(means))) if len(means) > 1 else 0.0
    return float(means.mean()), se


@torch.no_grad()
def evaluate(run: Run, label: str) -> dict[str, float]:
    """Mean gold score of the policy on held-out prompts and its win rate against the SFT policy, each
    with its standard error over prompts (`eval/<name>_se`). `eval.samples_per_prompt` answers per
    prompt; the same eval generator every time, so iterations differ only by the policy."""
    recipe, models, state, counters, dist = run.recipe, run.models, run.state, run.counters, run.dist
    n = recipe.eval.samples_per_prompt
    everyone = [p for p in run.eval_prompts for _ in range(n)]  # prompt-major: n answers each
    share = dist.shard(len(everyone))  # each rank answers its share; the lists are gathered below
    prompts = everyone[share]
    kwargs = dict(
        max_new_tokens=recipe.model.max_new_tokens,
        max_prompt_tokens=recipe.model.max_prompt_tokens,
        temperature=recipe.eval.temperature,
        counters=counters,
        rows=share if dist.enabled else None,
    )
    if not state.sft_eval_answers:
        with models.adapter("sft"):
            sft = sample(models, everyone, generator=generator(run.seed, "eval"), **kwargs)
        state.sft_eval_answers = dist.gather(
            list(zip(sft.responses, sft.finished.tolist(), strict=True)), "gathering the SFT answers"
        )
    sft_answers = state.sft_eval_answers[share]
    with models.adapter("policy"):
        seqs = sample(models, everyone, generator=generator(run.seed, "eval"), **kwargs)
        logprobs = token_logprobs(models, seqs, counters)
    with models.adapter("sft"):
        ref = token_logprobs(models, seqs, counters)
    scores = reward_scores(models, seqs.input_ids, seqs.attention_mask, counters)
    finished = seqs.finished.tolist()
    per_answer: dict[str, list[float]] = {
        "reward": scores.tolist(),
        "kl": (logprobs - ref).sum(-1).tolist(),
        "response_length": seqs.response_mask.sum(-1).float().tolist(),
    }
    task = run.task
    if task.has_gold:
        gold = [task.gold(p, a, f) for p, a, f in zip(prompts, seqs.responses, finished, strict=True)]
        sft_gold = [task.gold(p, a, f) for p, (a, f) in zip(prompts, sft_answers, strict=True)]
        per_answer["gold"] = gold
        per_answer["win_rate_vs_sft"] = [win(g, s, 1e-9) for g, s in zip(gold, sft_gold, strict=True)]
    if (
        state.reward_initial is not None
    ):  # the fixed reward model (never refined): comparable across iterations
        with reward_weights(models, state.reward_initial):
            fixed = reward_scores(models, seqs.input_ids, seqs.attention_mask, counters)
            if not task.has_gold:  # no gold: the fixed reward model judges the win rate too
                sft_scores = score_texts(models, counters, recipe, prompts, [a for a, _ in sft_answers])
                per_answer["win_rate_vs_sft"] = [
                    win(a, b, 0.0) for a, b in zip(fixed.tolist(), sft_scores.tolist(), strict=True)
                ]
        per_answer["reward_initial"] = fixed.tolist()
    responses, score_list = seqs.responses, scores.tolist()
    if dist.enabled:  # every rank's share, in the order of the whole batch: one gather
        parts = dist.gather([(per_answer, responses, score_list)], "gathering the evaluation")
        per_answer = {name: [v for part, _, _ in parts for v in part[name]] for name in per_answer}
        responses = [a for _, part, _ in parts for a in part]
        score_list = [s for _, _, part in parts for s in part]
    metrics: dict[str, float] = {}
    for name, values in per_answer.items():
        mean, se = mean_and_standard_error(values, n)
        metrics[f"eval/{name}"] = mean
        if name != "response_length":
            metrics[f"eval/{name}_se"] = se
    run.book.metrics(metrics, type="eval")
    row = {
        "label": label,
        "iteration": state.iteration if label != "sft" else None,
        "elapsed": run.book.clock.elapsed(),
        **metrics,
    }
    state.history.append(row)
    run.book.write_samples(
        run.user_texts(everyone[:16]),
        responses[:16],
        score_list[:16],
        [task.gold(p, a) for p, a in zip(everyone[:16], responses[:16], strict=True)]
        if task.has_gold
        else None,
        kind="eval",
    )
    return metrics


def watch(run: Run, metrics: dict[str, float]) -> str | None:
    """After a held-out evaluation: the watchdog's warnings, and the reason to stop (or roll back) when
    the held-out KL exceeds policy.max_kl."""
    limits, state, book = run.recipe.watchdog, run.state, run.book
    earlier = state.history[:-1]  # evaluate() appended this evaluation's row last
    for warning in check_runaway(
        metrics,
        earlier,
        kl_jump_factor=limits.kl_jump_factor,
        kl_jump_min=limits.kl_jump_min,
        gold_drop=limits.gold_drop,
    ):
        book.warn(warning.code, warning.message, **warning.fields)
    limit, kl = run.recipe.policy.max_kl, metrics.get("eval/kl")
    if limit and kl is not None and kl > limit:
        action = run.recipe.policy.max_kl_action
        book.warn(
            "max_kl",
            f"held-out KL {kl:.2f} exceeds policy.max_kl = {limit:g} after iteration "
            f"{state.iteration + 1}: {'rolling back to the last checkpoint' if action == 'rollback' else 'stopping'}",
            kl=kl,
            max_kl=limit,
            action=action,
        )
        return f"held-out KL {kl:.2f} > policy.max_kl = {limit:g} after iteration {state.iteration + 1}"
    return None
