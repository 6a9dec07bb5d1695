"""Runaway detection: given the latest held-out evaluation and the ones before it, the warnings to raise.

One job, no side effects: the pipeline calls `check` after each held-out evaluation (every method, first-
and zeroth-order) and turns what it returns into `warning` events (`RunBook.warn`). Two signs that a
policy ran away from its reference in the last iteration:

- `kl_jump`: the held-out KL to the reference grew by more than `kl_jump_factor` and reached at least
  `kl_jump_min` nats per answer (the floor keeps the first iterations, where KL starts from 0, quiet);
- `gold_drop`: the held-out gold score (the win rate against SFT on tasks without gold) fell by more than
  `gold_drop` (and by more than three standard errors, when the evaluation reports one).

And one sign that it has not moved at all: `policy_unchanged`, after an iteration every held-out answer ties
with the SFT policy's (win rate exactly 0.5, standard error 0) and the KL to it is ~0: the answers of one
prompt are likely all the same, so there are no reward differences to learn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunWarning:
    code: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def check(
    latest: dict,
    history: list[dict],
    *,
    kl_jump_factor: float = 4.0,
    kl_jump_min: float = 3.0,
    gold_drop: float = 0.08,
) -> list[RunWarning]:
    """Warnings about `latest` (an evaluation's metrics) against `history` (the earlier evaluations, oldest
    first, the SFT baseline included). Thresholds of 0 switch a check off."""
    if not history:
        return []
    previous = history[-1]
    warnings: list[RunWarning] = []
    kl, kl_before = _number(latest, "eval/kl"), _number(previous, "eval/kl")
    if kl_jump_factor > 0 and kl is not None and kl_before is not None:
        if kl >= kl_jump_min and kl > kl_jump_factor * max(kl_before, 0.0):
            ratio = kl / kl_before if kl_before > 0 else math.inf
            warnings.append(
                RunWarning(
                    "kl_jump",
                    f"held-out KL to the reference jumped from {kl_before:.2f} to {kl:.2f} nats "
                    f"({'x' + format(ratio, '.1f') if math.isfinite(ratio) else 'from zero'}) in one "
                    "iteration: the policy is running away (raise policy.kl_coef or set policy.kl_target, "
                    "lower the learning rate, or set policy.max_kl)",
                    {"kl": kl, "kl_before": kl_before},
                )
            )
    if gold_drop > 0:
        for key, name in (("eval/gold", "gold"), ("eval/win_rate_vs_sft", "win rate vs SFT")):
            now, before = _number(latest, key), _number(previous, key)
            if now is None or before is None:
                continue
            se = _number(latest, f"{key}_se") or 0.0
            drop = before - now
            if drop > gold_drop and drop > 3 * se:
                warnings.append(
                    RunWarning(
                        "gold_drop",
                        f"held-out {name} fell from {before:.3f} to {now:.3f} in one iteration "
                        f"(threshold {gold_drop:g}): the policy may be exploiting the reward model",
                        {"value": now, "value_before": before, "metric": key},
                    )
                )
            break  # gold where the task has it, the win rate only without it
    win, win_se, kl = _number(latest, "eval/win_rate_vs_sft"), _number(latest, "eval/win_rate_vs_sft_se"), kl
    if win == 0.5 and win_se == 0.0 and kl is not None and abs(kl) < 1e-3:
        warnings.append(
            RunWarning(
                "policy_unchanged",
                f"every held-out answer ties with the SFT policy's and the KL to it is {kl:.1e}: the policy has "
                "not moved; its answers to one prompt are likely all alike (no reward differences to learn "
                "from): raise policy.temperature or train.samples_per_prompt, or shorten SFT (sft.steps)",
                {"kl": kl},
            )
        )
    return warnings
