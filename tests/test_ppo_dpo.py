"""PPO (value head, token-level GAE) and online DPO: the math on hand-computed examples, then real runs
through the command line: their metrics, an exact resume, and a rising held-out gold score."""

from __future__ import annotations

import math

import pytest
import torch

from engine.rundir.reader import read_events
from engine.training.methods.online_dpo import dpo_loss, preference_pairs
from engine.training.methods.ppo import gae, masked_whiten, token_rewards
from engine.training.rollout import whiten
from tests.conftest import FAST_RECIPE, zopro
from tests.runs import adapters, assert_resume_after_sigterm_is_exact, finished_run

# --- GAE and token rewards ----------------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_example_and_ignores_padding():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.4, 9.0]])  # 9.0 sits on padding: it must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, backwards: delta_2 = 2 - 0.2 = 1.8             A_2 = 1.8
    #                   delta_1 = 0 + 0.9 * 0.2 - 1 = -0.82  A_1 = -0.82 + 0.45 * 1.8 = -0.01
    #                   delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4    A_0 = 1.4 + 0.45 * -0.01 = 1.3955
    # row 1: the last real token has no successor:  delta_1 = 1 - 0.4 = 0.6   A_1 = 0.6
    #                   delta_0 = 0.5 + 0.9 * 0.4 - 0.3 = 0.56                 A_0 = 0.56 + 0.45 * 0.6 = 0.83
    expected = torch.tensor([[1.3955, -0.01, 1.8], [0.83, 0.6, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, expected + torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.4, 0.0]]), atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    advantages, returns = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[1.2, 1.1, 1.3, 1.0]])
    assert torch.allclose(returns, to_go, atol=1e-6)
    assert torch.allclose(advantages, to_go - values, atol=1e-6)


def test_token_rewards_are_the_kl_penalty_plus_the_score_on_the_last_response_token():
    old = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.5], [-0.5, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), old, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.1, 2.0], [0.0, -0.1 - 1.0, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_whitening_uses_response_tokens_only():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    whitened = masked_whiten(values, mask)
    assert whitened[0, 3] == 0.0
    assert torch.allclose(whitened[0, :3], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5), atol=1e-4)


def test_whitening_over_ranks_takes_the_moments_of_every_ranks_entries():
    """Two ranks' halves whitened with the moments summed over both equal the whole batch whitened."""
    values = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    halves = [(values[:2], mask[:2]), (values[2:], mask[2:])]

    def sums_of(moments):  # what all-reducing each rank's [sum, sum of squares, count] gives
        return lambda local: [sum(float(m[i]) for m in moments) for i in range(3)]

    masked = [((v.double() * m).sum(), ((v.double() * m) ** 2).sum(), m.sum()) for v, m in halves]
    whole = masked_whiten(values, mask)
    split = torch.cat([masked_whiten(v, m, sums=sums_of(masked)) for v, m in halves])
    assert torch.allclose(split, whole, atol=1e-5)
    flat = values.reshape(-1)
    plain = [(h.double().sum(), (h.double() ** 2).sum(), h.numel()) for h in (flat[:12], flat[12:])]
    split = torch.cat([whiten(h, sums=sums_of(plain)) for h in (flat[:12], flat[12:])])
    assert torch.allclose(split, whiten(flat), atol=1e-5)


# --- DPO ----------------------------------------------------------------------------------------------------


def test_dpo_loss_on_constructed_logprobs():
    policy_chosen = torch.tensor([-10.0, -4.0], requires_grad=True)
    policy_rejected = torch.tensor([-12.0, -3.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1
    )
    # pair 0: beta * ((-10 + 11) - (-12 + 11)) = 0.2;  pair 1: beta * (0 - 1) = -0.1
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.1))) / 2
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(chosen_rewards - rejected_rewards, torch.tensor([0.2, -0.1]), atol=1e-6)
    loss.backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # raise chosen, lower rejected
    # the policy equal to the reference: log 2, whatever the beta
    same = torch.tensor([-5.0])
    assert float(dpo_loss(same, same, same, same, beta=3.0)[0]) == pytest.approx(math.log(2))


def test_pairs_come_from_the_first_two_answers_ranked_by_score_and_ties_are_skipped():
    # three prompts x k = 3 answers (prompt-major); the third answer of each prompt is never used
    scores = torch.tensor([0.1, 0.5, 9.0, 0.7, 0.7, 9.0, 2.0, -1.0, 9.0])
    chosen, rejected = preference_pairs(scores, k=3)
    assert chosen.tolist() == [1, 6] and rejected.tolist() == [0, 7]


# --- real runs ----------------------------------------------------------------------------------------------

PPO_RECIPE = (
    FAST_RECIPE
    + """
[policy]
method = "ppo"

[ppo]
epochs = 2
minibatches = 2
"""
)
DPO_RECIPE = (
    FAST_RECIPE
    + """
[policy]
method = "online_dpo"
"""
)


def policy_metrics(run) -> list[dict]:
    return [
        e["metrics"] | {"iteration": e["iteration"]}
        for e in read_events(run)
        if e["type"] == "metrics" and e["stage"] == "policy"
    ]


def consecutive(steps: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of successive policy updates inside one iteration (nothing else runs between them)."""
    return [(a, b) for a, b in zip(steps, steps[1:], strict=False) if a["iteration"] == b["iteration"]]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("ppo"), "ppo", PPO_RECIPE)


def test_ppo_run_reports_its_metrics_and_counts_its_passes(ppo_run):
    _, run = ppo_run
    steps = policy_metrics(run)
    assert len(steps) == 2 * 4
    for m in steps:
        for key in (
            "loss/policy",
            "loss/value",
            "policy/clipfrac",
            "policy/approxkl",
            "policy/grad_norm",
            "policy/lr",
            "value/mean",
            "value/explained_variance",
        ):
            assert math.isfinite(m[key]), key
        assert 0.0 <= m["policy/clipfrac"] <= 1.0
    assert steps[0]["value/mean"] == 0.0  # the value head starts at zero
    assert any(m["value/mean"] != 0.0 for m in steps[1:])  # and learns
    # per update: the rollout's 3 forwards (the sampler gives the old log-probs), 1 for the old values,
    # then 2 epochs x 2 minibatches
    for before, after in consecutive(steps):
        assert after["compute/forward_passes"] - before["compute/forward_passes"] == 3 + 1 + 4
        assert after["compute/backward_passes"] - before["compute/backward_passes"] == 4
    policy = adapters(run, "iter-0001")
    assert any(
        not torch.equal(policy[k], policy[k.replace("policy/", "sft/")])
        for k in policy
        if k.startswith("policy/")
    )


def test_resumed_ppo_run_equals_an_uninterrupted_one(ppo_run, tmp_path):
    """The value head and the optimiser are part of the checkpoint: a resume mid-iteration is exact."""
    recipe, straight = ppo_run
    assert_resume_after_sigterm_is_exact(
        recipe, straight, tmp_path / "interrupted", at_step=12 + 12 + 4 + 4 + 2
    )


def test_online_dpo_run_reports_its_metrics(tmp_path):
    recipe = tmp_path / "dpo.toml"
    recipe.write_text(DPO_RECIPE)
    result = zopro("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    steps = policy_metrics(tmp_path / "run")
    assert len(steps) == 2 * 4
    # the first step starts from the reference itself: the loss is exactly log 2, no margin yet
    assert steps[0]["loss/policy"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-6)
    for m in steps:
        assert 0 <= m["dpo/pairs"] <= 4  # prompts_per_update = 4: at most one pair each
        if m["dpo/pairs"]:
            for key in ("loss/policy", "dpo/reward_margin", "dpo/accuracy", "policy/grad_norm", "policy/lr"):
                assert math.isfinite(m[key]), key
    # per update with pairs: the rollout's 3 forwards (the sampler gives the old log-probs) and one on the pairs
    for before, after in consecutive(steps):
        if after["dpo/pairs"]:
            assert after["compute/forward_passes"] - before["compute/forward_passes"] == 4


# A run big enough to learn in under a minute on two cores (nano model; a reward model that ranks ~90 % of
# held-out pairs right; 3 iterations x 15 updates of 8 prompts x 4 answers; lr 1e-3 as rloo in tiny.toml).
# Measured (seed 0): SFT gold 0.325 -> ppo 0.492, online_dpo 0.442.
LEARNING_RECIPE = """
name = "learn"
seed = 0
threads = 1

[model]
base = "builtin:nano"
lora_rank = 8
lora_alpha = 16
max_prompt_tokens = 16
max_new_tokens = 16

[task]
train_prompts = 256
eval_prompts = 64
sft_examples = 1024
preference_pairs = 1024

[sft]
steps = 100
batch_size = 32
lr = 3e-3

[reward]
steps = 200
batch_size = 32
lr = 3e-3

[policy]
method = "METHOD"
kl_coef = 0.1
missing_eos_penalty = 1.0

[train]
iterations = 4
updates_per_iteration = 15
prompts_per_update = 8
samples_per_prompt = 4

[refine]
epochs = 1

[METHOD]
lr = 1e-3
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "online_dpo"])
def test_method_improves_the_held_out_gold_score(tmp_path, method):
    recipe = tmp_path / "learn.toml"
    recipe.write_text(LEARNING_RECIPE.replace("METHOD", method))
    run = tmp_path / "run"
    result = zopro("run", str(recipe), "--run-dir", str(run), timeout=900)
    assert result.returncode == 0, result.stderr
    evals = [e["metrics"] for e in read_events(run) if e["type"] == "eval"]
    assert len(evals) == 1 + 4
    # one seed of an RL run: the method must lift gold well above SFT at some iteration and still end above
    # it. Float rounding alone moves a trajectory (the reward model's losses part in the fifth decimal by
    # step 70): with three iterations this seed passed at 0ab294f and not at 13b39e9, for both methods. With
    # four, seeds 0-2 gave gold peaks +.097 / +.129 / +.123 (PPO) and +.112 / +.115 / +.054 (online DPO, whose
    # seed 2 then fell below SFT in iteration 4; `zopro run` of this recipe with `--set seed=S`, 2026-12-07).
    gold = [e["eval/gold"] for e in evals]
    assert max(gold[1:]) > gold[0] + 0.06 and gold[-1] > gold[0], gold
    assert max(e["eval/win_rate_vs_sft"] for e in evals[1:]) > 0.58
