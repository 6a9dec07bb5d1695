"""`ppo`: PPO-clip with a value head and GAE at token level, the classic RLHF baseline (docs/method.md section 2).

One rollout (shared with every other method, never re-sampled) becomes per-token rewards
    r_t = -beta * (logp_old_t - logp_ref_t)   (+ the reward model's score at the last response token),
a value head V reads the policy adapter's last hidden state at each response position, GAE turns
(r, V) into advantages A_t and returns R_t = A_t + V_t, and `epochs` passes of `minibatches` minimise
    loss = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
         + vf_coef * 0.5 * mean_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - R_t)^2)
with ratio_t = exp(logp_t - logp_old_t), over the policy adapter and the value head (AdamW, grad clip).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.seeds import generator
from engine.training.accumulation import backward_in_chunks
from engine.training.methods.context import MethodContext
from engine.training.models import PreferenceModel
from engine.training.rollout import Rollout, Sequences, Sums, position_ids, selective_logprobs
from engine.training.telemetry import Counters


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, sums: Sums | None = None
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; zero elsewhere. With `sums` over every rank's entries."""
    if sums is None:
        mean = masked_mean(values, mask)
        var = masked_mean((values - mean) ** 2, mask)
        return (values - mean) * torch.rsqrt(var + eps) * mask
    v = values.double() * mask
    total, squares, count = sums([v.sum(), (v**2).sum(), mask.sum()])
    mean = total / max(count, 1.0)
    var = max(squares / max(count, 1.0) - mean**2, 0.0)
    return ((values - mean) * (var + eps) ** -0.5 * mask).to(values.dtype)


def token_rewards(
    scores: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """r_t = -beta * (logp_old_t - logp_ref_t) on every response token, plus the score at the last one."""
    mask = response_mask.float()
    rewards = -kl_coef * (old_logprobs - ref_logprobs) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores * mask[rows, last]
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016), right padding masked:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns R_t = A_t + V_t.
    Past the last response token V and A count as 0, whatever the padding holds."""
    mask = mask.float()
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def logprobs_and_values(
    models: PreferenceModel, value_head: nn.Linear, seqs: Sequences, counters: Counters | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward with the active adapter: per-token log-probs of the response tokens and the value of
    the state before each of them, both (N, R) and zero on padding. The logits are the lm_head of the same
    last hidden states the value head reads (what the causal LM itself computes). `counters=None`: not
    counted (a chunk of a pass that its caller counts)."""
    mask = seqs.attention_mask
    hidden = models.hidden_states(seqs.input_ids, mask, position_ids(mask))
    if counters is not None:
        counters.add(forward_passes=1, tokens=int(mask.sum()))
    hidden = hidden[:, seqs.prompt_width - 1 : -1, :]  # position t predicts response token t
    logprobs = selective_logprobs(hidden, models.lm_head, seqs.response_ids, seqs.response_mask)
    values = value_head(hidden.float()).squeeze(-1)
    return logprobs, values * seqs.response_mask


class PPOUpdate:
    """PPO-clip with a value head and token-level GAE on the shared rollout."""

    name = "ppo"

    def __init__(self, context: MethodContext):
        self.models, self.counters, self.seed = context.models, context.counters, context.recipe.seed
        self.dist = context.dist
        self.config = context.recipe.ppo
        self.clip_range = context.recipe.policy.clip_range
        # V(s_t): a float32 linear read-out of the policy adapter's last hidden state; zero at the start
        self.value_head = nn.Linear(self.models.score_head.in_features, 1).to(self.models.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.params = list(self.models.adapter_parameters("policy").values()) + list(
            self.value_head.parameters()
        )
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=0.0)

    def update(self, rollout: Rollout, *, update_index: int, step_in_iteration: int) -> dict[str, float]:
        c = self.config
        lr = c.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seqs = rollout.sequences
        mask = seqs.response_mask.float()

        # advantages and returns from the rollout, with the values of the sampling policy
        with torch.no_grad(), self.models.adapter("policy"):
            _, old_values = logprobs_and_values(self.models, self.value_head, seqs, self.counters)
        rewards = token_rewards(
            rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask, rollout.kl_coef
        )  # the rollout's beta: policy.kl_coef, or the adaptive controller's value
        advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            sums = self.dist.sum_floats if self.dist.enabled else None
            advantages = masked_whiten(advantages, mask, sums=sums)

        # minibatches of the whole batch (over all ranks); each rank trains on its rows of each one
        n = rollout.total_rows or mask.shape[0]
        first, local = rollout.first_row, mask.shape[0]
        size = -(-n // c.minibatches)
        shuffle = generator(self.seed, "ppo", update_index)  # minibatch order: the same after a resume
        stats: dict[str, list[float]] = {
            k: [] for k in ("loss", "policy", "value", "clipfrac", "approxkl", "grad_norm")
        }
        for _ in range(c.epochs):
            order = torch.randperm(n, generator=shuffle)
            for start in range(0, n, size):
                rows = order[start : start + size]
                rows = (rows[(rows >= first) & (rows < first + local)] - first).to(mask.device)
                if len(rows) == 0:  # none of this minibatch is on this rank: it still joins the all-reduce
                    self.dist.sync_gradients(self.params, 0.0)
                    self._step(c)
                    continue
                tokens = mask[rows].sum()

                def chunk_loss(part: slice, outputs, rows=rows, tokens=tokens):
                    """The chunk's part of the minibatch's token means: its masked sums over all the tokens."""
                    logprobs, values = outputs
                    at = rows[part]
                    m = mask[at]

                    def token_mean(values: torch.Tensor) -> torch.Tensor:
                        return (values * m).sum() / tokens.clamp(min=1)

                    # clipped surrogate on token ratios
                    log_ratio = logprobs - rollout.old_logprobs[at]
                    ratio = torch.exp(log_ratio)
                    pg_unclipped = -advantages[at] * ratio
                    pg_clipped = -advantages[at] * torch.clamp(
                        ratio, 1.0 - self.clip_range, 1.0 + self.clip_range
                    )
                    policy_loss = token_mean(torch.max(pg_unclipped, pg_clipped))
                    # clipped value loss around the rollout's values
                    old = old_values[at]
                    values_clipped = old + torch.clamp(values - old, -c.cliprange_value, c.cliprange_value)
                    value_loss = 0.5 * token_mean(
                        torch.max((values - returns[at]) ** 2, (values_clipped - returns[at]) ** 2)
                    )
                    with torch.no_grad():
                        parts = {
                            "policy": float(policy_loss),
                            "value": float(value_loss),
                            "clipfrac": float(token_mean((pg_clipped > pg_unclipped).float())),
                            "approxkl": float(0.5 * token_mean(log_ratio**2)),
                        }
                    return policy_loss + c.vf_coef * value_loss, parts

                with self.models.adapter("policy"):  # active (so trainable) through backward and step
                    loss, parts = backward_in_chunks(
                        self.models,
                        seqs.select(rows),
                        self.counters,
                        chunk_loss,
                        forward=lambda chunk: logprobs_and_values(self.models, self.value_head, chunk, None),
                    )
                    self.dist.sync_gradients(self.params, float(tokens))  # the mean over tokens
                    grad_norm = self._step(c)
                stats["loss"].append(loss)
                for key, value in parts.items():
                    stats[key].append(value)
                stats["grad_norm"].append(float(grad_norm))

        def mean(name: str) -> float:
            return sum(stats[name]) / len(stats[name])

        residual_var = masked_mean(
            (returns - old_values - masked_mean(returns - old_values, mask)) ** 2, mask
        )
        returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        return {
            "loss/policy": mean("policy"),
            "loss/value": mean("value"),
            "loss/total": mean("loss"),
            "policy/clipfrac": mean("clipfrac"),
            "policy/approxkl": mean("approxkl"),
            "policy/grad_norm": mean("grad_norm"),
            "policy/lr": lr,
            "value/mean": float(masked_mean(old_values, mask)),
            "value/explained_variance": float(1.0 - residual_var / returns_var.clamp(min=1e-8)),
        }

    def _step(self, c) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def end_iteration(self, iteration: int) -> dict[str, float]:  # noqa: ARG002
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "value_head": self.value_head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
