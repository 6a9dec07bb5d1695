"""ZOPrO's premise, checked live: is the policy's last change mu still a good direction?

ZOPrO starts every probe along mu (the policy's change over the previous iteration), on the assumption
that the loss surface keeps its direction from one iteration to the next. On the built-in task it does not
(docs/method.md section 6): one more mu lowers held-out gold. At the start of each zeroth-order iteration this
module measures, on a fixed set of prompts with common random numbers:
- the reward model's mean score and the gold score (when the task has one) at theta - a mu, theta and
  theta + a mu (`premise/reward_minus|0|plus`, `premise/gold_minus|0|plus`, and `premise/gold_gain` =
  gold(+a mu) - gold(0));
- optionally (a backward per batch) the mean first-order gradient of the surrogate over K fresh rollouts:
  `premise/cos_descent_mu` = cos(-grad, mu) (> 0: moving along mu lowers the loss), and for a gradient-
  subspace basis Q, `premise/subspace_capture` = |Q^T grad| / |grad| (the share of the gradient the
  zeroth-order directions can reach).
The parameters are copied before and restored bit for bit after, so a run's training is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from engine.training.methods.context import MethodContext


class PremiseCheck:
    """The check at the start of a zeroth-order iteration: score and gold along +-mu (`premise_prompts`
    held-out prompts, `premise_step` mu), and with `premise_gradient_batches` > 0 cos(descent, mu) and the
    subspace's capture of the mean gradient over that many fresh rollouts."""

    def __init__(
        self,
        context: MethodContext,
        config: Any,
        params: Mapping[str, Tensor],
        surrogate: Callable[[Any], Tensor],
    ):
        self.context, self.config, self.params, self.surrogate = context, config, params, surrogate

    def measure(self, iteration: int, mu: Mapping[str, Tensor], basis: Tensor | None) -> dict[str, float]:
        config, context = self.config, self.context
        model = context.models
        with model.adapter("policy"):
            metrics = along_mu(
                self.params,
                mu,
                config.premise_step,
                lambda: context.score_policy("premise", iteration, count=config.premise_prompts),
            )
        if config.premise_gradient_batches:
            losses = [
                (lambda b=b: self.surrogate(context.fresh_rollout(("premise", iteration, b))))
                for b in range(config.premise_gradient_batches)
            ]
            model.use("policy")
            gradient = context.dist.mean_tensors(mean_gradient(self.params, losses))
            context.counters.add(backward_passes=len(losses))
            metrics.update(gradient_alignment(gradient, mu, basis))
        return finite(metrics)


@torch.no_grad()
def along_mu(
    params: Mapping[str, Tensor],
    mu: Mapping[str, Tensor],
    step: float,
    evaluate: Callable[[], dict[str, float]],
) -> dict[str, float]:
    """`evaluate()` (-> {"reward": ..., "gold": ...}) at theta - step mu, theta, theta + step mu, as
    `premise/<name>_minus|0|plus`, plus `premise/<name>_gain` (plus minus 0)."""
    saved = {name: param.detach().clone() for name, param in params.items()}
    metrics: dict[str, float] = {}
    scored: set[str] = set()
    try:
        for label, sign in (("minus", -1.0), ("0", 0.0), ("plus", 1.0)):
            for name, param in params.items():
                param.copy_(saved[name]).add_(mu[name].to(param.device), alpha=sign * step)
            for key, value in evaluate().items():
                metrics[f"premise/{key}_{label}"] = value
                scored.add(key)
    finally:
        for name, param in params.items():
            param.copy_(saved[name])
    for key in sorted(scored):
        metrics[f"premise/{key}_gain"] = metrics[f"premise/{key}_plus"] - metrics[f"premise/{key}_0"]
    return metrics


def gradient_alignment(
    gradient: Mapping[str, Tensor], mu: Mapping[str, Tensor], basis: Tensor | None = None
) -> dict[str, float]:
    """cos(-gradient, mu) and, with an orthonormal basis (D, r) in sorted-name order, the share of the
    gradient inside its span."""
    names = sorted(gradient)
    g = torch.cat([gradient[n].reshape(-1).double() for n in names])
    m = torch.cat([mu[n].reshape(-1).double().to(g.device) for n in names])
    denominator = float(g.norm() * m.norm())
    metrics = {"premise/cos_descent_mu": float(-(g @ m)) / denominator if denominator > 0 else 0.0}
    if basis is not None:
        g_norm = float(g.norm())
        inside = float((basis.double().to(g.device).T @ g).norm())
        metrics["premise/subspace_capture"] = inside / g_norm if g_norm > 0 else 0.0
    return metrics


def mean_gradient(params: Mapping[str, Tensor], losses: list[Callable[[], Tensor]]) -> dict[str, Tensor]:
    """The mean gradient of several losses (one backward each) with respect to `params`."""
    names = sorted(params)
    total = {name: torch.zeros_like(params[name]) for name in names}
    for loss_fn in losses:
        grads = torch.autograd.grad(loss_fn(), [params[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                total[name] += grad.detach()
    return {name: value / max(1, len(losses)) for name, value in total.items()}


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
