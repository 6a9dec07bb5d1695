"""The interplay tracker's metric names and what each means (engine.analysis.interplay emits them)."""

from __future__ import annotations

# What each emitted metric means; per-layer ones appear as interplay/<layer>/<name>, e.g. interplay/layer.0/...
ITERATION_METRICS: dict[str, str] = {
    "interplay/policy_update_norm": "|dP|, the L2 norm of the policy adapter's change over the iteration",
    "interplay/reward_update_norm": "|dR|, the L2 norm of the reward adapter's change over the iteration",
    "interplay/cos_policy_reward": "cos(dP, dR); 0 when either update is zero",
    "interplay/angle_policy_reward_deg": "angle between dP and dR in degrees (90 when either is zero)",
    "interplay/pearson_policy_reward": "Pearson correlation of dP and dR over all coordinates",
    "interplay/dcor_policy_reward": "distance correlation of dP and dR on a fixed random sketch of coordinates",
    "interplay/cos_policy_successive": "cos(dP_i, dP_{i-1}); from the second iteration",
    "interplay/angle_policy_successive_deg": "angle between successive policy updates, degrees",
    "interplay/cos_reward_successive": "cos(dR_i, dR_{i-1}); from the second iteration",
    "interplay/angle_reward_successive_deg": "angle between successive reward updates, degrees",
    "interplay/cos_velocity": "cos(dP_i - dP_{i-1}, dR_i - dR_{i-1}); from the second iteration",
    "interplay/angle_velocity_deg": "angle between the policy's and the reward's velocity, degrees",
    "interplay/pearson_velocity": "Pearson correlation of the policy's and the reward's velocity",
    "interplay/traj_policy_x": "policy displacement since start, fixed random 2-D projection, x",
    "interplay/traj_policy_y": "policy displacement since start, fixed random 2-D projection, y",
    "interplay/traj_reward_x": "reward displacement since start, fixed random 2-D projection, x",
    "interplay/traj_reward_y": "reward displacement since start, fixed random 2-D projection, y",
    "interplay/policy_steps": "policy steps observed in the iteration (when any were)",
    "interplay/policy_path_length": "sum of the observed steps' norms (when steps were observed)",
    "interplay/policy_path_efficiency": "|dP| / path length: 1 for a straight path, near 0 for a random walk",
}
LAYER_METRICS: tuple[str, ...] = (
    "policy_update_norm",
    "reward_update_norm",
    "cos_policy_reward",
    "angle_policy_reward_deg",
    "pearson_policy_reward",
    "cos_policy_successive",
    "cos_reward_successive",
)
STEP_METRICS: dict[str, str] = {
    "interplay/step_policy_update_norm": "norm of this policy step's update",
    "interplay/step_cos_policy_successive": "cos(this step's update, the previous step's), within an iteration",
    "interplay/step_cos_prev_policy_update": "cos(this step's update, the previous iteration's dP)",
    "interplay/step_cos_prev_reward_update": "cos(this step's update, the previous iteration's dR)",
}
