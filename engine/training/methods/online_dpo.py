"""`online_dpo`: DPO on pairs sampled from the current policy and ranked by the reward model
(docs/method.md section 2; Guo et al. 2024, "Direct language model alignment from online AI feedback").

From each prompt's first two answers of the shared rollout, the higher reward-model score is `chosen`,
the other `rejected` (equal scores: the pair is skipped); with sequence log-probs against the reference
(the sft adapter) the loss is
    loss = -log sigmoid(beta * ((logp_c - logp_ref_c) - (logp_r - logp_ref_r))),
averaged over pairs and back-propagated into the policy adapter (AdamW, grad clip).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.training.accumulation import backward_in_chunks
from engine.training.methods.context import MethodContext
from engine.training.rollout import Rollout


def preference_pairs(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (chosen, rejected) of the first two answers of each prompt (rows grouped prompt-major,
    k answers per prompt), ranked by score; prompts whose two scores are equal give no pair."""
    first = torch.arange(0, scores.shape[0], k, device=scores.device)
    second = first + 1
    decided = scores[first] != scores[second]
    first, second = first[decided], second[decided]
    first_wins = scores[first] > scores[second]
    return torch.where(first_wins, first, second), torch.where(first_wins, second, first)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta * ((logp_c - logp_ref_c) - (logp_r - logp_ref_r))) averaged over pairs, from
    sequence log-probs; also the implicit rewards beta * (logp - logp_ref) of chosen and rejected."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


class OnlineDPOUpdate:
    """One DPO step per rollout on the reward model's choice between two sampled answers."""

    name = "online_dpo"

    def __init__(self, context: MethodContext):
        self.models, self.counters, self.dist = context.models, context.counters, context.dist
        self.config = context.recipe.online_dpo
        self.params = list(self.models.adapter_parameters("policy").values())
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=0.0)

    def update(self, rollout: Rollout, *, update_index: int, step_in_iteration: int) -> dict[str, float]:
        lr = self.config.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        chosen, rejected = preference_pairs(rollout.scores, rollout.samples_per_prompt)
        pairs = chosen.shape[0]
        if pairs == 0:  # every pair tied: nothing to learn from this rollout (other ranks may have some)
            if self.dist.sync_gradients(self.params, 0.0) == 0:
                return {"dpo/pairs": 0.0, "policy/lr": lr}
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return {"dpo/pairs": 0.0, "policy/grad_norm": float(grad_norm), "policy/lr": lr}
        rows = torch.stack([chosen, rejected], dim=1).reshape(-1)  # each pair's two rows side by side
        reference = rollout.ref_logprobs[rows].sum(-1)
        margins = []  # implicit reward margins, pair by pair, and which pairs the policy ranks right

        def chunk_loss(part: slice, logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            sequence, ref = logprobs.sum(-1), reference[part]
            loss, chosen_rewards, rejected_rewards = dpo_loss(
                sequence[0::2], sequence[1::2], ref[0::2], ref[1::2], self.config.beta
            )
            margins.append(chosen_rewards - rejected_rewards)
            return loss * (len(sequence) // 2) / pairs, {}  # the mean over pairs, in parts

        with self.models.adapter("policy"):  # active (so trainable) through backward and step
            loss, _ = backward_in_chunks(
                self.models, rollout.sequences.select(rows), self.counters, chunk_loss, group=2
            )
            self.dist.sync_gradients(self.params, float(pairs))  # the mean over every rank's pairs
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        margin = torch.cat(margins)
        return {
            "loss/policy": loss,
            "dpo/reward_margin": float(margin.mean()),
            "dpo/accuracy": float((margin > 0).float().mean()),
            "dpo/pairs": float(pairs),
            "policy/grad_norm": float(grad_norm),
            "policy/lr": lr,
        }

    def end_iteration(self, iteration: int) -> dict[str, float]:  # noqa: ARG002
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
