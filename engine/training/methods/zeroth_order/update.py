"""`mezo` and `zopro`: the policy update estimated from two forward passes per direction (docs/method.md
section 3). Both use the same rollout and the same clipped surrogate as `rloo`; they differ in where the
directions come from, which the update is handed (`directions.py`): `mezo` has no first-order iteration
and draws isotropic or block-coordinate directions; `zopro` runs iteration 0 first-order (as the paper
does) and then draws the paper's informed directions, directions inside the span of that iteration's
gradients, or either of the others. The step scale cannot collapse: z's length is tied to a fixed
reference (`zopro.z_norm`, the subspace sampler's norm), and with `normalize_g` each g is divided by its
running RMS, so that `lr` reads as the fraction of |z| moved per update.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.errors import TrainingFailed
from engine.training.methods.context import MethodContext
from engine.training.methods.group import GroupUpdate
from engine.training.methods.rloo import RLOOUpdate
from engine.training.methods.zeroth_order.directions import DirectionSource
from engine.training.methods.zeroth_order.premise import PremiseCheck
from engine.training.methods.zeroth_order.row_probes import row_probe_update
from engine.training.methods.zeroth_order.samplers import SubspaceSampler, ZoproSampler
from engine.training.methods.zeroth_order.spsa import RunningRMS, combined, decay_at, zo_update
from engine.training.objectives import clipped_surrogate
from engine.training.rollout import Rollout, token_logprobs

STALLED_BELOW = 1e-3  # policy change over an iteration, relative to the reference norm: "stopped moving"
STUCK_AFTER = 5  # updates in a row with every g at the clip, or g = 0, before a warning


def first_order_update(context: MethodContext, on_gradient) -> RLOOUpdate | GroupUpdate:
    """zopro's first-order iterations: zopro.first_iteration, rloo or a group method (grpo, dapo, ...);
    `on_gradient` sees the batch's gradients or each prompt's (`zopro.subspace_gradients`)."""
    config = context.recipe.zopro
    name, prompts = config.first_iteration, config.subspace_gradients == "prompts"
    if name in ("rloo", "mezo"):  # mezo: no first-order iteration at all (uses_first_order is False)
        return RLOOUpdate(context, on_gradient=on_gradient, prompt_gradients=prompts)
    return GroupUpdate(context, name, on_gradient=on_gradient, prompt_gradients=prompts)


class ZerothOrderUpdate:
    """One SPSA update per rollout: theta <- theta - lr_t * ((1/q) sum_i g_i z_i + wd * theta)."""

    def __init__(self, context: MethodContext, name: str, directions: DirectionSource):
        """`directions`: where each iteration's sampler comes from (a run's: `RunDirections.for_run`)."""
        self.name = name
        self.context = context
        self.models, self.counters = context.models, context.counters
        self.recipe = context.recipe
        self.config = getattr(context.recipe, name)
        self.clip_range = context.recipe.policy.clip_range
        # float32 trainable adapter tensors, keyed by their full peft names
        self.params = self.models.adapter_parameters("policy")
        self.directions = directions
        # iteration 0 of zopro (the paper), and the refresh iterations of the subspace sampler, whose
        # gradients make the subspace basis
        subspace = directions.snapshot_count is not None
        self.first_order = first_order_update(context, directions.add_gradient if subspace else None)
        self.premise_check = PremiseCheck(context, self.config, self.params, self._surrogate)
        self.normalizer = RunningRMS(self.config.g_rms_decay) if self.config.normalize_g else None
        self.consecutive_skips = 0
        self.stuck = {"g_at_clip": 0, "g_zero": 0}

    @property
    def informed(self) -> bool:
        """Whether this method runs first-order iterations and learns from them (zopro)."""
        return self.name == "zopro"

    def uses_first_order(self, iteration: int) -> bool:
        if not self.informed:
            return False
        if iteration == 0:
            return self.config.first_iteration != "mezo"
        every = self.config.subspace_refresh_every if self.config.sampler == "subspace" else 0
        return bool(every) and iteration % every == 0

    # -- the update --------------------------------------------------------------------------------------
    def update(self, rollout: Rollout, *, update_index: int, step_in_iteration: int) -> dict[str, float]:
        iteration = self.context.iteration
        directions = self.directions
        if self.uses_first_order(iteration):
            if step_in_iteration == 0:
                directions.renew_subspace()  # a (refresh) first-order iteration renews the basis
            metrics = self.first_order.update(
                rollout, update_index=update_index, step_in_iteration=step_in_iteration
            )
            if directions.snapshot_count is not None:
                metrics["zo/basis_snapshots"] = float(directions.snapshot_count)
            return {**metrics, "zo/first_order": 1.0}
        config = self.config
        extra: dict[str, float] = {}
        sampler, built = directions.sampler_for(iteration)
        if built and step_in_iteration == 0:
            extra.update(self.premise(iteration, sampler))
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
        self.models.use("policy")
        results = []
        for inner in range(config.updates_per_rollout):  # several updates on one rollout (section 3.1)
            if getattr(config, "probes", "batch") == "batch":
                results.append(self._batch_update(surrogate_loss, rollout, sampler, update_index, lr, inner))
            else:  # each answer probes its own direction (section 3.2)
                results.append(self._row_update(rollout, sampler, update_index, lr, inner))
            if results[-1].skipped:
                break
        result = combined(results)
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
            if isinstance(sampler, SubspaceSampler) and sampler.lengths is None:  # orthonormal columns
                metrics["zo/true_grad_in_basis"] = _fraction_in_basis(true_gradient, sampler.basis)
        self._watch(result)
        return metrics

    def _batch_update(
        self, surrogate_loss, rollout: Rollout, sampler, update_index: int, lr: float, inner: int
    ):
        config = self.config
        return zo_update(
            self.params,
            surrogate_loss,
            sampler,
            **self._shared_settings(update_index, lr),
            directions=config.directions,
            reduce_g=self.context.dist.mean_scalar if self.context.dist.enabled else None,
            # at the rollout's policy every ratio is 1: L0 is known without a pass
            base_loss=surrogate_at_rollout(rollout, self.clip_range) if inner == 0 else None,
            direction_offset=inner * config.directions,
        )

    def _row_update(self, rollout: Rollout, sampler, update_index: int, lr: float, inner: int):
        dist, rounds = self.context.dist, self.config.directions
        return row_probe_update(
            self.models,
            self.params,
            rollout,
            sampler,
            **self._shared_settings(update_index, lr),
            adapter="policy",
            clip_range=self.clip_range,
            rounds=rounds,
            rounds_per_pass=self.config.rounds_per_pass,
            at_rollout_policy=inner == 0,
            direction_offset=inner * rounds * (rollout.total_rows or len(rollout.advantages)),
            sums=dist.sum_floats if dist.enabled else None,
            count_pass=lambda copies: self.counters.add(
                forward_passes=1, tokens=copies * int(rollout.sequences.attention_mask.sum())
            ),
        )

    def _shared_settings(self, update_index: int, lr: float) -> dict[str, Any]:
        """What a whole-batch and a row-probe update take alike."""
        config = self.config
        return {
            "run_seed": self.recipe.seed,
            "update_index": update_index,
            "eps": config.eps,
            "lr": lr,
            "weight_decay": config.weight_decay,
            "g_clip": config.g_clip or None,
            "normalizer": self.normalizer,
            "estimator": config.estimator,
            "fitness": config.fitness,
        }

    def _surrogate(self, rollout: Rollout) -> torch.Tensor:
        new_logprobs = token_logprobs(self.models, rollout.sequences, self.counters)
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
        self.models.use("policy")
        loss = surrogate_loss()
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names])
        self.counters.add(backward_passes=1)
        return self.context.dist.mean_tensors({n: g.detach() for n, g in zip(names, grads, strict=True)})

    # -- the premise check and the end of an iteration ---------------------------------------------------
    def premise(self, iteration: int, sampler) -> dict[str, float]:
        """Score and gold along +-mu, and cos(descent direction, mu): does ZOPrO's momentum hold here?"""
        mu = self.directions.momentum  # set by sampler_for(iteration), which runs first
        if not (self.informed and self.config.premise_check and iteration > 0 and mu is not None):
            return {}
        basis = sampler.basis if isinstance(sampler, SubspaceSampler) else None
        return self.premise_check.measure(iteration, mu, basis)

    def end_iteration(self, iteration: int) -> dict[str, float]:
        """The policy's change over this iteration relative to the reference norm; warns when it stalls."""
        reference = self.directions.reference_norm
        if reference is None or self.uses_first_order(iteration):
            return {}
        change = self.directions.policy_change(iteration)
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
        directions = self.directions.state_dict()
        return {  # one flat dict, the keys in the order checkpoints have always had
            "first_order": self.first_order.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "stuck": dict(self.stuck),
            "reference_norms": directions["reference_norms"],
            "normalizer": self.normalizer.state_dict() if self.normalizer else None,
            "snapshots": directions["snapshots"],
            "basis": directions["basis"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_order.load_state_dict(state["first_order"])
        self.consecutive_skips = state["consecutive_skips"]
        self.stuck = dict(state.get("stuck", self.stuck))
        if self.normalizer is not None and state.get("normalizer"):
            self.normalizer.load_state_dict(state["normalizer"])
        self.directions.load_state_dict(state)


def surrogate_at_rollout(rollout: Rollout, clip_range: float) -> float:
    """The clipped surrogate at the policy that sampled the rollout (every ratio 1): no forward pass."""
    loss, _ = clipped_surrogate(rollout.old_logprobs, rollout.old_logprobs, rollout.advantages, clip_range)
    return float(loss)


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


def _fraction_in_basis(gradient: dict[str, torch.Tensor], basis: torch.Tensor) -> float:
    """|Q^T g| / |g|: how much of the true gradient the subspace's orthonormal basis Q (rows in sorted-name
    order) can express; the rest no direction of the sampler reaches."""
    flat = torch.cat([gradient[name].reshape(-1).to(basis) for name in sorted(gradient)])
    norm = float(torch.linalg.vector_norm(flat))
    return float(torch.linalg.vector_norm(basis.T @ flat)) / norm if norm > 0 else 0.0
