"""What a policy-update method is handed: the models, the counters, the recipe, where the run stands, and
the few services of the run it may call. A method never imports the loop; the loop builds this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.recipe import Recipe
from engine.training.adapter_history import AdapterHistory
from engine.training.distributed import Distributed
from engine.training.models import PreferenceModel
from engine.training.rollout import Rollout
from engine.training.telemetry import Counters


@dataclass
class MethodContext:
    """The run as a policy-update method sees it."""

    models: PreferenceModel
    counters: Counters
    recipe: Recipe
    # where the run stands: the current iteration (the loop position, read at each call)
    current_iteration: Callable[[], int]
    # a `warning` event (code, message, fields), kept in status.json too
    warn: Callable[..., Any]
    # a quick probe: mean reward-model score (and gold) of one fresh answer on each of the first
    # `count` held-out prompts from the active adapter, on the generator of (*where, count=N)
    score_policy: Callable[..., dict[str, float]]
    # a rollout on this iteration's training prompts drawn from `where` (diagnostics)
    fresh_rollout: Callable[[tuple], Rollout]
    # the adapters at the last two iteration boundaries (-1: after the reward model), kept by the run for
    # ZOPrO, which reads the policy's and the reward model's last changes (mu and v) from it
    adapter_history: AdapterHistory | None = None
    # this rank among the run's ranks: gradients (first order) and g (zeroth order) are averaged over them
    dist: Distributed = field(default_factory=Distributed)

    @property
    def iteration(self) -> int:
        return self.current_iteration()
