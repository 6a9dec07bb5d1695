"""Issue 16: the first-order baseline stays stable (adaptive KL, reward clipping, advantage whitening), runaway
training raises `warning` events that every view shows, and policy.max_kl stops or rolls back a run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.recipe import RecipeError, load_recipe
from engine.rundir.reader import read_events, run_info
from engine.training.kl_control import KLController
from engine.training.rollout import rloo_advantages, whiten
from engine.training.watchdog import check
from tests.conftest import FAST_RECIPE, REPO, zopro
from tests.runs import assert_resume_after_sigterm_is_exact

# held-out (gold, KL) per evaluation, SFT first: the seed-5 collapse of issue 16, and seed 7 of the same report
COLLAPSE = [(0.306, 0.0), (0.361, 0.3), (0.392, 0.6), (0.474, 0.91), (0.297, 14.4)]
HEALTHY = [(0.247, 0.0), (0.307, 0.30), (0.333, 0.67), (0.431, 1.13), (0.454, 3.71)]


def rows(points):
    return [{"eval/gold": g, "eval/kl": k} for g, k in points]


# -- the adaptive KL controller --------------------------------------------------------------------------------
def test_adaptive_kl_moves_beta_toward_the_target_by_at_most_the_clipped_error_per_horizon():
    controller = KLController(0.1, target=2.0, horizon=10)
    assert controller.update(8.0) == pytest.approx(0.1 * 1.02)  # error clipped to +0.2, / horizon 10
    assert controller.update(2.2) == pytest.approx(0.1 * 1.02 * 1.01)
    assert controller.update(1.8) == pytest.approx(0.1 * 1.02 * 1.01 * 0.99)
    for _ in range(100):
        controller.update(20.0)
    assert controller.value == pytest.approx(0.1 * 1.02 * 1.01 * 0.99 * 1.02**100)
    for _ in range(1000):  # under the target beta falls back, but never below kl_coef
        controller.update(0.0)
    assert controller.value == 0.1
    fixed = KLController(0.1, target=0.0)
    assert fixed.update(50.0) == 0.1 and not fixed.adaptive
    assert KLController(0.1, target=2.0).update(float("nan")) == 0.1  # a non-finite KL leaves beta alone
    moved = KLController(0.1, target=2.0)
    moved.update(9.0)
    restored = KLController(0.1, target=2.0)
    restored.load_state_dict(moved.state_dict())
    assert restored.value == moved.value == pytest.approx(0.102)


def test_whitened_advantages_have_mean_zero_and_unit_spread_and_a_flat_batch_stays_zero():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.5, 10.0, 12.0, -4.0, -4.5])
    advantages = whiten(rloo_advantages(rewards, 2))
    assert float(advantages.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(advantages.std()) == pytest.approx(1.0, abs=1e-5)
    # the order within each prompt is kept: whitening only rescales
    assert torch.equal(advantages > 0, rloo_advantages(rewards, 2) > 0)
    assert torch.equal(whiten(torch.zeros(6)), torch.zeros(6))


def test_new_policy_keys_have_defaults_and_bad_values_get_one_sentence(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny.toml")
    assert recipe.policy.kl_target > 0 and recipe.policy.max_kl == 0 and recipe.policy.max_kl_action == "stop"
    for override, says in (
        ("policy.kl_target=-1", "policy.kl_target = -1.0 is out of range; it must be >= 0"),
        ("policy.kl_horizon=0", "policy.kl_horizon = 0.0 is out of range; it must be > 0"),
        ("policy.max_kl_action=rewind", "choose one of stop, rollback"),
        ("policy.whiten_advantages=1", "policy.whiten_advantages must be true or false"),
        ("watchdog.gold_drop=-0.1", "watchdog.gold_drop = -0.1 is out of range"),
    ):
        with pytest.raises(RecipeError, match=None) as error:
            load_recipe(REPO / "recipes" / "tiny.toml", [override])
        assert says in str(error.value), str(error.value)


# -- the watchdog ------------------------------------------------------------------------------------------------
def test_watchdog_flags_the_seed_5_collapse_and_not_a_healthy_run():
    *history, latest = rows(COLLAPSE)
    codes = [w.code for w in check(latest, history)]
    assert codes == ["kl_jump", "gold_drop"]
    for i in range(1, len(HEALTHY)):
        assert check(rows(HEALTHY)[i], rows(HEALTHY)[:i]) == [], i
    for i in range(1, len(COLLAPSE) - 1):  # quiet until the last iteration
        assert check(rows(COLLAPSE)[i], rows(COLLAPSE)[:i]) == [], i


def test_watchdog_thresholds_switch_off_and_a_standard_error_widens_the_gold_check():
    *history, latest = rows(COLLAPSE)
    assert check(latest, history, kl_jump_factor=0, gold_drop=0) == []
    assert [w.code for w in check(latest, history, kl_jump_min=20)] == ["gold_drop"]
    noisy = {**latest, "eval/gold_se": 0.07}  # a drop of 0.177 is under 3 standard errors
    assert [w.code for w in check(noisy, history)] == ["kl_jump"]
    # without gold, the win rate against SFT is watched instead
    no_gold = [{"eval/win_rate_vs_sft": 0.7, "eval/kl": 1.0}]
    assert [w.code for w in check({"eval/win_rate_vs_sft": 0.4, "eval/kl": 1.5}, no_gold)] == ["gold_drop"]
    assert check({"eval/kl": math.nan}, history) == []


# -- end to end on the fast recipe ---------------------------------------------------------------------------
# The same failure as issue 16's seed 5 (KL to the reference explodes, gold falls) in seconds: 100 x the default
# rloo.lr (5e-4): Adam's clipped, constant-size steps carry the policy away within four updates.
RUNAWAY = ["--set", "rloo.lr=0.05"]


def test_max_kl_stop_warns_everywhere_and_exits_non_zero(tmp_path, fast_recipe):
    run = tmp_path / "runs" / "runaway"
    result = zopro("run", str(fast_recipe), "--run-dir", str(run), *RUNAWAY, "--set", "policy.max_kl=0.5")
    assert result.returncode == 1, result.stderr
    info = run_info(run)
    assert info.status == "stopped"
    codes = [w["code"] for w in info.warnings]
    # the runaway of issue 16 in seconds: held-out KL 0 -> ~18 nats and gold .175 -> .017 in iteration 0
    assert codes == ["kl_jump", "gold_drop", "max_kl"] and info.warning_count == 3
    warning_events = [e for e in read_events(run) if e["type"] == "warning"]
    assert [e["code"] for e in warning_events] == codes
    assert all(e["iteration"] == 0 and e["message"] for e in warning_events)
    assert "warning [max_kl] iteration 1" in result.stderr  # the file's iteration 0, read from 1
    assert "policy.max_kl = 0.5" in result.stderr
    assert "max_kl" in result.stdout  # the summary table's warnings column
    assert (run / "checkpoints" / "iter-0000").is_dir() and not (run / "checkpoints" / "iter-0001").exists()
    status = zopro("status", str(run))
    assert "warning" in status.stdout and "[max_kl] iteration 1" in status.stdout
    listing = zopro("ls", "--root", str(tmp_path / "runs"))
    assert f"!{info.warning_count}" in listing.stdout


def test_max_kl_rollback_restores_the_last_checkpoint_and_finishes(tmp_path, fast_recipe):
    run = tmp_path / "run"
    result = zopro(
        "run",
        str(fast_recipe),
        "--run-dir",
        str(run),
        *RUNAWAY,
        "--set",
        "policy.max_kl=0.5",
        "--set",
        "policy.max_kl_action=rollback",
    )
    assert result.returncode == 0, result.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["rolled_back_to"] == "reward"
    events = read_events(run)
    assert [e["checkpoint"] for e in events if e["type"] == "rollback"] == ["reward"]
    history = [e for e in events if e["type"] == "run_end"][-1]["history"]
    assert [row["label"] for row in history] == ["sft"]  # the run ends with the policy it had before
    assert status["latest"]["eval/gold"] == history[0]["eval/gold"]


def test_a_plain_fast_run_raises_no_warning(tmp_path, fast_recipe):
    run = tmp_path / "run"
    assert zopro("run", str(fast_recipe), "--run-dir", str(run)).returncode == 0
    assert not [e for e in read_events(run) if e["type"] == "warning"]
    assert run_info(run).warning_count == 0


def test_resume_is_exact_with_the_adaptive_kl_controller_and_clipping(tmp_path):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(
        FAST_RECIPE
        + "\n[policy]\nkl_target = 0.001\nkl_horizon = 1.0\nreward_clip = 0.5\nwhiten_advantages = true\n"
        + "\n[rloo]\nlr = 0.02\n"  # a policy that moves: KL over the target, beta up
    )
    straight = tmp_path / "straight"
    assert zopro("run", str(recipe), "--run-dir", str(straight)).returncode == 0
    betas = [
        e["metrics"]["policy/kl_coef"]
        for e in read_events(straight)
        if e["type"] == "metrics" and e["stage"] == "policy"
    ]
    assert len(set(betas)) > 3 and max(betas) > 0.05, betas  # the controller moved beta up from kl_coef
    scores = [
        e["metrics"]["objective/scores"]
        for e in read_events(straight)
        if e["type"] == "metrics" and e["stage"] == "policy"
    ]
    assert all(-0.5 - 1e-6 <= s <= 0.5 + 1e-6 for s in scores), scores  # no missing-EOS penalty here
    # stopped after two updates of the first iteration: beta must come back from the checkpoint
    assert_resume_after_sigterm_is_exact(recipe, straight, tmp_path / "interrupted", at_step=12 + 12 + 3)


# -- the regression: RLOO on recipes/tiny.toml (each run takes minutes on 2 cores) ------------------------------
# Seed 5 collapsed in issue 16 (held-out KL 0.91 -> 14.4 in the last iteration, gold .474 -> .297); on this
# machine's numerics the same seed stays healthy, and seed 6 shows the same late runaway with the old fixed
# beta (KL 0.70 -> 4.49 in the last iteration, a kl_jump warning). The adaptive KL holds both.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [5, 6])
def test_tiny_rloo_stays_near_its_reference_and_improves(tmp_path, seed):
    run = tmp_path / "run"
    result = zopro(
        "run",
        str(REPO / "recipes" / "tiny.toml"),
        "--set",
        f"seed={seed}",
        "--set",
        "threads=1",  # the suite's two workers share two cores (with the recipe's two threads: healthy too)
        "--run-dir",
        str(run),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    evals = [e["metrics"] for e in read_events(run) if e["type"] == "eval"]
    gold = [m["eval/gold"] for m in evals]
    kl = [m["eval/kl"] for m in evals]
    # the bound: held-out KL under 5 (seed 6 peaks at 2.8 with one eval answer per prompt, 3.6 with
    # recipes/tiny.toml's four)
    assert gold[-1] > gold[1] and max(kl) < 5.0, (gold, kl)
    assert not [e for e in read_events(run) if e["type"] == "warning"]


def test_watchdog_says_when_the_policy_has_not_moved_from_sft():
    baseline = {"eval/gold": 0.3, "eval/kl": 0.0}
    stuck = {"eval/gold": 0.3, "eval/win_rate_vs_sft": 0.5, "eval/win_rate_vs_sft_se": 0.0, "eval/kl": 0.0}
    (warning,) = check(stuck, [baseline])
    assert warning.code == "policy_unchanged" and "policy.temperature" in warning.message
    moved = {**stuck, "eval/win_rate_vs_sft": 0.56, "eval/win_rate_vs_sft_se": 0.03, "eval/kl": 0.4}
    assert check(moved, [baseline]) == []
    assert check({**stuck, "eval/kl": 0.2}, [baseline]) == [], "ties, but the policy moved: not this warning"
    assert check(stuck, []) == [], "the SFT baseline itself is never compared"
