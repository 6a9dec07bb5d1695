"""DAPO's dynamic sampling (arXiv 2503.14476, docs/method.md section 2b): drop the groups whose k rewards
are all equal (their group-normalised advantages are zero: no gradient), and refill the batch with the
informative groups of further rollouts on fresh prompts, at most `max_refills` of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.training.rollout import Rollout, Sequences


def informative_groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(groups,) bool: the group's rewards are not all equal (TRL's frac_reward_zero_std counts the rest)."""
    std = rewards.view(-1, k).std(-1)
    return ~torch.isclose(std, torch.zeros_like(std))


def select_groups(rollout: Rollout, groups: torch.Tensor) -> Rollout:
    """The rollout restricted to the groups (prompt indices) `groups`, in that order."""
    k = rollout.samples_per_prompt
    rows = (groups[:, None] * k + torch.arange(k)).reshape(-1).to(rollout.scores.device)
    picked = {
        name: value[rows]
        for name, value in vars(rollout).items()
        if isinstance(value, torch.Tensor) and name != "sequences"
    }
    return dataclasses.replace(
        rollout, sequences=rollout.sequences.select(rows), first_row=0, total_rows=None, **picked
    )


def _pad(tensor: torch.Tensor, left: int, right: int, value: float = 0) -> torch.Tensor:
    return F.pad(tensor, (left, right), value=value)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Several rollouts as one batch: prompts re-padded on the left to the widest, responses on the right."""
    prompt_width = max(p.sequences.prompt_width for p in parts)
    response_width = max(p.sequences.response_mask.shape[1] for p in parts)
    ids, attention, response, old, ref = [], [], [], [], []
    for part in parts:
        seqs = part.sequences
        left = prompt_width - seqs.prompt_width
        right = response_width - seqs.response_mask.shape[1]
        ids.append(_pad(_pad(seqs.input_ids, left, 0, pad_id), 0, right, pad_id))
        attention.append(_pad(seqs.attention_mask, left, right))
        response.append(_pad(seqs.response_mask, 0, right))
        old.append(_pad(part.old_logprobs, 0, right))
        ref.append(_pad(part.ref_logprobs, 0, right))
    sequences = Sequences(
        prompts=[p for part in parts for p in part.sequences.prompts],
        responses=[r for part in parts for r in part.sequences.responses],
        input_ids=torch.cat(ids),
        attention_mask=torch.cat(attention),
        response_mask=torch.cat(response),
        prompt_width=prompt_width,
        finished=torch.cat([part.sequences.finished for part in parts]),
    )
    rows = {
        name: torch.cat([getattr(part, name) for part in parts])
        for name in ("scores", "kl", "rlhf_reward", "advantages")
    }
    raw = [part.raw_scores for part in parts]
    return dataclasses.replace(
        parts[0],
        sequences=sequences,
        old_logprobs=torch.cat(old),
        ref_logprobs=torch.cat(ref),
        raw_scores=torch.cat(raw) if all(r is not None for r in raw) else None,
        first_row=0,
        total_rows=None,
        **rows,
    )


def refill(
    rollout: Rollout,
    draw: Callable[[int], Rollout],
    rewards_of: Callable[[Rollout], torch.Tensor],
    *,
    max_refills: int,
    pad_id: int,
) -> tuple[Rollout, dict[str, float]]:
    """Keep the informative groups of `rollout`, then of `draw(1)`, `draw(2)`, ... until there are as many
    as `rollout` had or `max_refills` draws are spent; the batch keeps the first ones, in drawn order.
    A batch with no informative group at all is returned as it is (its update is then ~zero)."""
    k = rollout.samples_per_prompt
    wanted = rollout.scores.numel() // k
    kept, count, dropped, draws = [], 0, 0, 0
    current = rollout
    while True:
        informative = informative_groups(rewards_of(current), k).nonzero().squeeze(-1)
        dropped += current.scores.numel() // k - len(informative)
        if len(informative):
            take = informative[: wanted - count]
            kept.append(select_groups(current, take))
            count += len(take)
        if count >= wanted or draws >= max_refills:
            break
        draws += 1
        current = draw(draws)
    metrics = {"sampling/refills": float(draws), "sampling/dropped_groups": float(dropped)}
    metrics["sampling/kept_groups"] = float(count)
    if not kept:
        return rollout, metrics
    return (kept[0] if len(kept) == 1 else concat_rollouts(kept, pad_id)), metrics
