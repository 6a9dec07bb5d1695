"""The KL coefficient beta of rlhf_reward = score - beta * KL: fixed, or adapted to a target KL (Ziegler et al.
2019, "Fine-tuning language models from human preferences", section 2.2; the AdaptiveKLController of TRL's
older PPO trainer):

    e = clip(KL / target - 1, -0.2, 0.2);   beta <- max(beta_0, beta * (1 + e / horizon))

after every policy update, with KL the mean sequence KL of that update's rollout, `horizon` in updates and
beta_0 = policy.kl_coef. A policy that drifts past the target gets a stronger pull back to the reference,
whatever the scale of the reward model's scores (which changes as refinement goes on). Unlike Ziegler's
controller, beta never falls below beta_0: early on, while the KL is naturally far under any sensible
target, Ziegler's beta would decay (by 45 % over 30 updates at horizon 10) and let the policy drift faster
just before it needs the pull most; with the floor a run that stays under the target trains exactly as
with a fixed beta. The controller's value is state: it goes into every checkpoint so that a resumed run
continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

ERROR_CLIP = 0.2  # Ziegler et al.: the proportional error is clipped to [-0.2, 0.2]


class KLController:
    """beta for the next rollout; `target = 0` keeps it fixed at `initial`."""

    def __init__(self, initial: float, target: float = 0.0, horizon: float = 10.0):
        self.initial = self.value = float(initial)
        self.target = float(target)
        self.horizon = float(horizon)

    @property
    def adaptive(self) -> bool:
        return self.target > 0 and self.value > 0

    def update(self, kl: float, updates: int = 1) -> float:
        """Adapt beta to the KL measured on the last rollout; returns the new beta."""
        if self.adaptive and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
            self.value = max(self.initial, self.value * (1.0 + error * updates / self.horizon))
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.value = float(state["value"])
