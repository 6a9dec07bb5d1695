"""`mezo` and `zopro`: the policy update estimated from two forward passes per direction (method.md
section 3). Both use the same rollout and the same clipped surrogate as `rloo`; they differ only in how
the direction is drawn (isotropic, or along the policy's last change and away from the reward model's)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engine.methods.rloo import RLOOUpdate
from engine.objectives import clipped_surrogate
from engine.rollout import Rollout, token_logprobs
from engine.zeroth_order import IsotropicSampler, ZoproSampler, decay_at, zo_update


class ZerothOrderUpdate:
    """One SPSA update per rollout: theta <- theta - lr_t * ((1/q) sum_i g_i z_i + wd * theta)."""

    zeroth_order = True

    def __init__(self, run: Any, name: str):
        self.name = name
        self.run = run
        self.pm, self.counters = run.pm, run.counters
        self.recipe = run.recipe
        self.config = getattr(run.recipe, name)
        self.clip_range = run.recipe.policy.clip_range
        # float32 trainable adapter tensors, keyed by their full peft names
        self.params = self.pm.adapter_parameters("policy")
        self.first_order = RLOOUpdate(run)  # iteration 0 of zopro (the paper) and the optional warm-up
        self.sampler: IsotropicSampler | ZoproSampler = IsotropicSampler()
        self.sampler_iteration: int | None = None
        self.consecutive_skips = 0

    # -- directions --------------------------------------------------------------------------------------
    def uses_first_order(self, iteration: int) -> bool:
        return self.name == "zopro" and iteration == 0 and self.config.first_iteration == "rloo"

    def sampler_for(self, iteration: int) -> IsotropicSampler | ZoproSampler:
        if self.name == "mezo" or iteration == 0:
            return IsotropicSampler()
        if self.sampler_iteration != iteration:
            mu, v = self.momentum_and_reward_change(iteration)
            self.sampler = ZoproSampler(mu, v, decay=self.config.decay_start)
            self.sampler_iteration = iteration
        return self.sampler

    def momentum_and_reward_change(
        self, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """mu = the policy's whole change over the previous iteration (for iteration 1: policy - sft);
        v = the reward adapter's change in the previous iteration's refinement. Both read from the
        checkpoints saved at iteration boundaries, keyed like the policy parameters."""
        end = self.run.iteration_checkpoint(iteration - 1)
        start = self.run.iteration_checkpoint(iteration - 2)
        mu = _difference(end, start, "policy")
        v = _difference(end, start, "reward")
        device = self.pm.device
        to_param = {name.replace(".policy.", "."): name for name in self.params}
        missing = sorted(set(to_param) - set(mu))
        if missing or set(mu) != set(v):
            raise ValueError(
                f"policy and reward adapters do not pair up key by key (first unmatched: {missing[:3]})"
            )
        return (
            {to_param[k]: mu[k].to(device) for k in to_param},
            {to_param[k]: v[k].to(device) for k in to_param},
        )

    # -- the update --------------------------------------------------------------------------------------
    def update(
        self, rollout: Rollout, *, update_index: int, step_in_iteration: int, lr_scale: float
    ) -> dict[str, float]:
        iteration = self.run.state.iteration
        if self.uses_first_order(iteration):
            return {
                **self.first_order.update(
                    rollout, update_index=update_index, step_in_iteration=step_in_iteration, lr_scale=lr_scale
                ),
                "zo/first_order": 1.0,
            }
        config = self.config
        updates = self.recipe.train.updates_per_iteration
        sampler = self.sampler_for(iteration)
        decay = 0.0
        if isinstance(sampler, ZoproSampler):
            decay = decay_at(config.decay_schedule, step_in_iteration, updates, start=config.decay_start)
            sampler.decay = decay
        lr = (
            config.lr
            * lr_scale
            * (1.0 - step_in_iteration / updates if config.lr_schedule == "linear" else 1.0)
        )

        def surrogate_loss() -> torch.Tensor:
            new_logprobs = token_logprobs(self.pm, rollout.sequences, self.counters)
            loss, _ = clipped_surrogate(
                new_logprobs, rollout.old_logprobs, rollout.advantages, self.clip_range
            )
            return loss.float()

        true_gradient = before = None
        if config.grad_cosine_every and update_index % config.grad_cosine_every == 0:
            true_gradient = self._true_gradient(surrogate_loss)
            before = {n: p.detach().clone() for n, p in self.params.items()}
        self.pm.use("policy")
        result = zo_update(
            self.params,
            surrogate_loss,
            sampler,
            run_seed=self.recipe.seed,
            update_index=update_index,
            eps=config.eps,
            lr=lr,
            weight_decay=config.weight_decay,
            directions=config.directions,
            g_clip=config.g_clip or None,
            reduce_g=self.run.reduce_scalar,
        )
        metrics = {
            "zo/g": result.g,
            "zo/g_raw": result.g_raw,
            "zo/abs_g": result.abs_g,
            "zo/decay": decay,
            "zo/cos_z_mu": result.cos_z_mu,
            "zo/cos_z_v": result.cos_z_v,
            "zo/skipped": float(result.skipped),
            "zo/clipped": float(result.clipped),
            "zo/loss_plus": result.loss_plus,
            "zo/loss_minus": result.loss_minus,
            "zo/directions": float(result.directions),
            "policy/lr": lr,
            "loss/policy": (result.loss_plus + result.loss_minus) / 2,
            "zo/first_order": 0.0,
        }
        if true_gradient is not None and before is not None and not result.skipped:
            metrics["zo/cos_true_grad"] = _cosine_with_step(true_gradient, before, self.params)
        self.consecutive_skips = self.consecutive_skips + 1 if result.skipped else 0
        if self.consecutive_skips >= config.max_consecutive_skips:
            from engine.pipeline import TrainingFailed

            raise TrainingFailed(
                f"{self.consecutive_skips} zeroth-order updates in a row had a non-finite estimate g; lower "
                f"{self.name}.lr or {self.name}.eps (or set {self.name}.g_clip) and resume"
            )
        return metrics

    def _true_gradient(self, surrogate_loss) -> dict[str, torch.Tensor]:
        """The first-order gradient on the same batch (diagnostic only; costs a backward)."""
        self.pm.use("policy")
        loss = surrogate_loss()
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names])
        self.counters.add(backward_passes=1)
        return {n: g.detach() for n, g in zip(names, grads, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"first_order": self.first_order.state_dict(), "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_order.load_state_dict(state["first_order"])
        self.consecutive_skips = state["consecutive_skips"]


def _difference(end: Path, start: Path, adapter: str) -> dict[str, torch.Tensor]:
    after = load_file(str(end / "adapters" / adapter / "adapter_model.safetensors"))
    before = load_file(str(start / "adapters" / adapter / "adapter_model.safetensors"))
    return {k: (after[k].float() - before[k].float()) for k in after}


def _cosine_with_step(
    gradient: dict[str, torch.Tensor], before: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> float:
    """cos(true gradient, theta_before - theta_after): how well the zeroth-order step follows the gradient
    (with weight decay 0 the step is exactly lr times the estimate (1/q) sum_i g_i z_i)."""
    dot = grad_sq = step_sq = 0.0
    for name, grad in gradient.items():
        step = before[name] - params[name].detach()
        dot += float((grad * step).sum())
        grad_sq += float((grad * grad).sum())
        step_sq += float((step * step).sum())
    return dot / math.sqrt(grad_sq * step_sq) if grad_sq > 0 and step_sq > 0 else 0.0
