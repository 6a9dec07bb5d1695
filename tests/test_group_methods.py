"""GRPO, Dr. GRPO, DAPO and REINFORCE++ as presets of one update (issue 26): each preset's advantages and
loss against a hand computation on two prompts x three answers, GRPO's identity with RLOO, DAPO's refill
of a batch with real rollouts, real runs through the command line (TRL's metric names, an exact resume
with several updates per rollout), and a bad combination of switches in one sentence."""

from __future__ import annotations

import math

import pytest
import torch

from engine.mirror import trl_name
from engine.recipe import RecipeError, recipe_from_dict
from engine.rundir.reader import read_events
from engine.training.dynamic_sampling import refill
from engine.training.methods import make_update
from engine.training.methods.context import MethodContext
from engine.training.methods.group import group_advantages, group_loss, policy_rewards
from engine.training.objectives import clipped_surrogate
from engine.training.rollout import collect_rollout, token_logprobs
from engine.training.telemetry import Counters
from tests.conftest import FAST_RECIPE, zopro
from tests.nano import nano_preference_model
from tests.runs import assert_resume_after_sigterm_is_exact, finished_run

PRESETS = ("grpo", "dr_grpo", "dapo", "reinforce_pp")
REWARDS = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # prompt 0: answers 0-2, prompt 1: answers 3-5


def switches(method: str, **settings):
    return getattr(recipe_from_dict({"policy": {"method": method}, method: settings}), method)


# --- advantages ---------------------------------------------------------------------------------------------


def test_each_presets_advantages_equal_a_hand_computation():
    # group means 3 and 1; unbiased group stds sqrt(14 / 2) = sqrt 7 and sqrt(6 / 2) = sqrt 3
    centred = [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]
    stds = [math.sqrt(7)] * 3 + [math.sqrt(3)] * 3
    grpo = [a / (s + 1e-4) for a, s in zip(centred, stds, strict=True)]
    # REINFORCE++: no baseline, whitened over the batch: mean 2, unbiased variance 26 / 5
    reinforce = [(r - 2.0) / (math.sqrt(26 / 5) + 1e-8) for r in REWARDS.tolist()]
    expected = {"grpo": grpo, "dr_grpo": centred, "dapo": grpo, "reinforce_pp": reinforce}
    for method in PRESETS:
        c = switches(method)
        advantages = group_advantages(REWARDS, 3, c.baseline, c.scale)
        assert advantages.tolist() == pytest.approx(expected[method], abs=1e-6), method
    # leave-one-out: 1 - (2 + 6) / 2 = -3, ... = 3/2 x the group-mean advantage (G / (G - 1))
    loo = group_advantages(REWARDS, 3, "leave_one_out", "none")
    assert loo.tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0], abs=1e-6)


# --- the loss -----------------------------------------------------------------------------------------------

MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
OLD = torch.tensor(
    [
        [-1.0, -2.0, -0.5],
        [-0.7, -1.2, 0.0],
        [-2.0, 0.0, 0.0],
        [-0.3, -0.9, -1.1],
        [-1.5, -0.4, 0.0],
        [-1.0, -1.0, -1.0],
    ]
)
# token log-ratios: inside the clip, above 1.2 but below 1.28 (exp .22), above 1.28 (exp .3), below .8 (exp -.3)
SHIFT = torch.tensor(
    [
        [0.0, 0.22, -0.3],
        [0.1, 0.3, 0.0],
        [-0.3, 0.0, 0.0],
        [0.22, 0.0, 0.05],
        [0.3, -0.1, 0.0],
        [-0.05, 0.22, 0.0],
    ]
)
NEW = (OLD + SHIFT) * MASK
REF = (OLD - 0.2 * torch.arange(1, 4).float()[None, :]) * MASK


def hand_loss(advantages, aggregation, eps_low, eps_high, beta, max_new_tokens):
    """Each formula of docs/method.md section 2b written out token by token in plain Python."""
    per_answer, token_sum, token_count = [], 0.0, 0
    for i in range(6):
        a = advantages[i]
        tokens = [t for t in range(3) if MASK[i, t]]
        k3 = [
            math.exp(REF[i, t] - NEW[i, t]) - (REF[i, t] - NEW[i, t]) - 1 for t in tokens
        ]  # Schulman's k3 per token
        if aggregation == "sequence":
            r = math.exp(sum(float(NEW[i, t] - OLD[i, t]) for t in tokens))
            per_answer.append(max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)) + beta * sum(k3))
            continue
        losses = []
        for t, kl in zip(tokens, k3, strict=True):
            r = math.exp(float(NEW[i, t] - OLD[i, t]))
            losses.append(max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)) + beta * kl)
        per_answer.append(sum(losses) / len(losses))
        token_sum += sum(losses)
        token_count += len(losses)
    if aggregation in ("sequence", "answer_token_mean"):
        return sum(per_answer) / 6
    if aggregation == "token_mean":
        return token_sum / token_count
    return token_sum / (6 * max_new_tokens)  # constant


@pytest.mark.parametrize("method", PRESETS)
def test_each_presets_loss_equals_a_hand_computation(method):
    c = switches(method)
    beta = 0.05 if c.kl_penalty == "loss" else 0.0  # policy.kl_coef, in the loss only for kl_penalty = loss
    advantages = group_advantages(REWARDS, 3, c.baseline, c.scale)
    loss, stats = group_loss(
        NEW, OLD, REF, MASK, advantages,
        aggregation=c.loss_aggregation, epsilon=c.epsilon, epsilon_high=c.epsilon_high,
        kl_coef=beta, max_new_tokens=4,
    )  # fmt: skip
    expected = hand_loss(advantages.tolist(), c.loss_aggregation, c.epsilon, c.epsilon_high, beta, 4)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert 0.0 < stats["clip_ratio/region_mean"] < 1.0


def test_clip_higher_keeps_ratios_between_1_2_and_1_28_unclipped():
    """DAPO's clip-higher: a token at ratio exp(.22) = 1.246 with A > 0 is clipped at 0.2, not at 0.28."""
    advantages = torch.ones(6)
    _, symmetric = group_loss(NEW, OLD, REF, MASK, advantages, aggregation="token_mean", epsilon=0.2,
                              epsilon_high=0.2, kl_coef=0.0, max_new_tokens=4)  # fmt: skip
    _, higher = group_loss(NEW, OLD, REF, MASK, advantages, aggregation="token_mean", epsilon=0.2,
                           epsilon_high=0.28, kl_coef=0.0, max_new_tokens=4)  # fmt: skip
    tokens = int(MASK.sum())
    assert symmetric["clip_ratio/high_mean"] == pytest.approx(5 / tokens)  # exp .22 x 3, exp .3 x 2
    assert higher["clip_ratio/high_mean"] == pytest.approx(2 / tokens)  # exp .3 only


def test_grpo_on_sequence_sums_without_std_or_kl_is_rloo_times_g_minus_1_over_g():
    """Loss: baseline group_mean, scale none, aggregation sequence, beta 0 = RLOO x (G - 1) / G exactly."""
    rloo, _ = clipped_surrogate(NEW, OLD, group_advantages(REWARDS, 3, "leave_one_out", "none"), 0.2)
    grpo, _ = group_loss(NEW, OLD, REF, MASK, group_advantages(REWARDS, 3, "group_mean", "none"),
                         aggregation="sequence", epsilon=0.2, epsilon_high=0.2, kl_coef=0.0,
                         max_new_tokens=4)  # fmt: skip
    assert float(grpo) == pytest.approx(float(rloo) * 2 / 3, abs=1e-6)


# --- the update on a real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pm(model_cache):
    # a policy apart from the reference, so the KL is not zero
    model, task = nano_preference_model(model_cache, ["q_proj", "v_proj", "lm_head"], moved=("policy",))
    model.prompts = task.prompts(8, "test")
    return model


def rollout_of(pm, prompts, seed, kl_coef=0.0):
    return collect_rollout(
        pm, prompts, k=3, kl_coef=kl_coef, missing_eos_penalty=0.0, max_new_tokens=8, max_prompt_tokens=16,
        temperature=1.0, generator=torch.Generator().manual_seed(seed), counters=Counters(),
    )  # fmt: skip


def method_update(pm, method: str, **settings):
    """(the policy update of `method` with these settings outside any run, its counters)."""
    recipe = recipe_from_dict({"policy": {"method": method}, **({method: settings} if settings else {})})

    def unavailable(*args):
        raise RuntimeError("no run")

    counters = Counters()
    context = MethodContext(
        models=pm, counters=counters, recipe=recipe, current_iteration=lambda: 0, warn=unavailable,
        score_policy=unavailable, fresh_rollout=unavailable,
    )  # fmt: skip
    return make_update(method, context), counters


def update_once(pm, method: str, rollout, **settings) -> tuple[dict[str, torch.Tensor], dict, Counters]:
    """The raw gradient (its on_gradient snapshot), the metrics and the counters of one update of `method`;
    the adapter is restored."""
    update, counters = method_update(pm, method, **settings)
    before = {n: p.detach().clone() for n, p in update.named_params.items()}
    seen = {}
    update.on_gradient = lambda grads: seen.update({n: g.detach().clone() for n, g in grads.items()})
    metrics = update.update(rollout, update_index=0, step_in_iteration=0)
    with torch.no_grad():
        for name, param in update.named_params.items():
            param.copy_(before[name])
    return seen, metrics, counters


def gradient_of(pm, method: str, rollout, **settings) -> dict[str, torch.Tensor]:
    return update_once(pm, method, rollout, **settings)[0]


def test_grpo_gradient_equals_rloos_times_g_minus_1_over_g_on_a_real_rollout(pm):
    rollout = rollout_of(pm, pm.prompts[:2], seed=0)  # two prompts x three answers, beta 0
    rloo = gradient_of(pm, "rloo", rollout)
    grpo = gradient_of(
        pm,
        "grpo",
        rollout,
        scale="none",
        loss_aggregation="sequence",
        kl_penalty="off",
        updates_per_rollout=1,
    )
    assert rloo.keys() == grpo.keys()
    assert any(float(g.abs().max()) > 0 for g in rloo.values())
    expected = torch.cat([rloo[n].reshape(-1) for n in rloo]) * 2 / 3
    got = torch.cat([grpo[n].reshape(-1) for n in rloo])
    # equal up to float32 rounding of two sums in another order: 1e-5 of the largest component
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0.0)
    # with GRPO's own switches (std, token means) the gradient is another one
    default = gradient_of(pm, "grpo", rollout)
    assert any(not torch.allclose(default[n], rloo[n] * 2 / 3, atol=1e-6) for n in rloo)


def test_dynamic_sampling_refills_the_batch_with_informative_groups_of_further_rollouts(pm):
    boring = set(pm.prompts[:3])  # these prompts' groups are made uniform: dropped and refilled

    def rewards_of(rollout):
        uniform = torch.tensor([p in boring for p in rollout.sequences.prompts])
        return torch.where(uniform, torch.zeros_like(rollout.scores), rollout.scores)

    first = rollout_of(pm, pm.prompts[:4], seed=0)  # 3 of its 4 groups are uniform
    draws = {1: rollout_of(pm, pm.prompts[1:3] + pm.prompts[4:6], seed=1)}  # 2 informative groups
    draws[2] = rollout_of(pm, pm.prompts[6:8] + pm.prompts[:2], seed=2)  # 2 more (one needed), 2 uniform
    refilled, metrics = refill(
        first, draws.__getitem__, rewards_of, max_refills=3, pad_id=pm.tokenizer.pad_token_id
    )
    seqs = refilled.sequences
    assert seqs.prompts == [
        p for p in [pm.prompts[3], pm.prompts[4], pm.prompts[5], pm.prompts[6]] for _ in range(3)
    ]
    assert metrics == {"sampling/refills": 2.0, "sampling/dropped_groups": 7.0, "sampling/kept_groups": 4.0}
    # rows re-padded into one batch keep their tokens and log-probs: a recomputation on it agrees
    with torch.no_grad(), pm.adapter("policy"):
        recomputed = token_logprobs(pm, seqs, Counters())
    torch.testing.assert_close(recomputed, refilled.old_logprobs, atol=1e-4, rtol=1e-4)
    assert seqs.responses[:3] == first.sequences.responses[9:12]
    assert refilled.scores[3:9].tolist() == draws[1].scores[6:12].tolist()
    # without refills left the batch keeps what it found
    short, metrics = refill(first, draws.__getitem__, rewards_of, max_refills=0, pad_id=0)
    assert short.sequences.prompts == [pm.prompts[3]] * 3 and metrics["sampling/refills"] == 0.0


def test_kl_in_the_reward_or_the_loss_is_the_switch_that_says_so(pm):
    rollout = rollout_of(pm, pm.prompts[:2], seed=0, kl_coef=0.1)
    assert float(rollout.kl.abs().sum()) > 0
    assert torch.equal(policy_rewards(rollout, "reward"), rollout.scores - 0.1 * rollout.kl)
    assert torch.equal(policy_rewards(rollout, "loss"), rollout.scores)


# --- runs through the command line --------------------------------------------------------------------------

TRL_METRICS = (
    "reward_std", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length",
    "completions/clipped_ratio", "entropy", "kl",
)  # fmt: skip
DAPO_RECIPE = FAST_RECIPE + '\n[policy]\nmethod = "dapo"\n\n[dapo]\nupdates_per_rollout = 2\n'


def policy_metrics(run):
    return [
        e["metrics"] for e in read_events(run) if e["type"] == "metrics" and "policy/update" in e["metrics"]
    ]


@pytest.fixture(scope="module")
def dapo_run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("dapo"), "dapo", DAPO_RECIPE)


def test_a_dapo_run_logs_trls_metric_names_and_two_updates_per_rollout(dapo_run):
    _, run = dapo_run
    steps = policy_metrics(run)
    assert len(steps) == 2 * 4
    for m in steps:
        for key in TRL_METRICS + ("loss/policy", "policy/grad_norm", "sampling/kept_groups"):
            assert math.isfinite(m[key]), key
        assert m["sampling/kept_groups"] == 4.0  # prompts_per_update: the batch is full
    for before, after in zip(steps[:3], steps[1:4], strict=True):  # within iteration 0 (no refinement)
        assert after["compute/backward_passes"] - before["compute/backward_passes"] == 2  # mu = 2
    assert trl_name("clip_ratio/high_mean") == "train/clip_ratio/high_mean"  # TRL's name in the mirrors
    from zopro_tui.catalogue import wanted_metric

    assert all(wanted_metric(name) for name in ("reward_std", "frac_reward_zero_std", "clip_ratio/low_mean"))


def test_a_resumed_dapo_run_with_two_updates_per_rollout_equals_an_uninterrupted_one(dapo_run, tmp_path):
    recipe, straight = dapo_run
    assert_resume_after_sigterm_is_exact(
        recipe, straight, tmp_path / "interrupted", at_step=12 + 12 + 4 + 4 + 2
    )


def test_a_bad_combination_of_switches_is_one_sentence(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(FAST_RECIPE + '\n[policy]\nmethod = "grpo"\n\n[grpo]\nbaseline = "none"\n')
    result = zopro("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "grpo.scale = 'group_std'" in lines[0] and "grpo.baseline = 'none'" in lines[0]
    assert "bad.toml" in lines[0]
    with pytest.raises(RecipeError, match="dapo.epsilon_high = 0.1 is below dapo.epsilon = 0.2"):
        recipe_from_dict({"policy": {"method": "dapo"}, "dapo": {"epsilon_high": 0.1}})
    with pytest.raises(RecipeError, match="scale = 'batch_std'"):
        recipe_from_dict({"policy": {"method": "grpo", "whiten_advantages": True}})


def test_compare_and_zopros_first_iteration_take_the_presets():
    recipe_from_dict({"policy": {"method": "rloo"}, "compare": {"methods": ["rloo", "grpo:lr=1e-3", "dapo"]},
                      "grpo": {"scale": "none"}})  # fmt: skip
    recipe = recipe_from_dict(
        {"policy": {"method": "zopro"}, "zopro": {"first_iteration": "dr_grpo", "sampler": "subspace"}}
    )
    assert recipe.zopro.first_iteration == "dr_grpo"
    with pytest.raises(RecipeError, match="first_iteration = 'rloo' or a group method"):
        recipe_from_dict(
            {"policy": {"method": "zopro"}, "zopro": {"first_iteration": "mezo", "sampler": "subspace"}}
        )


def test_a_sweep_over_the_presets_validates_each_point(tmp_path):
    from engine.jobs.sweep import SweepError, grid_points, parse_grid, validate_points

    recipe = tmp_path / "r.toml"
    recipe.write_text(FAST_RECIPE)
    points = grid_points(parse_grid(["policy.method=rloo,grpo,dr_grpo,dapo,reinforce_pp"]))
    assert validate_points(recipe, [], points) == "fast"
    bad = grid_points(parse_grid(["policy.method=dapo", "dapo.epsilon_high=0.3,0.1"]))
    with pytest.raises(SweepError, match="epsilon_high"):
        validate_points(recipe, [], bad)


def test_zopros_first_order_iteration_and_subspace_basis_can_come_from_grpo(tmp_path):
    recipe = (
        FAST_RECIPE
        + '\n[policy]\nmethod = "zopro"\n\n[zopro]\nfirst_iteration = "grpo"\nsampler = "subspace"\n'
    )
    _, run = finished_run(tmp_path, "zopro-grpo", recipe)
    steps = policy_metrics(run)
    first, later = steps[:4], steps[4:]
    assert all(m["zo/first_order"] == 1.0 and "reward_std" in m for m in first)  # GRPO's update and metrics
    assert [m["zo/basis_snapshots"] for m in first] == [1.0, 2.0, 3.0, 4.0]  # its gradients make the basis
    assert all(m["zo/first_order"] == 0.0 and math.isfinite(m["zo/g"]) for m in later)
