"""The zeroth-order estimators (methods/zeroth_order/estimators.py and spsa.zo_update): one-sided probes,
group-relative fitness, several updates per rollout; against hand computations, and inside real runs
(the clipped surrogate at the rollout, exact resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.recipe import RecipeError, load_recipe
from engine.rundir.reader import read_events
from engine.training.methods.zeroth_order.estimators import group_fitness, passes_per_update
from engine.training.methods.zeroth_order.samplers import IsotropicSampler
from engine.training.methods.zeroth_order.spsa import direction_seed, replay_direction, zo_update
from engine.training.objectives import clipped_surrogate
from tests.conftest import zopro
from tests.nano import split_flat
from tests.runs import assert_resume_after_sigterm_is_exact, finished_run, passes_per_step, zeroth_order_steps
from tests.test_methods_e2e import SUBSPACE_RECIPE
from tests.test_zeroth_order import SHAPES, Quadratic, cosine, flat, make_params, max_abs_diff, snapshot


def hand_g(loss, theta0, z, eps: float, one_sided: bool) -> float:
    plus = float(loss({n: theta0[n] + eps * z[n] for n in z}))
    if one_sided:
        return (plus - float(loss(theta0))) / eps
    return (plus - float(loss({n: theta0[n] - eps * z[n] for n in z}))) / (2 * eps)


def hand_step(theta0, coefficients, seeds, lr: float, q: int):
    expected = snapshot(theta0)
    for coefficient, seed in zip(coefficients, seeds, strict=True):
        z = replay_direction(theta0, IsotropicSampler(), seed)
        for name in expected:
            expected[name] -= lr * coefficient * z[name] / q
    return expected


# ---------------------------------------------------------------- group fitness


def test_group_fitness_by_hand():
    g = [1.0, 2.0, 3.0, 6.0]  # mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    assert group_fitness(g, "raw") == g
    assert group_fitness(g, "zscore") == pytest.approx([(x - 3.0) / math.sqrt(3.5) for x in g])
    # leave-one-out: g_i - mean of the other three
    assert group_fitness(g, "loo") == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    assert group_fitness([2.0, 2.0, 2.0], "zscore") == [0.0, 0.0, 0.0]  # no spread: no step
    with pytest.raises(ValueError, match="q >= 2"):
        group_fitness([1.0], "loo")
    with pytest.raises(ValueError, match="unknown fitness"):
        group_fitness([1.0, 2.0], "rank")


def test_passes_per_update():
    assert passes_per_update("two_sided", "raw", 4, base_known=True) == 8
    assert passes_per_update("one_sided", "raw", 4, base_known=True) == 4
    assert passes_per_update("one_sided", "raw", 4, base_known=False) == 5  # L0 costs one pass
    assert passes_per_update("one_sided", "zscore", 4, base_known=False) == 4  # L0 cancels


# ---------------------------------------------------------------- one-sided probes


def test_one_sided_probes_theta_plus_eps_z_once_per_direction_and_restores_theta():
    params = make_params()
    theta0 = snapshot(params)
    loss = Quadratic(SHAPES)
    seen = []

    def loss_fn():
        seen.append(snapshot(params))
        return loss(params)

    eps, lr, q, base = 1e-2, 0.05, 3, float(loss(theta0))
    result = zo_update(
        params, loss_fn, IsotropicSampler(), run_seed=7, update_index=3, eps=eps, lr=lr, directions=q,
        estimator="one_sided", base_loss=base,
    )  # fmt: skip
    seeds = [direction_seed(7, 3, i) for i in range(q)]
    assert len(seen) == result.forward_passes == q  # L0 was handed in: one pass per direction
    for state, seed in zip(seen, seeds, strict=True):
        z = replay_direction(theta0, IsotropicSampler(), seed)
        assert max_abs_diff(state, {n: theta0[n] + eps * z[n] for n in z}) < 1e-6
    g = [hand_g(loss, theta0, replay_direction(theta0, IsotropicSampler(), s), eps, True) for s in seeds]
    assert result.g_raw == pytest.approx(sum(g) / q, rel=1e-3)
    assert result.loss_minus == base
    assert max_abs_diff(params, hand_step(theta0, g, seeds, lr, q)) < 1e-4


def test_one_sided_raw_without_l0_spends_one_pass_on_it():
    params = make_params()
    loss = Quadratic(SHAPES)
    calls = []
    result = zo_update(
        params, lambda: calls.append(1) or loss(params), IsotropicSampler(), run_seed=1, update_index=0,
        eps=1e-2, lr=0.0, directions=4, estimator="one_sided",
    )  # fmt: skip
    assert len(calls) == result.forward_passes == 5


def test_one_sided_equals_two_sided_in_expectation_on_a_quadratic():
    """On L = 1/2 (theta - t)' A (theta - t): one-sided g = grad.z + eps/2 z'Az, two-sided g = grad.z exactly;
    the extra term times z is odd in z, so the averaged steps agree (and follow the gradient)."""
    loss = Quadratic(SHAPES)
    theta = make_params()
    gradient = flat(loss.gradient(theta))
    eps, q = 0.05, 4096
    steps = {}
    for estimator in ("two_sided", "one_sided"):
        params = make_params()
        theta0 = snapshot(params)
        zo_update(
            params, lambda p=params: loss(p), IsotropicSampler(), run_seed=3, update_index=0, eps=eps, lr=1.0,
            directions=q, estimator=estimator, base_loss=float(loss(theta0)),
        )  # fmt: skip
        steps[estimator] = flat(theta0) - flat(params)  # (1/q) sum_i g_i z_i
    # the same directions: the two differ only by (eps / 2q) sum_i (z_i'A z_i) z_i, mean 0, shrinking as 1/sqrt(q)
    difference = (steps["one_sided"] - steps["two_sided"]).norm() / steps["two_sided"].norm()
    assert difference < 0.15
    assert cosine(steps["one_sided"], gradient) > 0.8 and cosine(steps["two_sided"], gradient) > 0.8
    # the extra term by hand, for the first direction: one-sided minus two-sided g is eps/2 z'Az
    z = replay_direction(theta, IsotropicSampler(), direction_seed(3, 0, 0))
    curvature = sum(float((loss.curvature[n] * z[n] ** 2).sum()) for n in z)
    theta0 = snapshot(theta)
    gap = hand_g(loss, theta0, z, eps, True) - hand_g(loss, theta0, z, eps, False)
    assert gap == pytest.approx(eps / 2 * curvature, rel=1e-3)


# ---------------------------------------------------------------- group-relative fitness inside the update


@pytest.mark.parametrize("estimator", ["two_sided", "one_sided"])
@pytest.mark.parametrize("fitness", ["zscore", "loo"])
def test_group_fitness_steps_along_the_normalised_estimates(estimator, fitness):
    params = make_params()
    theta0 = snapshot(params)
    loss = Quadratic(SHAPES)
    eps, lr, q = 1e-2, 0.05, 4
    calls = []
    result = zo_update(
        params, lambda: calls.append(1) or loss(params), IsotropicSampler(), run_seed=5, update_index=2,
        eps=eps, lr=lr, directions=q, estimator=estimator, fitness=fitness,
    )  # fmt: skip
    seeds = [direction_seed(5, 2, i) for i in range(q)]
    one = estimator == "one_sided"
    g = [hand_g(loss, theta0, replay_direction(theta0, IsotropicSampler(), s), eps, one) for s in seeds]
    coefficients = group_fitness(g, fitness)  # L0 cancels: the one-sided update never evaluated it
    assert len(calls) == (q if one else 2 * q)
    assert max_abs_diff(params, hand_step(theta0, coefficients, seeds, lr, q)) < 1e-4
    assert result.g == pytest.approx(sum(coefficients) / q, abs=1e-4)  # zscore and loo: mean 0


def test_direction_offset_draws_the_next_directions():
    params = make_params()
    theta0 = snapshot(params)
    loss = Quadratic(SHAPES)
    zo_update(
        params, lambda: loss(params), IsotropicSampler(), run_seed=5, update_index=2, eps=1e-2, lr=0.05,
        directions=2, direction_offset=2,
    )  # fmt: skip
    seeds = [direction_seed(5, 2, i) for i in (2, 3)]
    g = [hand_g(loss, theta0, replay_direction(theta0, IsotropicSampler(), s), 1e-2, False) for s in seeds]
    assert max_abs_diff(params, hand_step(theta0, g, seeds, 0.05, 2)) < 1e-4


def test_settings_are_checked_before_any_pass():
    params = make_params()
    with pytest.raises(ValueError, match="estimator"):
        zo_update(params, lambda: 0.0, IsotropicSampler(), run_seed=0, update_index=0, eps=1e-2, lr=0.1,
                  estimator="three_sided")  # fmt: skip
    with pytest.raises(ValueError, match="directions >= 2"):
        zo_update(params, lambda: 0.0, IsotropicSampler(), run_seed=0, update_index=0, eps=1e-2, lr=0.1,
                  fitness="zscore")  # fmt: skip


def test_a_recipe_names_the_bad_setting(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[policy]\nmethod = "zopro"\n[zopro]\nfitness = "zscore"\n')
    with pytest.raises(RecipeError, match=r"zopro.fitness = 'zscore'.*zopro.directions >= 2"):
        load_recipe(recipe)
    recipe.write_text('[policy]\nmethod = "mezo"\n[mezo]\nestimator = "once"\n')
    with pytest.raises(RecipeError, match="mezo.estimator = 'once' is not accepted; choose one of"):
        load_recipe(recipe)
    recipe.write_text('[policy]\nmethod = "mezo"\n[mezo]\nupdates_per_rollout = 0\n')
    with pytest.raises(RecipeError, match="mezo.updates_per_rollout = 0 is out of range"):
        load_recipe(recipe)


def test_the_surrogate_at_the_rollout_is_minus_the_mean_advantage():
    from engine.training.methods.zeroth_order.update import surrogate_at_rollout

    class Rollout:
        old_logprobs = torch.log(torch.rand(6, 5, generator=torch.Generator().manual_seed(0)))
        advantages = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.25, 1.0])

    assert surrogate_at_rollout(Rollout(), 0.2) == pytest.approx(-float(Rollout.advantages.mean()))
    loss, _ = clipped_surrogate(Rollout.old_logprobs, Rollout.old_logprobs, Rollout.advantages, 0.2)
    assert surrogate_at_rollout(Rollout(), 0.2) == float(loss)


# ---------------------------------------------------------------- inside real runs

EQUAL_COST_RECIPE = SUBSPACE_RECIPE.replace(
    'sampler = "subspace"',
    'sampler = "subspace"\nestimator = "one_sided"\nfitness = "zscore"\nupdates_per_rollout = 2',
)


@pytest.fixture(scope="module")
def equal_cost_run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("equal-cost"), "equal-cost", EQUAL_COST_RECIPE)


def test_one_sided_updates_on_one_rollout_cost_q_passes_each(equal_cost_run):
    second = zeroth_order_steps(equal_cost_run[1])
    # q = 2 one-sided directions, two updates per rollout: 4 passes on top of the rollout's 3 (the premise
    # check's passes fall before the first of these)
    assert passes_per_step(second) == {3 + 2 * 2}
    assert all(m["zo/step_norm"] > 0 for m in second)


def test_resumed_run_with_several_updates_per_rollout_equals_an_uninterrupted_one(equal_cost_run, tmp_path):
    recipe, straight = equal_cost_run
    assert_resume_after_sigterm_is_exact(
        recipe, straight, tmp_path / "interrupted", at_step=12 + 12 + 4 + 4 + 2
    )


# ---------------------------------------------------------------- gold at equal cost


def test_gains_at_equal_cost_read_the_gold_curves_between_evaluations():
    from engine.export.equal_cost import Curve, gains_table, ratio_lines

    # gold after the RM, then after iterations 0-3; cost cumulative from the start of the policy stage
    rloo = Curve("rloo", 1, gold=[0.2, 0.3, 0.4, 0.5, 0.6], se=[0.01] * 5, passes=[0, 60, 120, 180, 240],
                 wall=[0, 2, 4, 6, 8], tokens=[0, 600, 1200, 1800, 2400])  # fmt: skip
    zo = Curve("zopro", 1, gold=[0.2, 0.3, 0.36, 0.42, 0.48], se=[0.01] * 5, passes=[0, 60, 165, 270, 375],
               wall=[0, 2, 3, 4, 5], tokens=[0, 600, 2700, 4800, 6900])  # fmt: skip
    [_, row] = gains_table({"rloo": [rloo], "zopro": [zo]})
    assert row["gain"] == pytest.approx(0.18) and row["baseline_gain"] == pytest.approx(0.3)
    # equal passes: rloo spent 180 after iteration 0, zopro 315: zopro at 180 is 75/105 into iteration 2
    assert row["gain_at_passes"] == pytest.approx(0.06 + 0.06 * 75 / 105)
    assert row["baseline_gain_at_passes"] == pytest.approx(0.3)
    # equal wall time: zopro spent 3 s, rloo reaches 3 s half way through iteration 1
    assert row["gain_at_wall"] == pytest.approx(0.18) and row["baseline_gain_at_wall"] == pytest.approx(0.15)
    # equal tokens: rloo ran 1800 after iteration 0, zopro (a pass of several rounds) 1800 of its first 2100
    assert row["gain_at_tokens"] == pytest.approx(0.06 * 1800 / 2100)
    assert row["baseline_gain_at_tokens"] == pytest.approx(0.3)
    [line] = ratio_lines(gains_table({"rloo": [rloo], "zopro": [zo]}))
    assert (
        "over the iterations +0.180 vs +0.300 = 0.60 x" in line
        and "equal wall +0.180 vs +0.150 = 1.20 x" in line
        and "equal tokens +0.051 vs +0.300 = 0.17 x" in line
    )


# ---------------------------------------------------------------- the subspace spread like the gradients


def test_weighted_subspace_directions_follow_the_gradients_spread():
    from engine.training.methods.zeroth_order.samplers import GradientSnapshots, SubspaceSampler

    params = make_params()
    shapes = {n: p.shape for n, p in params.items()}
    generator = torch.Generator().manual_seed(4)
    common = torch.randn(flat(params).numel(), generator=generator)
    snapshots = GradientSnapshots(8)
    for _ in range(6):  # six gradients that share one strong direction, plus weaker noise
        row = 5.0 * common + torch.randn(common.numel(), generator=generator)
        snapshots.add(split_flat(row, params), params)
    basis, weighted = snapshots.basis(), snapshots.weighted_basis()
    assert weighted.shape == basis.shape
    lengths = weighted.norm(dim=0)
    gram = weighted.T @ weighted
    assert torch.allclose(gram, torch.diag(lengths**2), atol=1e-5)  # orthogonal columns, lengths s_j / s_max
    assert float(lengths.max()) == pytest.approx(1.0) and float(lengths.min()) < 0.3
    # z = R B c / |B c| with the seed's c, by hand
    sampler = SubspaceSampler(weighted, shapes, 2.0, weighted=True)
    c = torch.randn(weighted.shape[1], generator=torch.Generator().manual_seed(11))
    by_hand = weighted @ c * (2.0 / float((weighted @ c).norm()))
    z = flat(replay_direction(params, sampler, 11))
    assert torch.allclose(z, by_hand, atol=1e-5) and float(z.norm()) == pytest.approx(2.0, rel=1e-5)
    # spread like the gradients: closer to their shared direction than the even spread over the span
    uniform = SubspaceSampler(basis, shapes, 2.0)
    cos_weighted = sum(abs(cosine(flat(replay_direction(params, sampler, s)), common)) for s in range(200))
    cos_uniform = sum(abs(cosine(flat(replay_direction(params, uniform, s)), common)) for s in range(200))
    assert cos_weighted > 1.5 * cos_uniform


def test_the_cost_figure_from_a_real_run(equal_cost_run, tmp_path):
    _, run = equal_cost_run
    result = zopro("plot", "--preset", "cost", str(run), "-o", str(tmp_path / "cost.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cost.png").stat().st_size > 0
    [row] = json.loads((tmp_path / "cost.json").read_text())
    events = read_events(run)
    gold = [e["metrics"]["eval/gold"] for e in events if e["type"] == "eval"]
    assert row["gain"] == pytest.approx(gold[-1] - gold[1]) and row["seed"] == 0
    steps = [e["metrics"] for e in events if e["type"] == "metrics" and e["stage"] == "policy"]
    iteration_one = [m for m in steps if m["zo/first_order"] == 0.0]
    assert (
        row["spent_passes"]
        == iteration_one[-1]["compute/stage_forward_passes"]
        - (steps[len(steps) - len(iteration_one) - 1]["compute/stage_forward_passes"])
    )
    assert row["spent_wall"] == pytest.approx(sum(m["time/update_s"] for m in iteration_one))
    assert (
        row["spent_tokens"]
        == iteration_one[-1]["compute/stage_tokens"]
        - (steps[len(steps) - len(iteration_one) - 1]["compute/stage_tokens"])
    )


def test_the_fraction_of_the_true_gradient_inside_the_basis_by_hand():
    """|Q'g| / |g| with the rows of Q in sorted-name order: g = (a: [3, 4], b: [12]) has 5 of its 13 in
    span(e_a0, e_a1) and 12 of 13 in span(e_b)."""
    from engine.training.methods.zeroth_order.update import _fraction_in_basis

    gradient = {"b": torch.tensor([12.0]), "a": torch.tensor([3.0, 4.0])}  # sorted: a0, a1, b
    first_two = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert _fraction_in_basis(gradient, first_two) == pytest.approx(5 / 13)
    assert _fraction_in_basis(gradient, torch.tensor([[0.0], [0.0], [1.0]])) == pytest.approx(12 / 13)
    assert _fraction_in_basis({"a": torch.zeros(2), "b": torch.zeros(1)}, first_two) == 0.0
