"""Which metrics each panel draws, with their labels and what a chart says while it waits for them."""

from __future__ import annotations

from dataclasses import dataclass

from engine.recipe import FIRST_ORDER_METHODS


@dataclass(frozen=True)
class ChartSpec:
    """One chart: a title, the metrics it overlays (name, legend label) and its waiting message."""

    title: str
    metrics: tuple[tuple[str, str], ...]
    waiting: str
    stages: tuple[str, ...] = ()  # while one of these stages runs, this chart goes first in its panel


@dataclass(frozen=True)
class TrajectorySpec:
    """A 2-D path: pairs of metrics (x name, y name, label) logged in the same events."""

    title: str
    paths: tuple[tuple[str, str, str], ...]
    waiting: str


REWARD_CHARTS = (
    ChartSpec(
        "reward-model score",
        (
            ("objective/scores", "RM"),
            ("objective/rlhf_reward", "rlhf"),
            ("eval/reward", "held-out"),
            ("eval/reward_initial", "fixed RM"),  # the same answers under the never-refined reward model
        ),
        "waiting for objective/scores: the first policy update",
    ),
    ChartSpec(
        "gold score",
        (("objective/gold", "rollouts"), ("eval/gold", "held-out")),
        "waiting for objective/gold or eval/gold: the first update or evaluation",
    ),
    ChartSpec(
        "win rate vs SFT",
        (("eval/win_rate_vs_sft", "win rate"),),
        "waiting for eval/win_rate_vs_sft: the first held-out evaluation",
    ),
    ChartSpec(
        "KL to SFT",
        (("objective/kl", "KL"), ("eval/kl", "held-out")),
        "waiting for objective/kl: the first policy update",
    ),
)

# The stages before and between the policy updates, each drawn first while it runs (then after the rest).
STAGE_CHARTS = (
    ChartSpec(
        "SFT loss",
        (("loss/sft", "loss"),),
        "waiting for loss/sft: the first SFT step",
        stages=("sft",),
    ),
    ChartSpec(
        "reward model: loss, accuracy",
        (("loss/reward", "loss"), ("reward/accuracy", "train acc"), ("reward/eval_accuracy", "held-out acc")),
        "waiting for loss/reward and reward/accuracy: the reward model's first step",
        stages=("reward",),
    ),
    ChartSpec(
        "reward refinement: loss, accuracy, judge agreement",
        (
            ("loss/reward_refine", "loss"),
            ("reward/refine_accuracy", "acc"),
            ("judge/agreement_with_gold", "judge agrees"),
        ),
        "waiting for loss/reward_refine: the first refinement of the reward model",
        stages=("refine",),
    ),
)
# The group methods (grpo, dr_grpo, dapo, reinforce_pp), under TRL GRPOTrainer's names; a policy-stage chart,
# so that a run of another method never lays it out (it never has data there).
GROUP_CHARTS = (
    ChartSpec(
        "reward spread, clipped ratios",
        (
            ("reward_std", "reward std"),
            ("frac_reward_zero_std", "zero-std groups"),
            ("clip_ratio/low_mean", "clip low"),
            ("clip_ratio/high_mean", "clip high"),
        ),
        "waiting for reward_std and clip_ratio/*: logged by grpo, dr_grpo, dapo and reinforce_pp at each update",
        stages=("policy",),
    ),
)
CURVE_CHARTS = REWARD_CHARTS + STAGE_CHARTS + GROUP_CHARTS

INTERPLAY_CHARTS = (
    ChartSpec(
        "angle policy-reward (deg)",
        (("interplay/angle_policy_reward_deg", "angle(dP, dR)"),),
        "waiting for interplay/angle_policy_reward_deg: logged at the end of each iteration",
    ),
    ChartSpec(
        "cosines",
        (
            ("interplay/cos_policy_reward", "cos(dP,dR)"),
            ("interplay/cos_policy_successive", "cos(dP,dP-)"),
            ("interplay/cos_reward_successive", "cos(dR,dR-)"),
        ),
        "waiting for interplay/cos_*: logged at the end of each iteration",
    ),
    ChartSpec(
        "update norms",
        (("interplay/policy_update_norm", "|dP|"), ("interplay/reward_update_norm", "|dR|")),
        "waiting for interplay/*_update_norm: logged at the end of each iteration",
    ),
)
TRAJECTORY = TrajectorySpec(
    "trajectory (2-D projection)",
    (
        ("interplay/traj_policy_x", "interplay/traj_policy_y", "policy"),
        ("interplay/traj_reward_x", "interplay/traj_reward_y", "reward"),
    ),
    "waiting for interplay/traj_*: logged at the end of each iteration",
)

# In order of what a user asks first when space is short; charts with data go before those still waiting.
ZO_CHARTS = (
    ChartSpec(
        "premise: gold along mu",
        (("premise/gold_minus", "gold -mu"), ("premise/gold_0", "gold 0"), ("premise/gold_plus", "gold +mu")),
        "waiting for premise/gold_*: zopro's premise check, gold at theta -/+ mu at the start of each "
        "iteration after the first",
    ),
    ChartSpec(
        "projected gradient g",
        (("zo/g", "g"), ("zo/abs_g", "|g|")),
        "waiting for zo/g: the first zeroth-order update",
    ),
    ChartSpec(
        "premise: cos(descent, mu)",
        (("premise/cos_descent_mu", "cos(-grad,mu)"), ("premise/subspace_capture", "capture")),
        "waiting for premise/cos_descent_mu (> 0: mu points downhill) and premise/subspace_capture (the "
        "gradient's share in the subspace basis): zopro.premise_gradient_batches > 0",
    ),
    ChartSpec(
        "step |dtheta|",
        (("zo/step_norm", "|dtheta|"),),
        "waiting for zo/step_norm: the first zeroth-order update",
    ),
    ChartSpec(
        "g normalisation",
        (("zo/g_raw", "g raw"), ("zo/g_rms", "running RMS")),
        "waiting for zo/g_raw and zo/g_rms (0 unless normalize_g): the first zeroth-order update",
    ),
    ChartSpec(
        "direction |z|",  # its own chart: |z| is O(1..sqrt(d)), a step O(lr)
        (("zo/z_norm", "|z|"),),
        "waiting for zo/z_norm: the first zeroth-order update",
    ),
    ChartSpec("decay", (("zo/decay", "decay"),), "waiting for zo/decay: ZOPrO's mixing of mu and v"),
    ChartSpec(
        "direction composition",
        (("zo/cos_z_mu", "cos(z,mu)"), ("zo/cos_z_v", "cos(z,v)")),
        "waiting for zo/cos_z_mu and zo/cos_z_v",
    ),
    ChartSpec("skipped updates", (("zo/skipped", "skipped"),), "waiting for zo/skipped: non-finite g guard"),
    ChartSpec(
        "premise: RM score along mu",
        (("premise/reward_minus", "RM -mu"), ("premise/reward_0", "RM 0"), ("premise/reward_plus", "RM +mu")),
        "waiting for premise/reward_*: zopro's premise check, RM score at theta -/+ mu",
    ),
)

INTERPLAY_WAITING = (
    "waiting for the policy-reward interplay (interplay/cos_policy_reward, angle, update norms, trajectory): "
    "logged at the end of each iteration, once the policy and the reward model have both moved"
)
ZO_WAITING = (
    "waiting for the zeroth-order diagnostics (zo/g, zo/step_norm, zo/decay, zo/cos_z_mu, ...): logged at every "
    "zeroth-order update; zopro's premise check (premise/*) at the start of each iteration after the first"
)

COMPARE_CHARTS = (
    ChartSpec("reward-model score", (("objective/scores", ""),), "no run has objective/scores yet"),
    ChartSpec("gold score (held-out)", (("eval/gold", ""),), "no run has eval/gold yet"),
    ChartSpec("win rate vs SFT", (("eval/win_rate_vs_sft", ""),), "no run has eval/win_rate_vs_sft yet"),
    ChartSpec("KL to SFT", (("objective/kl", ""),), "no run has objective/kl yet"),
)

_CHART_NAMES = {
    name
    for specs in (REWARD_CHARTS, STAGE_CHARTS, GROUP_CHARTS, INTERPLAY_CHARTS, ZO_CHARTS, COMPARE_CHARTS)
    for spec in specs
    for name, _ in spec.metrics
} | {name for x, y, _ in TRAJECTORY.paths for name in (x, y)}


def wanted_metric(name: str) -> bool:
    """The metrics a screen keeps as full series: those its charts draw with their standard errors (`_se`),
    every zo/ diagnostic and every premise/ check."""
    if name in _CHART_NAMES or (name.endswith("_se") and name[: -len("_se")] in _CHART_NAMES):
        return True
    return name.count("/") == 1 and name.startswith(("zo/", "premise/"))


def is_zeroth_order(method: str) -> bool:
    """A zeroth-order method (mezo, zopro, or one added later); the first-order ones are known by name."""
    return method not in FIRST_ORDER_METHODS and method not in ("?", "")
