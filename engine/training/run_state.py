"""What passes between the stages of a run, in one typed state: the loop position (stage, iteration, steps),
what one stage leaves for the next (this iteration's rollouts for the judge, the judged pairs for the
refinement, the reward model before refinement for keep-close, the initial reward model for win rates,
the evaluation history) and the run's counts. A checkpoint saves it: the plain fields as state.json, the
tensor fields beside the optimisers in trainer_state.pt."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

STATUS_WARNINGS = 20  # status.json keeps the last this many warnings
STAGE_NAMES = frozenset({"sft", "reward", "policy", "refine", "eval", "done"})  # the loop picks the order
TENSORS = {"tensors": True}  # a field saved in trainer_state.pt, not in state.json


@dataclass
class RunState:
    """The loop position and what passes between stages."""

    stage: str = "sft"
    iteration: int = 0
    step: int = 0
    global_step: int = 0
    policy_updates: int = 0
    elapsed: float = 0.0
    paused_s: float = 0.0  # of `elapsed`, the time spent paused
    event_seq: int = 0
    rollouts: list[dict] = field(default_factory=list)  # this iteration's (prompt, response, score)
    judged_pairs: list[dict] | None = None
    judge_stats: dict[str, int] = field(default_factory=dict)
    sft_eval_answers: list[tuple[str, bool]] = field(default_factory=list)  # (answer, finished)
    history: list[dict] = field(default_factory=list)  # one row per evaluation (sft baseline, iterations)
    counters: dict = field(default_factory=dict)
    latest: dict[str, float] = field(default_factory=dict)
    warnings: list[dict] = field(default_factory=list)  # the last STATUS_WARNINGS warnings
    warning_count: int = 0
    world_size: int = 1  # how many ranks trained up to this point
    # the reward model right after its training: the fixed judge of win rates when there is no gold
    reward_initial: dict[str, torch.Tensor] | None = field(default=None, metadata=TENSORS)
    # the reward model before this iteration's refinement, for keep-close (refine.keep_close_alpha)
    reward_before_refine: dict[str, torch.Tensor] | None = field(default=None, metadata=TENSORS)

    def plain(self) -> dict[str, Any]:
        """The fields state.json holds (everything but the tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("tensors")}

    def next_iteration(self) -> None:
        """Forget this iteration's rollouts, judged pairs and reward snapshot; count on."""
        self.rollouts = []
        self.judged_pairs = None
        self.judge_stats = {}
        self.reward_before_refine = None
        self.iteration += 1


def run_state(data: Any) -> RunState:
    """A RunState from checkpoint JSON, or TypeError/ValueError when the JSON is not one."""
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    tensors = sorted(f.name for f in fields(RunState) if f.metadata.get("tensors"))
    if any(name in data for name in tensors):
        raise ValueError(f"state.json holds {', '.join(tensors)}, which live in trainer_state.pt")
    state = RunState(**data)
    if state.stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage {state.stage!r}")
    for name in ("iteration", "step", "global_step", "policy_updates", "event_seq"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} is not a count: {value!r}")
    if not isinstance(state.elapsed, (int, float)) or not isinstance(state.counters, dict):
        raise ValueError("elapsed or counters has the wrong type")
    return state
