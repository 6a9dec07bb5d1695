"""Zeroth-order (SPSA) updates of float32 parameters with seed-replayed directions: MeZO and ZOPrO.

This module is docs/method.md section 3 and nothing else. One update with q directions
(z_i regenerated from `direction_seed(run_seed, update_index, i)`, never stored):

    for i in 0 .. q-1:
        theta <- theta + eps z_i;    L+ = loss_fn()
        theta <- theta - 2 eps z_i;  L- = loss_fn()
        theta <- theta + eps z_i                         (restore)
        g_i = (L+ - L-) / (2 eps)                        (averaged across ranks by `reduce_g`)
    theta <- theta - lr * ((1/q) sum_i g_i z_i + wd * theta)    (no wd on "bias" / "norm" tensors)

Directions come from a sampler of `samplers.py` (isotropic MeZO, the paper's ZOPrO, the gradient
subspace, block coordinate). With a `RunningRMS` each g_i is divided by the running RMS of g before the
clip and the step, so `lr` reads as the fraction of |z| moved per update whatever the loss scale.

Facts a caller should know:
- Seed replay: every rank and a resumed run regenerate the same z from three integers, tensor by tensor in
  sorted-name order, with one `torch.Generator` per device. Memory is that of inference: one tensor of z
  at a time, no copy of the parameters, no activations (everything runs under `torch.no_grad()`). The
  same seed gives the same z for the same parameter placement (a CPU and a CUDA generator differ).
- Parameters must be float32 (trainable adapters on a bf16 base are fine): in bf16 a +eps z perturbation
  mostly rounds away and g collapses to 0.
- The restore is floating-point arithmetic: theta + eps z - 2 eps z + eps z equals theta to about one ulp,
  not bit for bit (a bitwise restore would need a copy of the parameters, which seed replay exists to
  avoid). If `loss_fn` raises, the parameters are restored the same way before the error propagates.
- Guards: a non-finite g (from a NaN or infinite loss on any rank) restores theta, skips the whole update
  and returns `skipped=True`. This module does not count skips: the pipeline stops the run with a clear
  message after N skipped updates in a row. `g_clip` clips each g_i to [-g_clip, g_clip]; plain SPSA
  diverges on tiny models without it (practice.md).
- Distributed: `reduce_g` (e.g. an all-reduce with ReduceOp.AVG) is called once per direction on every
  rank, also when the local g is non-finite. An average propagates NaN/inf, so every rank makes the same
  skip decision and applies the same update from the same reduced g.
- Pure library: no file I/O, no global RNG.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.seeds import seeded
from engine.training.methods.zeroth_order.estimators import ESTIMATORS, group_fitness, needs_base_loss
from engine.training.methods.zeroth_order.samplers import DirectionSampler

DECAY_SCHEDULES = ("exp", "linear")


def direction_seed(run_seed: int, update_index: int, direction_index: int) -> int:
    """The seed of direction `direction_index` of global update `update_index`: pure, well mixed, 63 bits.

    A hash (blake2b) rather than arithmetic, so neighbouring (update, direction) pairs get unrelated seeds.
    """
    return seeded("zopro-direction", *(operator.index(v) for v in (run_seed, update_index, direction_index)))


def decay_at(schedule: str, s: int, updates_in_iteration: int, start: float = 0.999) -> float:
    """ZOPrO's decay d at update s (0-based) of an iteration of S updates; d restarts at `start` each iteration.

    exp: d = start * e^(-s);  linear: d = max(0, start - s / S).
    """
    if schedule not in DECAY_SCHEDULES:
        raise ValueError(f"unknown decay schedule {schedule!r}; accepted: {', '.join(DECAY_SCHEDULES)}")
    if s < 0 or updates_in_iteration < 1:
        raise ValueError(f"need 0 <= s and 1 <= updates_in_iteration, got s={s}, S={updates_in_iteration}")
    if not 0.0 <= start < 1.0:
        raise ValueError(f"decay start must be in [0, 1), got {start}")
    if schedule == "exp":
        return start * math.exp(-s)
    return max(0.0, start - s / updates_in_iteration)


class RunningRMS:
    """The running root-mean-square of g (an exponential moving average of g^2 with Adam's bias
    correction), used to normalise each g_i: g_i / rms. Updated with the finite g's of every update."""

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the RMS decay must be in [0, 1), got {decay}")
        self.decay, self.mean_square, self.count = decay, 0.0, 0

    @property
    def rms(self) -> float:
        if self.count == 0:
            return 0.0
        return math.sqrt(self.mean_square / (1.0 - self.decay**self.count))

    def normalize(self, values: list[float]) -> list[float]:
        """Fold `values` into the running mean square, then divide them by the updated RMS."""
        for g in values:
            self.mean_square = self.decay * self.mean_square + (1.0 - self.decay) * g * g
            self.count += 1
        rms = self.rms
        return [g / rms if rms > 0 else 0.0 for g in values]

    def state_dict(self) -> dict[str, float]:
        return {"decay": self.decay, "mean_square": self.mean_square, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.decay, self.mean_square, self.count = state["decay"], state["mean_square"], int(state["count"])


@dataclass
class ZOStepResult:
    """What one zeroth-order update did (means over the directions it evaluated)."""

    g: float  # mean g_i used by the update (after normalising and the clip); non-finite when skipped
    g_raw: float  # mean g_i as estimated (averaged across ranks), before normalising and the clip
    abs_g: float  # mean |g_i| as estimated: what a watchdog on |g| should see
    skipped: bool  # a non-finite g: theta restored, no update applied
    loss_plus: float  # mean L+
    loss_minus: float  # mean L- (one-sided: L0, or the mean L+ without it)
    forward_passes: int  # calls of loss_fn
    cos_z_mu: float  # global cosine between z and mu (0.0 without mu or when a norm is 0)
    cos_z_v: float  # global cosine between z and v (same)
    decay: float  # the sampler's d (0.0 for the others)
    directions: int  # q, the directions requested
    clipped: int = 0  # how many g_i the clip changed
    z_norm: float = 0.0  # mean |z_i|
    step_norm: float = 0.0  # |theta_after - theta_before| (weight decay included), exact
    g_rms: float = 0.0  # the running RMS that divided g (0.0 without normalising)


def replay_direction(params: Mapping[str, Tensor], sampler: DirectionSampler, seed: int) -> dict[str, Tensor]:
    """Materialise the direction z of `seed` (for tests and diagnostics; the update never stores it).
    Tensors a sampler leaves out (block coordinate) get zeros."""
    with torch.no_grad():
        z = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in params.items()}
        z.update({name: zi for name, _, zi in sampler.replay(params, seed)})
        return z


def zo_update(
    params: Mapping[str, Tensor],
    loss_fn: Callable[[], Tensor | float],
    sampler: DirectionSampler,
    *,
    run_seed: int,
    update_index: int,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
    directions: int = 1,
    g_clip: float | None = None,
    reduce_g: Callable[[float], float] | None = None,
    normalizer: RunningRMS | None = None,
    estimator: str = "two_sided",
    fitness: str = "raw",
    base_loss: float | None = None,
    direction_offset: int = 0,
) -> ZOStepResult:
    """One SPSA update of `params` in place (see the module docstring); returns what it did.

    `loss_fn` evaluates the loss at the current parameters (a scalar tensor or float); it is called under
    `torch.no_grad()`, twice per direction. `update_index` is the global update index (it seeds z).
    With `normalizer`, each g_i is divided by the running RMS of g before the clip (so `g_clip` is then
    in units of that RMS).
    `estimator`, `fitness` (estimators.py): one_sided probes theta + eps z only and compares with
    `base_loss` (L0, the loss at theta; one more pass when it is None and the fitness is raw); fitness
    zscore or loo makes the q estimates group-relative before the RMS and the clip. `direction_offset`:
    the directions are number offset .. offset + q - 1 of this update (several updates on one rollout).
    """
    _check_params(params)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; accepted: {', '.join(ESTIMATORS)}")
    group_fitness([0.0] * max(directions, 2), fitness)  # an unknown fitness fails before any pass
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps}")
    if not (math.isfinite(lr) and lr >= 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    if g_clip is not None and not g_clip > 0:
        raise ValueError(f"g_clip must be > 0 or None, got {g_clip}")
    sampler.check(params)

    if fitness != "raw" and directions < 2:
        raise ValueError(f"{fitness} fitness needs directions >= 2, got {directions}")
    seeds = [direction_seed(run_seed, update_index, direction_offset + i) for i in range(directions)]
    g_raw: list[float] = []
    losses_plus: list[float] = []
    losses_minus: list[float] = []
    meters: list[_CosineMeter] = []
    with torch.no_grad():
        if estimator == "one_sided":
            if base_loss is None and needs_base_loss(estimator, fitness):
                base_loss = float(loss_fn())
                losses_minus.append(base_loss)
            g_raw = _one_sided(params, loss_fn, sampler, seeds, eps, base_loss, reduce_g, losses_plus, meters)
        for seed in seeds if estimator == "two_sided" else ():
            meter = _CosineMeter()
            offset = 0.0  # theta is currently theta + offset * z
            try:
                _perturb(params, sampler, seed, eps, meter)  # theta + eps z
                offset = eps
                losses_plus.append(float(loss_fn()))
                _perturb(params, sampler, seed, -2.0 * eps)  # theta - eps z
                offset = -eps
                losses_minus.append(float(loss_fn()))
            finally:
                if offset != 0.0:
                    _perturb(params, sampler, seed, -offset)  # restore theta (also if loss_fn raised)
            # g = (L+ - L-) / (2 eps), then averaged across ranks
            g = (losses_plus[-1] - losses_minus[-1]) / (2.0 * eps)
            g_raw.append(float(reduce_g(g)) if reduce_g is not None else g)
            meters.append(meter)
            if not math.isfinite(g_raw[-1]):
                break

        g_used, skipped, clipped = step_coefficients(g_raw, fitness, normalizer, g_clip)
        step_norm = 0.0
        if not skipped and lr > 0:
            # theta <- theta - lr * ((1/q) sum_i g_i z_i + wd * theta), no wd on biases and norms
            step_norm = _apply_step(
                params, sampler, seeds, [-lr * g / directions for g in g_used], lr * weight_decay
            )

    return ZOStepResult(
        g=mean_or_nan(g_used),
        g_raw=mean_or_nan(g_raw),
        abs_g=mean_or_nan([abs(g) for g in g_raw]),
        skipped=skipped,
        loss_plus=mean_or_nan(losses_plus),
        loss_minus=mean_or_nan(losses_minus) if losses_minus else _baseline(base_loss, losses_plus),
        forward_passes=len(losses_plus) + len(losses_minus),
        cos_z_mu=mean_or_nan([m.cosines()[0] for m in meters]),
        cos_z_v=mean_or_nan([m.cosines()[1] for m in meters]),
        decay=float(sampler.decay),
        directions=directions,
        clipped=clipped,
        z_norm=mean_or_nan([m.z_norm() for m in meters]),
        step_norm=step_norm,
        g_rms=normalizer.rms if normalizer is not None else 0.0,
    )


def step_coefficients(
    g_raw: list[float], fitness: str, normalizer: RunningRMS | None, g_clip: float | None
) -> tuple[list[float], bool, int]:
    """(the step's coefficient of each estimate, skipped, how many the clip changed): the fitness, then
    the running RMS, then the clip; a non-finite estimate skips the update (the coefficients as estimated)."""
    if not all(math.isfinite(g) for g in g_raw):
        return list(g_raw), True, 0
    g_used = group_fitness(g_raw, fitness)
    if normalizer is not None:
        g_used = normalizer.normalize(g_used)
    if g_clip is None:
        return g_used, False, 0
    g_used = [min(max(g, -g_clip), g_clip) for g in g_used]
    return g_used, False, sum(abs(g) >= g_clip for g in g_used)


def _one_sided(
    params: Mapping[str, Tensor],
    loss_fn: Callable[[], Tensor | float],
    sampler: DirectionSampler,
    seeds: list[int],
    eps: float,
    base_loss: float | None,
    reduce_g: Callable[[float], float] | None,
    losses_plus: list[float],
    meters: list[_CosineMeter],
) -> list[float]:
    """g_i = (L(theta + eps z_i) - L0) / eps, one pass each (L0 = 0 when the fitness cancels it)."""
    g_raw: list[float] = []
    for seed in seeds:
        meter = _CosineMeter()
        try:
            _perturb(params, sampler, seed, eps, meter)  # theta + eps z
            losses_plus.append(float(loss_fn()))
        finally:
            _perturb(params, sampler, seed, -eps)  # restore theta (also if loss_fn raised)
        g = (losses_plus[-1] - (base_loss or 0.0)) / eps
        g_raw.append(float(reduce_g(g)) if reduce_g is not None else g)
        meters.append(meter)
        if not math.isfinite(g_raw[-1]):
            return g_raw
    if base_loss is None:  # no L0: centre on the probes' mean (what zscore and loo do anyway)
        mean = sum(g_raw) / len(g_raw)
        g_raw = [g - mean for g in g_raw]
    return g_raw


def combined(results: list[ZOStepResult]) -> ZOStepResult:
    """Several updates on one rollout as one: means of the per-update means, sums of the passes, the
    step norm of the last (what a watchdog on the latest step should see), skipped if any was."""
    if len(results) == 1:
        return results[0]

    def mean(field: str) -> float:
        return mean_or_nan([getattr(r, field) for r in results])

    last = results[-1]
    return ZOStepResult(
        g=mean("g"),
        g_raw=mean("g_raw"),
        abs_g=mean("abs_g"),
        skipped=any(r.skipped for r in results),
        loss_plus=mean("loss_plus"),
        loss_minus=mean("loss_minus"),
        forward_passes=sum(r.forward_passes for r in results),
        cos_z_mu=mean("cos_z_mu"),
        cos_z_v=mean("cos_z_v"),
        decay=last.decay,
        directions=last.directions,
        clipped=last.clipped,
        z_norm=mean("z_norm"),
        step_norm=last.step_norm,
        g_rms=last.g_rms,
    )


def _check_params(params: Mapping[str, Tensor]) -> None:
    if not params:
        raise ValueError("zo_update needs at least one parameter tensor")
    storages: dict[int, str] = {}
    for name, param in params.items():
        if param.dtype != torch.float32:
            raise TypeError(
                f"zeroth-order parameter {name!r} is {param.dtype}; it must be float32 "
                "(in bf16/fp16 a +eps*z perturbation rounds away): keep the trainable adapter in float32"
            )
        pointer = param.untyped_storage().data_ptr()
        if pointer in storages:
            raise ValueError(f"parameters {storages[pointer]!r} and {name!r} share storage (tied weights)")
        storages[pointer] = name


def _perturb(
    params: Mapping[str, Tensor],
    sampler: DirectionSampler,
    seed: int,
    scale: float,
    meter: _CosineMeter | None = None,
) -> None:
    """theta_k <- theta_k + scale * z_k for every tensor k, z regenerated from `seed`."""
    for name, param, z in sampler.replay(params, seed):
        param.add_(z, alpha=scale)
        if meter is not None:
            meter.add(z, *sampler.references(name))


def _apply_step(
    params: Mapping[str, Tensor],
    sampler: DirectionSampler,
    seeds: list[int],
    coefficients: list[float],
    decay: float,
) -> float:
    """theta_k <- theta_k - decay theta_k [k decays] + sum_i c_i z_ik and the step's norm. The q replays
    advance side by side, tensor by tensor in sorted-name order, so only one tensor's step is held."""
    replays = [_Peekable(sampler.replay(params, seed)) for seed in seeds]
    square = None
    for name in sorted(params):
        param = params[name]
        step = None
        for replay, coefficient in zip(replays, coefficients, strict=True):
            z = replay.take(name)
            if z is not None:
                step = z.mul_(coefficient) if step is None else step.add_(z, alpha=coefficient)
        if decay > 0 and decays(name):
            step = param * -decay if step is None else step.add_(param, alpha=-decay)
        if step is None:
            continue
        param.add_(step)
        part = (step.double() ** 2).sum()
        square = part if square is None else square + part.to(square.device)
    return math.sqrt(float(square)) if square is not None else 0.0


class _Peekable:
    """A replay whose next (name, param, z) is taken only when asked for by name (a sampler may leave
    tensors out, in sorted order)."""

    def __init__(self, replay):
        self.replay = replay
        self.next = next(self.replay, None)

    def take(self, name: str) -> Tensor | None:
        if self.next is None or self.next[0] != name:
            return None
        z = self.next[2]
        self.next = next(self.replay, None)
        return z


class _CosineMeter:
    """|z|, cos(z, mu) and cos(z, v) over the concatenated tensors, accumulated tensor by tensor."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []  # per tensor: [z.z, z.mu, mu.mu, z.v, v.v], kept on the device

    def add(self, z: Tensor, mu: Tensor | None, v: Tensor | None) -> None:
        z = z.reshape(-1)
        zz = z @ z
        if mu is None or v is None:
            zero = torch.zeros((), device=z.device)
            self.parts.append(torch.stack([zz, zero, zero, zero, zero]).double())
            return
        mu, v = mu.to(z.device).reshape(-1), v.to(z.device).reshape(-1)
        self.parts.append(torch.stack([zz, z @ mu, mu @ mu, z @ v, v @ v]).double())

    def _sums(self) -> list[float]:
        return sum(part.cpu() for part in self.parts).tolist() if self.parts else [0.0] * 5

    def z_norm(self) -> float:
        return math.sqrt(self._sums()[0])

    def cosines(self) -> tuple[float, float]:
        zz, z_mu, mu_mu, z_v, v_v = self._sums()
        cos_mu = z_mu / math.sqrt(zz * mu_mu) if zz * mu_mu > 0 else 0.0
        cos_v = z_v / math.sqrt(zz * v_v) if zz * v_v > 0 else 0.0
        return cos_mu, cos_v


def decays(name: str) -> bool:
    """Weight decay applies to every tensor except biases and norms (by name)."""
    lowered = name.lower()
    return "bias" not in lowered and "norm" not in lowered


def _baseline(base_loss: float | None, losses_plus: list[float]) -> float:
    """What a one-sided update compared its probes with: L0, or (without it) the probes' mean."""
    return base_loss if base_loss is not None else mean_or_nan(losses_plus)


def mean_or_nan(values: list[float]) -> float:
    """The mean of `values`; NaN when there are none (the update's logged means; row probes use it too)."""
    return sum(values) / len(values) if values else math.nan
