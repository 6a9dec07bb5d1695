"""`mezo` and `zopro`: the policy update estimated from two forward passes per direction (method.md
section 3). Both use the same rollout and the same clipped surrogate as `rloo`; they differ in where the
directions come from (`engine.training.zo_samplers`): `mezo` has no first-order iteration and draws isotropic or
block-coordinate directions; `zopro` runs iteration 0 first-order (as the paper does) and then draws the
paper's informed directions, directions inside the span of that iteration's gradients, or either of the
others. The step scale cannot collapse: z's length is tied to a fixed reference (`zopro.z_norm`,
the subspace sampler's norm), and with `normalize_g` each g is divided by its running RMS, so that `lr`
reads as the fraction of |z| moved per update.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.analysis.adapter_keys import neutral_key
from engine.errors import TrainingFailed
from engine.training.adapter_history import AdapterHistory
from engine.training.methods.context import MethodContext
from engine.training.methods.rloo import RLOOUpdate
from engine.training.objectives import clipped_surrogate
from engine.training.premise import along_mu, finite, gradient_alignment, mean_gradient
from engine.training.rollout import Rollout, token_logprobs
from engine.training.spsa import RunningRMS, decay_at, zo_update
from engine.training.zo_samplers import (
    BlockSampler,
    DirectionSampler,
    GradientSnapshots,
    IsotropicSampler,
    SubspaceSampler,
    ZoproSampler,
    layer_blocks,
)

STALLED_BELOW = 1e-3  # policy change over an iteration, relative to the reference norm: "stopped moving"
STUCK_AFTER = 5  # updates in a row with every g at the clip, or g = 0, before a warning


class ZerothOrderUpdate:
    """One SPSA update per rollout: theta <- theta - lr_t * ((1/q) sum_i g_i z_i + wd * theta)."""

    def __init__(self, context: MethodContext, name: str):
        self.name = name
        self.context = context
        self.pm, self.counters = context.pm, context.counters
        self.recipe = context.recipe
        self.config = getattr(context.recipe, name)
        self.clip_range = context.recipe.policy.clip_range
        # float32 trainable adapter tensors, keyed by their full peft names
        self.params = self.pm.adapter_parameters("policy")
        self.snapshots = (
            GradientSnapshots(self.config.subspace_snapshots) if self.config.sampler == "subspace" else None
        )
        # iteration 0 of zopro (the paper), and the refresh iterations of the subspace sampler
        self.first_order = RLOOUpdate(
            context, on_gradient=self._snapshot if self.snapshots is not None else None
        )
        self.normalizer = RunningRMS(self.config.g_rms_decay) if self.config.normalize_g else None
        self.sampler: DirectionSampler = IsotropicSampler()
        self.sampler_iteration: int | None = None
        self.reference_norms: dict[str, float] | None = None  # |mu_k| of the first informed iteration
        self.basis: torch.Tensor | None = None  # the subspace's orthonormal basis, once built
        self.momentum: dict[str, torch.Tensor] | None = None  # mu of the current informed iteration
        self.consecutive_skips = 0
        self.stuck = {"g_at_clip": 0, "g_zero": 0}

    def _snapshot(self, gradient: dict[str, torch.Tensor]) -> None:
        self.snapshots.add(gradient, self.params)

    # -- directions --------------------------------------------------------------------------------------
    @property
    def informed(self) -> bool:
        """Whether this method runs first-order iterations and learns from them (zopro)."""
        return self.name == "zopro"

    def uses_first_order(self, iteration: int) -> bool:
        if not self.informed:
            return False
        if iteration == 0:
            return self.config.first_iteration == "rloo"
        every = self.config.subspace_refresh_every if self.config.sampler == "subspace" else 0
        return bool(every) and iteration % every == 0

    @property
    def reference_norm(self) -> float | None:
        """|mu| of the first informed iteration over all tensors: the fixed length of z."""
        if self.reference_norms is None:
            return None
        return math.sqrt(sum(x * x for x in self.reference_norms.values()))

    def sampler_for(self, iteration: int) -> DirectionSampler:
        if self.sampler_iteration == iteration:
            return self.sampler
        kind = self.config.sampler
        mu = v = None
        if self.informed and iteration > 0:
            mu, v = self.momentum_and_reward_change(iteration)
            if self.reference_norms is None:  # the first informed iteration fixes the scale
                self.reference_norms = {n: float(torch.linalg.vector_norm(t)) for n, t in mu.items()}
        self.momentum = mu  # this iteration's mu, read once from the history (the premise check uses it)
        fixed = self.reference_norms is not None and self.config.z_norm == "reference"
        norm = self.reference_norm
        if kind == "block":
            sampler: DirectionSampler = BlockSampler(layer_blocks(list(self.params)), norm if fixed else None)
        elif kind == "zopro" and mu is not None:
            sampler = ZoproSampler(
                mu, v, decay=self.config.decay_start, reference_norms=self.reference_norms if fixed else None
            )
        elif kind == "subspace" and mu is not None:
            shapes = {n: p.shape for n, p in self.params.items()}
            if self.basis is None:  # built once from the snapshots, which are then let go
                self.basis = self.snapshots.basis()
                self.snapshots.clear()
            sampler = SubspaceSampler(self.basis, shapes, norm, mu=mu, v=v)
        else:  # mezo, zopro's zeroth-order warm-up iteration 0 (no mu yet), or isotropic by choice
            total = sum(p.numel() for p in self.params.values())
            sampler = IsotropicSampler(norm / math.sqrt(total) if fixed else 1.0)
        self.sampler, self.sampler_iteration = sampler, iteration
        return sampler

    def momentum_and_reward_change(
        self, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """mu = the policy's whole change over the previous iteration (for iteration 1: policy - sft);
        v = the reward adapter's change in the previous iteration's refinement. Both from the run's
        adapter history (the adapters at the iteration boundaries), keyed like the policy parameters."""
        mu = self.history.change("policy", since=iteration - 2, until=iteration - 1)
        v = self.history.change("reward", since=iteration - 2, until=iteration - 1)
        to_param = self._saved_keys(mu)
        if set(mu) != set(v):
            raise ValueError("policy and reward adapters do not pair up key by key")
        device = self.pm.device
        return (
            {to_param[k]: mu[k].to(device) for k in to_param},
            {to_param[k]: v[k].to(device) for k in to_param},
        )

    @property
    def history(self) -> AdapterHistory:
        if self.context.adapter_history is None:
            raise RuntimeError(f"{self.name} needs the run's adapter history and the context has none")
        return self.context.adapter_history

    def _saved_keys(self, saved: dict[str, torch.Tensor]) -> dict[str, str]:
        """{saved adapter key: parameter name} for the policy parameters."""
        to_param = {neutral_key(name, "policy"): name for name in self.params}
        missing = sorted(set(to_param) - set(saved))
        if missing:
            raise ValueError(
                f"policy and reward adapters do not pair up key by key (first unmatched: {missing[:3]})"
            )
        return to_param

    # -- the update --------------------------------------------------------------------------------------
    def update(self, rollout: Rollout, *, update_index: int, step_in_iteration: int) -> dict[str, float]:
        iteration = self.context.iteration
        if self.uses_first_order(iteration):
            if self.snapshots is not None and step_in_iteration == 0:
                self.snapshots.clear()  # a (refresh) first-order iteration renews the basis
                self.basis = None
            metrics = self.first_order.update(
                rollout, update_index=update_index, step_in_iteration=step_in_iteration
            )
            if self.snapshots is not None:
                metrics["zo/basis_snapshots"] = float(len(self.snapshots))
            return {**metrics, "zo/first_order": 1.0}
        config = self.config
        extra: dict[str, float] = {}
        if self.sampler_iteration != iteration:
            sampler = self.sampler_for(iteration)
            if step_in_iteration == 0:
                extra.update(self.premise(iteration))
        sampler = self.sampler
        updates = self.recipe.train.updates_per_iteration
        decay = 0.0
        if isinstance(sampler, ZoproSampler):
            decay = decay_at(config.decay_schedule, step_in_iteration, updates, start=config.decay_start)
            sampler.decay = decay
        lr = config.lr * (1.0 - step_in_iteration / updates if config.lr_schedule == "linear" else 1.0)

        def surrogate_loss() -> torch.Tensor:
            return self._surrogate(rollout)

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
            reduce_g=self.context.dist.mean_scalar if self.context.dist.enabled else None,
            normalizer=self.normalizer,
        )
        metrics = {
            **extra,
            "zo/g": result.g,
            "zo/g_raw": result.g_raw,
            "zo/abs_g": result.abs_g,
            "zo/g_rms": result.g_rms,
            "zo/decay": decay,
            "zo/cos_z_mu": result.cos_z_mu,
            "zo/cos_z_v": result.cos_z_v,
            "zo/z_norm": result.z_norm,
            "zo/step_norm": result.step_norm,
            "zo/skipped": float(result.skipped),
            "zo/clipped": float(result.clipped),
            "zo/loss_plus": result.loss_plus,
            "zo/loss_minus": result.loss_minus,
            "zo/directions": float(result.directions),
            "policy/lr": lr,
            "loss/policy": (result.loss_plus + result.loss_minus) / 2,
            "zo/first_order": 0.0,
        }
        if isinstance(sampler, SubspaceSampler):
            metrics["zo/basis_rank"] = float(sampler.rank)
        if true_gradient is not None and before is not None and not result.skipped:
            metrics["zo/cos_true_grad"] = _cosine_with_step(true_gradient, before, self.params)
        self._watch(result)
        return metrics

    def _surrogate(self, rollout: Rollout) -> torch.Tensor:
        new_logprobs = token_logprobs(self.pm, rollout.sequences, self.counters)
        loss, _ = clipped_surrogate(new_logprobs, rollout.old_logprobs, rollout.advantages, self.clip_range)
        return loss.float()

    def _watch(self, result) -> None:
        """Stop on repeated non-finite estimates; warn once per streak when g sits at the clip or at 0."""
        config = self.config
        self.consecutive_skips = self.consecutive_skips + 1 if result.skipped else 0
        if self.consecutive_skips >= config.max_consecutive_skips:
            raise TrainingFailed(
                f"{self.consecutive_skips} zeroth-order updates in a row had a non-finite estimate g; lower "
                f"{self.name}.lr or {self.name}.eps (or set {self.name}.g_clip) and resume"
            )
        at_clip = not result.skipped and result.clipped == result.directions
        streaks = {"g_at_clip": at_clip, "g_zero": not result.skipped and result.abs_g == 0.0}
        for code, hit in streaks.items():
            self.stuck[code] = self.stuck[code] + 1 if hit else 0
            if self.stuck[code] == STUCK_AFTER:
                if code == "g_at_clip":
                    message = (
                        f"every estimate g has been at the clip for {STUCK_AFTER} updates: the steps no "
                        f"longer follow the loss; lower {self.name}.lr or raise {self.name}.g_clip"
                    )
                else:
                    message = (
                        f"g has been exactly 0 for {STUCK_AFTER} updates: the loss no longer changes "
                        f"along the directions (a collapsed policy, or {self.name}.eps too small)"
                    )
                self.context.warn(code, message)

    def _true_gradient(self, surrogate_loss) -> dict[str, torch.Tensor]:
        """The first-order gradient on the same batch (diagnostic only; costs a backward)."""
        self.pm.use("policy")
        loss = surrogate_loss()
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names])
        self.counters.add(backward_passes=1)
        return self.context.dist.mean_tensors({n: g.detach() for n, g in zip(names, grads, strict=True)})

    # -- the premise check and the end of an iteration ---------------------------------------------------
    def premise(self, iteration: int) -> dict[str, float]:
        """Score and gold along +-mu, and cos(descent direction, mu): does ZOPrO's momentum hold here?"""
        config = self.config
        if not (self.informed and config.premise_check and iteration > 0):
            return {}
        mu = self.momentum  # set by sampler_for(iteration), which runs first
        with self.pm.adapter("policy"):
            metrics = along_mu(
                self.params,
                mu,
                config.premise_step,
                lambda: self.context.score_policy("premise", iteration, count=config.premise_prompts),
            )
        if config.premise_gradient_batches:
            losses = [
                (lambda b=b: self._surrogate(self.context.fresh_rollout(("premise", iteration, b))))
                for b in range(config.premise_gradient_batches)
            ]
            self.pm.use("policy")
            gradient = self.context.dist.mean_tensors(mean_gradient(self.params, losses))
            self.counters.add(backward_passes=len(losses))
            basis = self.sampler.basis if isinstance(self.sampler, SubspaceSampler) else None
            metrics.update(gradient_alignment(gradient, mu, basis))
        return finite(metrics)

    def end_iteration(self, iteration: int) -> dict[str, float]:
        """The policy's change over this iteration relative to the reference norm; warns when it stalls."""
        if self.reference_norms is None or self.uses_first_order(iteration):
            return {}
        start = self.history.at("policy", iteration - 1)
        to_param = self._saved_keys(start)
        change = math.sqrt(
            sum(
                float(((self.params[name].detach().cpu() - start[key].float()) ** 2).sum())
                for key, name in to_param.items()
            )
        )
        reference = self.reference_norm
        relative = change / reference if reference > 0 else 0.0
        if relative < STALLED_BELOW:
            self.context.warn(
                "policy_stalled",
                f"the policy moved {relative:.2g} of the reference norm in iteration {iteration + 1}: it has "
                f"stopped moving; raise {self.name}.lr, or set {self.name}.normalize_g = true"
                + (" and zopro.z_norm = 'reference'" if self.config.sampler == "zopro" else ""),
                relative_change=relative,
            )
        return {"zo/policy_change": change, "zo/policy_change_rel": relative}

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "first_order": self.first_order.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "stuck": dict(self.stuck),
            "reference_norms": self.reference_norms,
            "normalizer": self.normalizer.state_dict() if self.normalizer else None,
            "snapshots": self.snapshots.state_dict() if self.snapshots is not None else None,
            "basis": self.basis.cpu() if self.basis is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_order.load_state_dict(state["first_order"])
        self.consecutive_skips = state["consecutive_skips"]
        self.stuck = dict(state.get("stuck", self.stuck))
        self.reference_norms = state.get("reference_norms")
        if self.normalizer is not None and state.get("normalizer"):
            self.normalizer.load_state_dict(state["normalizer"])
        if self.snapshots is not None and state.get("snapshots"):
            self.snapshots.load_state_dict(state["snapshots"], self.pm.device)
        basis = state.get("basis")
        self.basis = basis.to(self.pm.device) if basis is not None else None
        self.sampler_iteration = None  # rebuilt from the adapter history on the next update


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
