"""Policy update methods: each takes one rollout and changes the policy adapter (docs/method.md sections 2-3)."""

from __future__ import annotations

from typing import Any, Protocol

from engine.recipe import GROUP_METHODS
from engine.training.methods.context import MethodContext
from engine.training.rollout import Rollout


class PolicyUpdate(Protocol):
    """One way to turn a rollout into a change of the policy adapter."""

    name: str

    def update(self, rollout: Rollout, *, update_index: int, step_in_iteration: int) -> dict[str, float]:
        """Change the policy adapter in place; return the update's metrics."""

    def end_iteration(self, iteration: int) -> dict[str, float]:
        """The method's metrics over the iteration just ended (may warn); {} when it has none."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_update(method: str, context: MethodContext) -> PolicyUpdate:
    """The update step of `method` for this run."""
    if method == "rloo":
        from engine.training.methods.rloo import RLOOUpdate

        return RLOOUpdate(context)
    if method in GROUP_METHODS:
        from engine.training.methods.group import GroupUpdate

        return GroupUpdate(context, method)
    if method == "ppo":
        from engine.training.methods.ppo import PPOUpdate

        return PPOUpdate(context)
    if method == "online_dpo":
        from engine.training.methods.online_dpo import OnlineDPOUpdate

        return OnlineDPOUpdate(context)
    if method in ("mezo", "zopro"):
        from engine.training.methods.zeroth_order import RunDirections, ZerothOrderUpdate

        return ZerothOrderUpdate(context, method, RunDirections.for_run(context, method))
    raise ValueError(f"unknown policy method {method!r}")
