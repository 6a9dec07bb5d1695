"""The reward model's side of a run: the Bradley-Terry step (stage 2 and the refinement), scoring answers,
centring the score head, held-out pair accuracy, and snapshots of the reward weights (keep-close, and the
fixed initial reward model that judges win rates when there is no gold scorer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from engine.data.examples import PreferencePair
from engine.recipe import Recipe
from engine.training.distributed import Distributed
from engine.training.models import PreferenceModel
from engine.training.objectives import bradley_terry_loss
from engine.training.rollout import encode_responses, reward_scores
from engine.training.telemetry import Counters

Snapshot = dict[str, torch.Tensor]  # the reward adapter's tensors and the score head's, by name


def bradley_terry_step(
    models: PreferenceModel,
    counters: Counters,
    recipe: Recipe,
    pairs: list[PreferencePair],
    optimizer: torch.optim.Optimizer,
    *,
    score_targets: bool = False,
    dist: Distributed | None = None,
) -> tuple[float, float]:
    """One step on loss = -log sigmoid(r(p, chosen) - r(p, rejected)) (plus, with `score_targets`, the MSE
    on the pairs' quality scores); returns the loss and the batch accuracy. With several ranks `pairs` is
    this rank's share and the gradients are averaged over every rank's pairs (a rank may have none)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if dist is not None and dist.enabled and not pairs:
        dist.sync_gradients(params, 0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float("nan"), float("nan")
    prompts = [p.prompt for p in pairs]
    targets = [p.score for p in pairs] if score_targets else None
    # the reward adapter stays active (and so trainable) through the backward pass
    with models.adapter("reward"):
        seqs = encode_responses(
            models,
            prompts + prompts,
            [p.chosen for p in pairs] + [p.rejected for p in pairs],
            max_prompt_tokens=recipe.model.max_prompt_tokens,
            max_new_tokens=recipe.model.max_new_tokens,
        )
        scores = reward_scores(models, seqs.input_ids, seqs.attention_mask, counters)
        n = len(prompts)
        loss = bradley_terry_loss(scores[:n], scores[n:])
        weight = recipe.reward.score_mse_weight
        if weight and targets and any(t is not None for t in targets):
            # data with a quality score (WMT20 MLQE z_mean): also regress r(p, chosen) on it
            keep = [k for k, t in enumerate(targets) if t is not None]
            wanted = torch.tensor([targets[k] for k in keep], device=scores.device, dtype=scores.dtype)
            loss = loss + weight * torch.nn.functional.mse_loss(scores[:n][keep], wanted)
        loss.backward()
        counters.add(backward_passes=1)
        if dist is not None:
            dist.sync_gradients(params, n)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), float((scores[:n] > scores[n:]).float().mean())


@torch.no_grad()
def score_texts(
    models: PreferenceModel, counters: Counters, recipe: Recipe, prompts: list[str], responses: list[str]
) -> torch.Tensor:
    """The active reward weights' scores of (prompt, response) pairs, 64 at a time."""
    out = []
    for start in range(0, len(prompts), 64):
        seqs = encode_responses(
            models,
            prompts[start : start + 64],
            responses[start : start + 64],
            max_prompt_tokens=recipe.model.max_prompt_tokens,
            max_new_tokens=recipe.model.max_new_tokens,
        )
        out.append(reward_scores(models, seqs.input_ids, seqs.attention_mask, counters))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def center_reward(
    models: PreferenceModel, counters: Counters, recipe: Recipe, pairs: list[PreferencePair]
) -> None:
    """Shift the score head so the reward model's mean score on its training answers is 0: then
    'least confident' (smallest |score|) means near the decision boundary, as docs/method.md intends."""
    sample_pairs = pairs[:256]
    scores = score_texts(
        models,
        counters,
        recipe,
        [p.prompt for p in sample_pairs] * 2,
        [p.chosen for p in sample_pairs] + [p.rejected for p in sample_pairs],
    )
    if len(scores):
        models.score_head.bias -= scores.mean()


@torch.no_grad()
def reward_accuracy(
    models: PreferenceModel, counters: Counters, recipe: Recipe, pairs: list[PreferencePair]
) -> float:
    """How often the reward model scores chosen above rejected."""
    if not pairs:
        return float("nan")
    prompts = [p.prompt for p in pairs]
    chosen = score_texts(models, counters, recipe, prompts, [p.chosen for p in pairs])
    rejected = score_texts(models, counters, recipe, prompts, [p.rejected for p in pairs])
    return float((chosen > rejected).float().mean())


def _live_reward(models: PreferenceModel) -> dict[str, torch.nn.Parameter]:
    live = dict(models.adapter_parameters("reward"))
    live.update({f"score_head.{n}": p for n, p in models.score_head.named_parameters()})
    return live


def reward_snapshot(models: PreferenceModel) -> Snapshot:
    """A copy of the reward weights."""
    return {name: param.detach().clone() for name, param in _live_reward(models).items()}


@torch.no_grad()
def load_reward(models: PreferenceModel, snapshot: Snapshot) -> None:
    for name, param in _live_reward(models).items():
        param.copy_(snapshot[name].to(param.device))


@contextlib.contextmanager
def reward_weights(models: PreferenceModel, snapshot: Snapshot) -> Iterator[None]:
    """Score with other reward weights (the initial reward model) for a moment, then restore."""
    current = reward_snapshot(models)
    load_reward(models, snapshot)
    try:
        yield
    finally:
        load_reward(models, current)


@torch.no_grad()
def keep_close(models: PreferenceModel, previous: Snapshot, alpha: float) -> None:
    """reward <- alpha * previous + (1 - alpha) * refined (the paper's code uses alpha = 0.5)."""
    for name, param in _live_reward(models).items():
        param.mul_(1 - alpha).add_(previous[name].to(param.device), alpha=alpha)
