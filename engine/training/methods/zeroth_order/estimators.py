"""What one zeroth-order update makes of its q probes (docs/method.md section 3.1): the estimator of the
directional derivatives g_i and the fitness that turns them into step coefficients.

Estimators (per direction z_i, eps the probe size):
- two_sided (SPSA, the default):  g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps), 2 passes each;
- one_sided (FZOO, arXiv 2506.09034): g_i = (L(theta + eps z_i) - L0) / eps, one pass each, with L0 the loss
  at theta. Right after a rollout L0 needs no pass: the policy is the one that sampled the answers, every
  ratio is 1 and the clipped surrogate is -(mean advantage) (`surrogate_at_rollout`). On a quadratic both
  estimates g_i z_i have the same expectation (the one-sided extra term eps/2 z'Az z is odd in z).

Fitness across the q directions of one update (group-relative, as GRPO does for answers; ES at scale,
arXiv 2509.24372):
- raw: g_i;
- zscore: (g_i - mean g) / std g (population std; all 0 when the q are equal): the step is scaled by the
  spread of the probes (FZOO's step), and a one-sided estimate needs no L0 at all (it cancels);
- loo: g_i - mean_{j != i} g_j (leave-one-out, as RLOO does for answers); L0 cancels too.
The mean is a valid baseline because E[z] = 0 for every sampler: subtracting it changes no expectation of
the step direction beyond a factor (q - 1) / q for loo, and removes the shared part of the q probes' noise.
Pure functions; no I/O, no RNG.
"""

from __future__ import annotations

import math

ESTIMATORS = ("two_sided", "one_sided")
FITNESS = ("raw", "zscore", "loo")


def group_fitness(values: list[float], fitness: str) -> list[float]:
    """The q step coefficients of one update from its q estimates g_i (see the module docstring)."""
    if fitness not in FITNESS:
        raise ValueError(f"unknown fitness {fitness!r}; accepted: {', '.join(FITNESS)}")
    if fitness == "raw" or not values:
        return list(values)
    q = len(values)
    if q < 2:
        raise ValueError(f"{fitness} fitness compares the directions of an update: it needs q >= 2, got {q}")
    mean = sum(values) / q
    if fitness == "loo":
        total = sum(values)
        return [g - (total - g) / (q - 1) for g in values]
    spread = math.sqrt(sum((g - mean) ** 2 for g in values) / q)
    return [(g - mean) / spread if spread > 0 else 0.0 for g in values]


def needs_base_loss(estimator: str, fitness: str) -> bool:
    """Whether the update needs L0 = L(theta): only a one-sided estimate with raw fitness does."""
    return estimator == "one_sided" and fitness == "raw"


def passes_per_update(estimator: str, fitness: str, directions: int, base_known: bool) -> int:
    """Forward passes of one zeroth-order update of q directions (L0 costs one unless it is known)."""
    if estimator == "two_sided":
        return 2 * directions
    return directions + (1 if needs_base_loss(estimator, fitness) and not base_known else 0)
