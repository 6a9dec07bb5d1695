"""The words every reader uses for a run's position and scores, so that the headless lines, `zopro ls/status`,
the tables and the TUI say the same thing.

Iterations: the files count from 0 (the `iteration` field of events, status.json and checkpoints
`iter-0000`); people read them from 1, as `iteration 1/4` (`it 1/4` where space is short). Every text a
user reads goes through `iteration_text` or `short_iteration`.

Reward: two different quantities share the word. `RM score` is the policy's score under the reward model
as it is now; the reward model is refined every iteration, so this score moves with the ruler as well as
with the policy and is not comparable across iterations. `fixed-RM score` is the score under the reward
model as it was after the reward stage (before any refinement): the one to compare across iterations.
"""

from __future__ import annotations

STAGE_TITLES = {
    "sft": "supervised fine-tuning",
    "reward": "reward model (Bradley-Terry)",
    "policy": "policy optimisation",
    "refine": "judge and refine the reward model",
    "eval": "held-out evaluation",
}
ITERATION_STAGES = ("policy", "refine", "eval")

RM_SCORE = "RM score"  # under the current (refined) reward model
FIXED_RM_SCORE = "fixed-RM score"  # under the reward model of the reward stage, never refined
FIXED_RM_METRIC = "eval/reward_initial"
RM_NOTE = (
    "RM score: under the current reward model, which is refined every iteration (not comparable across "
    "iterations); fixed-RM: under the reward model before any refinement"
)


def iteration_text(iteration: int | None, iterations: int | None = None) -> str:
    """`iteration 2/4` for the file's iteration 1 of 4 (`iteration 2` without a total)."""
    if iteration is None:
        return ""
    return f"iteration {iteration + 1}" + (f"/{iterations}" if iterations else "")


def short_iteration(iteration: int | None, iterations: int | None = None) -> str:
    """`it 2/4`: the same count as `iteration_text`, for tables and the header."""
    if iteration is None:
        return ""
    return f"it {iteration + 1}" + (f"/{iterations}" if iterations else "")


def stage_message(stage: str, iteration: int | None, iterations: int | None = None) -> str:
    """What a stage_start says: `iteration 2/4: policy optimisation`, or the stage's title before the loop."""
    title = STAGE_TITLES.get(stage, stage)
    if stage in ITERATION_STAGES and iteration is not None:
        return f"{iteration_text(iteration, iterations)}: {title}"
    return title


def plural(count: int, word: str) -> str:
    """`1 iteration`, `4 iterations`."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def checkpoint_phrase(name: str | None) -> str:
    """A checkpoint folder's name as words: `resume` is the one written on a stop, pause or request."""
    if not name:
        return "no checkpoint"
    if name == "resume":
        return "the checkpoint written when it stopped"
    if name == "sft":
        return "the checkpoint after supervised fine-tuning"
    if name == "reward":
        return "the checkpoint after the reward model"
    if name.startswith("iter-") and name[5:].isdigit():
        return f"the checkpoint after {iteration_text(int(name[5:]))}"
    return f"checkpoint {name}"
