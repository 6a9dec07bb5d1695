"""`rloo`: first-order policy update with the clipped surrogate on sequence ratios and AdamW."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.training.accumulation import backward_for_update
from engine.training.methods.context import MethodContext
from engine.training.objectives import clipped_surrogate
from engine.training.rollout import Rollout


class RLOOUpdate:
    """loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), back-propagated into the policy adapter."""

    name = "rloo"

    def __init__(
        self,
        context: MethodContext,
        on_gradient: Callable[[dict[str, torch.Tensor]], None] | None = None,
        prompt_gradients: bool = False,
    ):
        """`on_gradient({name: raw gradient})` is called after each backward, before the clip, with the
        batch's gradient or (`prompt_gradients`) each prompt's: the zeroth-order methods keep these
        snapshots for their subspace sampler (`backward_for_update`)."""
        self.pm, self.counters, self.dist = context.models, context.counters, context.dist
        self.on_gradient, self.prompt_gradients = on_gradient, prompt_gradients
        self.clip_range = context.recipe.policy.clip_range
        config = context.recipe.rloo
        self.lr, self.max_grad_norm = config.lr, config.max_grad_norm
        self.named_params = self.pm.adapter_parameters("policy")
        self.params = list(self.named_params.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)

    def update(self, rollout: Rollout, *, update_index: int, step_in_iteration: int) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        rows = len(rollout.sequences.prompts)

        def chunk_loss(part: slice, new_logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss, stats = clipped_surrogate(
                new_logprobs, rollout.old_logprobs[part], rollout.advantages[part], self.clip_range
            )
            share = (part.stop - part.start) / max(rows, 1)  # the loss and its statistics are means over rows
            return loss * share, {key: value * share for key, value in stats.items()}

        with self.pm.adapter("policy"):  # the gradient: the mean over sequences
            loss, stats = backward_for_update(
                self.pm,
                rollout.sequences,
                self.counters,
                chunk_loss,
                dist=self.dist,
                named_params=self.named_params,
                weight=rows,
                on_gradient=self.on_gradient,
                per_prompt=rollout.samples_per_prompt if self.prompt_gradients else 0,
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss/policy": loss,
            "policy/grad_norm": float(grad_norm),
            "policy/lr": self.lr,
            **stats,
        }

    def end_iteration(self, iteration: int) -> dict[str, float]:  # noqa: ARG002
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
