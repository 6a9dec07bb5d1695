"""`grpo`, `dr_grpo`, `dapo`, `reinforce_pp`: one first-order update on the shared rollout whose switches
make each method (docs/method.md section 2b). Each method's recipe section is a preset of the switches:

    baseline     leave_one_out (RLOO) | group_mean (GRPO, incl. the answer itself) | none (REINFORCE++)
    scale        none (Dr. GRPO) | group_std (GRPO) | batch_std (REINFORCE++: whitened over the batch)
    aggregation  sequence (RLOO's sequence ratio) | answer_token_mean (GRPO) | token_mean (DAPO)
                 | constant (Dr. GRPO: the token sum / (answers x max_new_tokens))
    kl_penalty   reward (k1 in the reward, as RLOO) | loss (k3 per token, GRPO) | off (DAPO)
    epsilon, epsilon_high (DAPO's clip-higher), updates_per_rollout (mu), dynamic_sampling (DAPO)

With token aggregations the ratio is per token, r_t = exp(logp_t - logp_old_t), and
    l_t = max(-A r_t, -A clip(r_t, 1 - epsilon, 1 + epsilon_high)) + beta k3_t,
    k3_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1,
aggregated over the response tokens as the switch says; beta is the rollout's (policy.kl_coef, or the
adaptive controller's value). Metric names are TRL GRPOTrainer's where the quantity is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.training.accumulation import backward_for_update
from engine.training.methods.context import MethodContext
from engine.training.rollout import Rollout, Sums, rloo_advantages, whiten

STD_EPS = 1e-4  # TRL GRPOTrainer: advantages / (std + 1e-4)


def policy_rewards(rollout: Rollout, kl_penalty: str) -> torch.Tensor:
    """The reward the advantages are made of: score - beta * KL (k1 in the reward) or the score alone."""
    return rollout.rlhf_reward if kl_penalty == "reward" else rollout.scores


def group_advantages(
    rewards: torch.Tensor, k: int, baseline: str, scale: str, sums: Sums | None = None
) -> torch.Tensor:
    """A_i from the rewards of prompt-major groups of k answers (docs/method.md section 2b)."""
    grouped = rewards.view(-1, k)
    if baseline == "leave_one_out":  # R_i - mean of the other k - 1 (RLOO)
        advantages = rloo_advantages(rewards, k).view(-1, k)
    elif baseline == "group_mean":  # R_i - mean of all k = (k - 1) / k x RLOO's (GRPO)
        advantages = grouped - grouped.mean(-1, keepdim=True)
    else:
        advantages = grouped.clone()
    if scale == "group_std":  # / the group's (unbiased) std, as TRL's scale_rewards = "group"
        advantages = advantages / (grouped.std(-1, keepdim=True) + STD_EPS)
    advantages = advantages.reshape(-1)
    if scale == "batch_std":  # REINFORCE++'s global normalisation: (A - mean) / std over the batch
        advantages = whiten(advantages, sums=sums)
    return advantages


def group_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    aggregation: str,
    epsilon: float,
    epsilon_high: float,
    kl_coef: float,
    max_new_tokens: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate plus beta * k3 per token, aggregated as `aggregation` says; (N, R) inputs."""
    mask = mask.float()
    delta_ref = (ref_logprobs - new_logprobs) * mask
    k3 = (torch.exp(delta_ref) - delta_ref - 1.0) * mask  # per-token KL to the reference (Schulman's k3)
    if aggregation == "sequence":  # RLOO's: one ratio per answer, exp(sum of token log-ratios)
        log_ratio = ((new_logprobs - old_logprobs) * mask).sum(-1)
        adv, weight = advantages, torch.ones_like(advantages)
    else:  # a ratio per token
        log_ratio = (new_logprobs - old_logprobs) * mask
        adv, weight = advantages[:, None], mask
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    surrogate = torch.max(unclipped, clipped)
    if aggregation == "sequence":
        loss = (surrogate + kl_coef * k3.sum(-1)).mean()
    else:
        per_token = (surrogate + kl_coef * k3) * mask
        if aggregation == "answer_token_mean":  # mean over each answer's tokens, then over answers (GRPO)
            loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif aggregation == "token_mean":  # mean over every token of the batch (DAPO)
            loss = per_token.sum() / mask.sum().clamp(min=1.0)
        else:  # "constant": a fixed normaliser, answers x max_new_tokens (Dr. GRPO, TRL's dr_grpo)
            loss = per_token.sum() / (mask.shape[0] * max_new_tokens)
    with torch.no_grad():
        low = ((ratio < 1.0 - epsilon) & (adv < 0)).float() * weight
        high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).float() * weight
        count = weight.sum().clamp(min=1.0)
        stats = {
            "clip_ratio/low_mean": float(low.sum() / count),
            "clip_ratio/high_mean": float(high.sum() / count),
            "clip_ratio/region_mean": float((low + high).sum() / count),
            "policy/clipfrac": float(((clipped > unclipped).float() * weight).sum() / count),
            "policy/approxkl": float((0.5 * log_ratio**2 * weight).sum() / count),
            "kl": float(k3.sum() / mask.sum().clamp(min=1.0)),  # TRL's `kl`: the token mean of k3
        }
    return loss, stats


def rollout_stats(rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
    """The rollout as TRL GRPOTrainer reports it (`entropy`: the token mean of -log p of the sampled tokens,
    an unbiased estimate of TRL's mean token entropy)."""
    seqs, k = rollout.sequences, rollout.samples_per_prompt
    mask = seqs.response_mask.float()
    group_std = rewards.view(-1, k).std(-1)
    return {
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()),
        "completions/mean_length": float(mask.sum(-1).mean()),
        "completions/clipped_ratio": float((~seqs.finished).float().mean()),
        "entropy": float((-rollout.old_logprobs * mask).sum() / mask.sum().clamp(min=1.0)),
    }


class GroupUpdate:
    """mu AdamW steps on one rollout, each on the group loss with the ratio against the rollout's policy."""

    def __init__(
        self,
        context: MethodContext,
        method: str,
        on_gradient: Callable[[dict[str, torch.Tensor]], None] | None = None,
        prompt_gradients: bool = False,
    ):
        """`on_gradient({name: raw gradient})` after each backward, before the clip: the batch's gradient or
        (`prompt_gradients`) each prompt's (zopro's subspace, `backward_for_update`)."""
        self.name = method
        self.pm, self.counters, self.dist = context.models, context.counters, context.dist
        self.on_gradient, self.prompt_gradients = on_gradient, prompt_gradients
        self.config = getattr(context.recipe, method)
        self.max_new_tokens = context.recipe.model.max_new_tokens
        self.named_params = self.pm.adapter_parameters("policy")
        self.params = list(self.named_params.values())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def update(self, rollout: Rollout, *, update_index: int, step_in_iteration: int) -> dict[str, float]:
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr
        seqs = rollout.sequences
        rewards = policy_rewards(rollout, c.kl_penalty)
        sums = self.dist.sum_floats if self.dist.enabled else None
        advantages = group_advantages(rewards, rollout.samples_per_prompt, c.baseline, c.scale, sums)
        kl_coef = rollout.kl_coef if c.kl_penalty == "loss" else 0.0
        mask, rows, token_count = seqs.response_mask, len(seqs.prompts), float(seqs.response_mask.sum())
        # the gradient's mean over every rank: per token for the token mean, else per answer
        weight = token_count if c.loss_aggregation == "token_mean" else rows
        tokens = max(token_count, 1.0)
        per_token = c.loss_aggregation != "sequence"  # the clip statistics are token means then

        def chunk_loss(part: slice, new_logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss, stats = group_loss(
                new_logprobs,
                rollout.old_logprobs[part],
                rollout.ref_logprobs[part],
                mask[part],
                advantages[part],
                aggregation=c.loss_aggregation,
                epsilon=c.epsilon,
                epsilon_high=c.epsilon_high,
                kl_coef=kl_coef,
                max_new_tokens=self.max_new_tokens,
            )
            # each part's share of the batch's mean: by answers, or by tokens for a token mean
            by_rows, by_tokens = (part.stop - part.start) / max(rows, 1), float(mask[part].sum()) / tokens
            share = by_tokens if c.loss_aggregation == "token_mean" else by_rows
            stat_share = {key: by_tokens if key == "kl" or per_token else by_rows for key in stats}
            return loss * share, {key: value * stat_share[key] for key, value in stats.items()}

        steps: list[dict[str, float]] = []
        for _ in range(c.updates_per_rollout):
            with self.pm.adapter("policy"):
                loss, stats = backward_for_update(
                    self.pm,
                    seqs,
                    self.counters,
                    chunk_loss,
                    dist=self.dist,
                    named_params=self.named_params,
                    weight=weight,
                    on_gradient=self.on_gradient,
                    per_prompt=rollout.samples_per_prompt if self.prompt_gradients else 0,
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            steps.append({"loss/policy": loss, "policy/grad_norm": float(grad_norm), **stats})
        means = {key: sum(step[key] for step in steps) / len(steps) for key in steps[0]}
        return {
            **means,
            "policy/lr": c.lr,
            "policy/advantage_abs_mean": float(advantages.abs().mean()),
            **rollout_stats(rollout, rewards),
        }

    def end_iteration(self, iteration: int) -> dict[str, float]:  # noqa: ARG002
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
