"""Zeroth-order (SPSA) updates of float32 parameters with seed-replayed directions: MeZO and ZOPrO.

This module is method.md section 3 and nothing else. One update with q directions
(z_i regenerated from `direction_seed(run_seed, update_index, i)`, never stored):

    for i in 0 .. q-1:
        theta <- theta + eps z_i;    L+ = loss_fn()
        theta <- theta - 2 eps z_i;  L- = loss_fn()
        theta <- theta + eps z_i                         (restore)
        g_i = (L+ - L-) / (2 eps)                        (averaged across ranks by `reduce_g`)
    theta <- theta - lr * ((1/q) sum_i g_i z_i + wd * theta)    (no wd on "bias" / "norm" tensors)

Directions come from a sampler: `IsotropicSampler` (MeZO, z ~ N(0, I)) or `ZoproSampler` (ZOPrO: along
the policy's last change mu, away from the reward model's last change v, mixed by the decay d of
`decay_at`).

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

import hashlib
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

DECAY_SCHEDULES = ("exp", "linear")


def direction_seed(run_seed: int, update_index: int, direction_index: int) -> int:
    """The seed of direction `direction_index` of global update `update_index`: pure, well mixed, 63 bits.

    A hash (blake2b) rather than arithmetic, so neighbouring (update, direction) pairs get unrelated seeds.
    """
    key = ":".join(str(operator.index(value)) for value in (run_seed, update_index, direction_index))
    digest = hashlib.blake2b(f"zopro-direction:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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


class DirectionSampler(Protocol):
    """Draws the direction z for one tensor from a generator; called tensor by tensor in sorted-name order."""

    decay: float

    def check(self, params: Mapping[str, Tensor]) -> None:
        """Raise ValueError if no direction can be drawn for these parameters."""
        ...

    def direction(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        """z for tensor `name`: float32, shaped like `param`, on its device."""
        ...

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """(mu_k, v_k) for tensor `name`, or (None, None) for a sampler without them."""
        ...


def _standard_normal(param: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)


class IsotropicSampler:
    """MeZO: z ~ N(0, I) for every tensor."""

    decay = 0.0

    def check(self, params: Mapping[str, Tensor]) -> None:
        pass

    def direction(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        return _standard_normal(param, generator)

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        return None, None


class ZoproSampler:
    """ZOPrO's informed directions (method.md section 3). Per tensor k:

        n ~ N(0, I)
        n_perp = n - <v_hat_k, n> v_hat_k               (skipped when |v_k| = 0)
        n_perp <- n_perp * |mu_k| / |n_perp|            (noise as long as the momentum)
        z_k = d mu_k + sqrt(1 - d^2) n_perp

    mu_k is the policy's change over the previous iteration, v_k the reward adapter's latest change (same
    key), d the decay of `decay_at`: a plain attribute, so one sampler serves a whole iteration
    (`sampler.decay = decay_at(...)` before each update).

    Fallbacks, so that z is never zero or NaN (0 <= d < 1 is enforced):
    - |v_k| = 0: no projection, n_perp = n.
    - no room orthogonal to v_k (a one-element tensor, or n numerically parallel to v_k): n_perp = n, i.e.
      this tensor's noise keeps its component along v.
    - |mu_k| = 0: n_perp keeps the norm it was drawn with (sqrt(numel) in expectation, that of an isotropic
      draw) and the mu term is zero, so z_k = sqrt(1 - d^2) n_perp: MeZO-like exploration orthogonal to v,
      small while d is near 1 (the momentum says this tensor did not move) and full once d has decayed.

    mu and v are kept by reference (no copy when they are float32 already): put them on the parameters'
    device, or every draw copies them there.
    """

    def __init__(self, mu: Mapping[str, Tensor], v: Mapping[str, Tensor], decay: float) -> None:
        if set(mu) != set(v):
            raise ValueError(f"mu and v must have the same keys; differ on {sorted(set(mu) ^ set(v))}")
        self.mu = {name: tensor.detach().to(torch.float32) for name, tensor in mu.items()}
        self.v = {name: tensor.detach().to(torch.float32) for name, tensor in v.items()}
        self.mu_norm: dict[str, float] = {}
        self.v_norm: dict[str, float] = {}
        for name in self.mu:
            if self.mu[name].shape != self.v[name].shape:
                raise ValueError(
                    f"mu and v of tensor {name!r} differ in shape: "
                    f"{tuple(self.mu[name].shape)} vs {tuple(self.v[name].shape)}"
                )
            self.mu_norm[name] = float(torch.linalg.vector_norm(self.mu[name]))
            self.v_norm[name] = float(torch.linalg.vector_norm(self.v[name]))
            if not (math.isfinite(self.mu_norm[name]) and math.isfinite(self.v_norm[name])):
                raise ValueError(f"mu or v of tensor {name!r} is not finite")
        self.decay = decay

    @property
    def decay(self) -> float:
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ZOPrO decay d must be in [0, 1), got {value}")
        self._decay = float(value)

    def check(self, params: Mapping[str, Tensor]) -> None:
        for name, param in params.items():
            if name not in self.mu:
                raise ValueError(
                    f"ZoproSampler has no mu/v for tensor {name!r}; key them like the parameters"
                )
            if self.mu[name].shape != param.shape:
                raise ValueError(
                    f"mu/v of tensor {name!r} have shape {tuple(self.mu[name].shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )

    def noise(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        """n_perp of tensor `name` before mixing: orthogonal to v_k, norm |mu_k| (see the fallbacks)."""
        n = _standard_normal(param, generator)
        n_perp = n
        if self.v_norm[name] > 0:
            v_hat = self.v[name].to(param.device) / self.v_norm[name]
            # n_perp = n - <v_hat, n> v_hat
            n_perp = n - torch.dot(v_hat.reshape(-1), n.reshape(-1)) * v_hat
            # nothing left orthogonal to v: keep n (decided on the device, no host sync)
            n_perp = torch.where(n_perp.norm() > 1e-5 * n.norm(), n_perp, n)
        if self.mu_norm[name] > 0:
            # rescale n_perp to |mu_k|
            n_perp = n_perp * (self.mu_norm[name] / torch.linalg.vector_norm(n_perp))
        return n_perp

    def direction(self, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
        d = self.decay
        # z_k = d mu_k + sqrt(1 - d^2) n_perp
        z = math.sqrt(1.0 - d * d) * self.noise(name, param, generator)
        return z.add_(self.mu[name].to(param.device), alpha=d)

    def references(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        return self.mu[name], self.v[name]


@dataclass
class ZOStepResult:
    """What one zeroth-order update did (means over the directions it evaluated)."""

    g: float  # mean g_i used by the update (after the clip); non-finite when skipped
    g_raw: float  # mean g_i before the clip
    abs_g: float  # mean |g_i| before the clip: what a watchdog on |g| should see
    skipped: bool  # a non-finite g: theta restored, no update applied
    loss_plus: float  # mean L+
    loss_minus: float  # mean L-
    forward_passes: int  # calls of loss_fn
    cos_z_mu: float  # global cosine between z and mu (0.0 without mu or when a norm is 0)
    cos_z_v: float  # global cosine between z and v (same)
    decay: float  # the sampler's d (0.0 for MeZO)
    directions: int  # q, the directions requested
    clipped: int = 0  # how many g_i the clip changed


def replay_direction(params: Mapping[str, Tensor], sampler: DirectionSampler, seed: int) -> dict[str, Tensor]:
    """Materialise the direction z of `seed` (for tests and diagnostics; the update never stores it)."""
    with torch.no_grad():
        return {name: z for name, _, z in _replay(params, sampler, seed)}


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
) -> ZOStepResult:
    """One SPSA update of `params` in place (see the module docstring); returns what it did.

    `loss_fn` evaluates the loss at the current parameters (a scalar tensor or float); it is called under
    `torch.no_grad()`, twice per direction. `update_index` is the global update index (it seeds z).
    """
    _check_params(params)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps}")
    if not (math.isfinite(lr) and lr >= 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    if g_clip is not None and not g_clip > 0:
        raise ValueError(f"g_clip must be > 0 or None, got {g_clip}")
    sampler.check(params)

    seeds = [direction_seed(run_seed, update_index, i) for i in range(directions)]
    g_raw: list[float] = []
    losses_plus: list[float] = []
    losses_minus: list[float] = []
    cosines: list[tuple[float, float]] = []
    with torch.no_grad():
        for seed in seeds:
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
            cosines.append(meter.cosines())
            if not math.isfinite(g_raw[-1]):
                break

        skipped = not all(math.isfinite(g) for g in g_raw)
        g_used = [g if g_clip is None or skipped else min(max(g, -g_clip), g_clip) for g in g_raw]
        if not skipped and lr > 0:
            # theta <- theta - lr * ((1/q) sum_i g_i z_i + wd * theta), no wd on biases and norms
            if weight_decay > 0:
                for name, param in params.items():
                    if _decays(name):
                        param.mul_(1.0 - lr * weight_decay)
            for seed, g in zip(seeds, g_used, strict=True):
                _perturb(params, sampler, seed, -lr * g / directions)

    return ZOStepResult(
        g=_mean(g_used),
        g_raw=_mean(g_raw),
        abs_g=_mean([abs(g) for g in g_raw]),
        skipped=skipped,
        loss_plus=_mean(losses_plus),
        loss_minus=_mean(losses_minus),
        forward_passes=len(losses_plus) + len(losses_minus),
        cos_z_mu=_mean([cos_mu for cos_mu, _ in cosines]),
        cos_z_v=_mean([cos_v for _, cos_v in cosines]),
        decay=float(sampler.decay),
        directions=directions,
        clipped=0 if skipped else sum(raw != used for raw, used in zip(g_raw, g_used, strict=True)),
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


def _replay(
    params: Mapping[str, Tensor], sampler: DirectionSampler, seed: int
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Regenerate z tensor by tensor: sorted names, one generator per device, all seeded with `seed`."""
    generators: dict[torch.device, torch.Generator] = {}
    for name in sorted(params):
        param = params[name]
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        yield name, param, sampler.direction(name, param, generators[param.device])


def _perturb(
    params: Mapping[str, Tensor],
    sampler: DirectionSampler,
    seed: int,
    scale: float,
    meter: _CosineMeter | None = None,
) -> None:
    """theta_k <- theta_k + scale * z_k for every tensor k, z regenerated from `seed`."""
    for name, param, z in _replay(params, sampler, seed):
        param.add_(z, alpha=scale)
        if meter is not None:
            meter.add(z, *sampler.references(name))


class _CosineMeter:
    """cos(z, mu) and cos(z, v) over the concatenated tensors, accumulated tensor by tensor as z is drawn."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []  # per tensor: [z.z, z.mu, mu.mu, z.v, v.v], kept on the device

    def add(self, z: Tensor, mu: Tensor | None, v: Tensor | None) -> None:
        if mu is None or v is None:
            return
        z, mu, v = z.reshape(-1), mu.to(z.device).reshape(-1), v.to(z.device).reshape(-1)
        self.parts.append(torch.stack([z @ z, z @ mu, mu @ mu, z @ v, v @ v]).double())

    def cosines(self) -> tuple[float, float]:
        if not self.parts:
            return 0.0, 0.0
        zz, z_mu, mu_mu, z_v, v_v = sum(part.cpu() for part in self.parts).tolist()
        cos_mu = z_mu / math.sqrt(zz * mu_mu) if zz * mu_mu > 0 else 0.0
        cos_v = z_v / math.sqrt(zz * v_v) if zz * v_v > 0 else 0.0
        return cos_mu, cos_v


def _decays(name: str) -> bool:
    """Weight decay applies to every tensor except biases and norms (by name)."""
    lowered = name.lower()
    return "bias" not in lowered and "norm" not in lowered


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
