"""Losses: the Bradley-Terry reward loss and the clipped surrogate on sequence ratios."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(p, chosen) - r(p, rejected)), averaged over pairs."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def clipped_surrogate(
    new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO's loss on sequence log-prob ratios (docs/method.md section 2):
    r = exp(sum new logp - sum old logp); loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))."""
    log_ratio = new_logprobs.sum(-1) - old_logprobs.sum(-1)
    unclipped, clipped = _surrogate_terms(log_ratio, advantages, clip_range)
    loss = torch.max(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "policy/clipfrac": float((clipped > unclipped).float().mean()),
            "policy/approxkl": float((0.5 * log_ratio**2).mean()),
        }
    return loss, stats


def surrogate_per_row(
    new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """Each row's term of `clipped_surrogate` (its loss is their mean): max(-A r, -A clip(r))."""
    log_ratio = new_logprobs.sum(-1) - old_logprobs.sum(-1)
    return torch.max(*_surrogate_terms(log_ratio, advantages, clip_range))


def _surrogate_terms(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    return unclipped, -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
