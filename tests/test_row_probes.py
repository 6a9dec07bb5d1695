"""Row probes (methods/zeroth_order/row_probes.py): each answer of a batch scored at its own perturbed
policy in one pass, against moving the parameters by hand; the update against a hand computation; the
settings and a real run's resume."""

from __future__ import annotations

import math

import pytest
import torch

from engine.recipe import RecipeError, load_recipe
from engine.training.methods.zeroth_order.row_probes import probed_layers, row_probe_update, row_terms
from engine.training.methods.zeroth_order.samplers import SubspaceSampler
from engine.training.methods.zeroth_order.spsa import direction_seed
from engine.training.objectives import surrogate_per_row
from engine.training.rollout import token_logprobs
from engine.training.row_chunks import row_chunks
from tests.nano import nano_rollout
from tests.runs import assert_resume_after_sigterm_is_exact, finished_run, passes_per_step, zeroth_order_steps
from tests.test_methods_e2e import SUBSPACE_RECIPE


@pytest.fixture(scope="module")
def pm(moved_nano):
    return moved_nano


@pytest.fixture(scope="module")
def rollout(pm):
    return nano_rollout(pm, 4, 3)


def subspace(pm, rank: int = 5, seed: int = 0) -> tuple[dict, SubspaceSampler]:
    params = pm.adapter_parameters("policy")
    total = sum(p.numel() for p in params.values())
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(total, rank, generator=generator))
    shapes = {n: p.shape for n, p in params.items()}
    return params, SubspaceSampler(basis, shapes, norm=3.0)


def moved_terms(pm, params, sampler, rollout, c: torch.Tensor) -> torch.Tensor:
    """Every row's surrogate term with the parameters themselves moved by Q c (then put back)."""
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for _, param, rows in sampler.slices(params):
            param.add_((rows @ c).view(param.shape))
        logprobs = token_logprobs(pm, rollout.sequences, None)
        for name, param in params.items():
            param.copy_(before[name])
    terms = surrogate_per_row(logprobs, rollout.old_logprobs, rollout.advantages, 0.2).double()
    return terms / len(rollout.advantages)


def test_each_row_is_scored_at_its_own_perturbation_in_one_pass(pm, rollout, monkeypatch):
    """Row j of one probed pass equals row j of a pass with the parameters moved by Q c_j, for every
    adapted layer (the lm_head's included), with the rows split into chunks or not."""
    params, sampler = subspace(pm)
    rows = len(rollout.advantages)
    coefficients = torch.stack([sampler.coefficients(seed) for seed in range(rows)]) * 0.05
    layers = probed_layers(pm.model, params, sampler, "policy")
    assert len(layers) == sum("lora_A" in n for n in params)  # every adapted layer, lm_head included
    for most in (rows, 5):  # one chunk; chunks of at most 5 rows
        monkeypatch.setattr(
            "engine.training.methods.zeroth_order.row_probes.inference_rows", lambda *a, most=most: most
        )
        assert len(row_chunks(rows, most)) == (1 if most == rows else 3)
        with pm.adapter("policy"), torch.no_grad():
            probed = row_terms(pm, layers, rollout, coefficients, 0.2)
            plain = row_terms(pm, layers, rollout, None, 0.2)
        for j in range(rows):
            with pm.adapter("policy"):
                by_hand = moved_terms(pm, params, sampler, rollout, coefficients[j])
            assert float(probed[j]) == pytest.approx(float(by_hand[j]), abs=1e-6)
            assert float(probed[j]) != pytest.approx(float(plain[j]), abs=1e-6)  # the probe moved it
    assert all(layer.module.zopro_row_probe is None for layer in layers)  # nothing left set


def test_a_layer_peft_would_compute_refuses_a_row_probe(pm, rollout):
    """Where peft's own forward would run (here: adapters disabled), the perturbation would silently be
    left out; the probe refuses instead."""
    params, sampler = subspace(pm)
    layers = probed_layers(pm.model, params, sampler, "policy")
    coefficients = torch.zeros(len(rollout.advantages), sampler.rank)
    with pm.adapter("policy"), torch.no_grad(), pm.model.disable_adapter():
        with pytest.raises(ValueError, match="one plain LoRA adapter"):
            row_terms(pm, layers, rollout, coefficients, 0.2)
    assert all(layer.module.zopro_row_probe is None for layer in layers)


def test_the_update_by_hand(pm, rollout):
    """One-sided, raw fitness: g_j = (l_j(theta + eps z_j) - l_j(theta)) / eps with l_j(theta) = -A_j / N
    (the rollout's policy), theta <- theta - lr (1/N) sum_j g_j z_j; two rounds draw the next seeds."""
    params, sampler = subspace(pm)
    rows, eps, lr = len(rollout.advantages), 5e-2, 0.3
    before = {n: p.detach().clone() for n, p in params.items()}
    counted = []
    with pm.adapter("policy"):
        result = row_probe_update(
            pm, params, rollout, sampler, adapter="policy", run_seed=4, update_index=2, eps=eps, lr=lr,
            clip_range=0.2, rounds=2, count_pass=lambda copies: counted.append(copies),
        )  # fmt: skip
        after = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(before[name])
        base = (-rollout.advantages / rows).double()
        w = torch.zeros(sampler.rank, dtype=torch.float32)
        g_all = []
        for j in range(2 * rows):
            c = sampler.coefficients(direction_seed(4, 2, j))
            g = (moved_terms(pm, params, sampler, rollout, eps * c)[j % rows] - base[j % rows]) / eps
            g_all.append(float(g))
            w -= lr * float(g) * c / (2 * rows)
    assert result.directions == 2 * rows and result.forward_passes == 2 == len(counted)
    assert result.g_raw == pytest.approx(sum(g_all) / len(g_all), rel=1e-3)  # float32 rounding
    for name, param, basis_rows in sampler.slices(before):
        expected = before[name] + (basis_rows @ w).view(param.shape)
        torch.testing.assert_close(after[name], expected, atol=2e-6, rtol=1e-4)
    assert result.step_norm == pytest.approx(float(torch.linalg.vector_norm(w)), rel=1e-4)


def test_two_sided_rows_cost_two_passes_a_round_and_a_non_finite_estimate_skips(pm, rollout):
    params, sampler = subspace(pm)
    before = {n: p.detach().clone() for n, p in params.items()}
    with pm.adapter("policy"):
        result = row_probe_update(
            pm, params, rollout, sampler, adapter="policy", run_seed=1, update_index=0, eps=1e-2, lr=0.0,
            clip_range=0.2, estimator="two_sided", fitness="zscore",
        )  # fmt: skip
        assert result.forward_passes == 2 and not result.skipped
        broken = dataclass_replace(rollout, advantages=rollout.advantages * math.nan)
        skipped = row_probe_update(
            pm, params, broken, sampler, adapter="policy", run_seed=1, update_index=0, eps=1e-2, lr=0.3,
            clip_range=0.2,
        )  # fmt: skip
    assert skipped.skipped
    for name, param in params.items():
        assert torch.equal(param, before[name]), name  # no step, and the probes never moved theta


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_a_recipe_names_the_sampler_row_probes_need(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[policy]\nmethod = "zopro"\n[zopro]\nprobes = "rows"\nsampler = "zopro"\n')
    with pytest.raises(RecipeError, match=r"zopro.probes = 'rows'.*zopro.sampler = 'subspace'"):
        load_recipe(path)
    path.write_text(
        '[policy]\nmethod = "zopro"\n[zopro]\nprobes = "rows"\nsampler = "subspace"\nfitness = "zscore"\n'
    )
    assert load_recipe(path).zopro.probes == "rows"  # one round has N directions: zscore is fine
    path.write_text('[policy]\nmethod = "zopro"\n[zopro]\nsampler = "subspace"\nrounds_per_pass = 0\n')
    with pytest.raises(RecipeError, match=r"zopro.rounds_per_pass = 0 .*zopro.probes = 'rows'"):
        load_recipe(path)
    path.write_text('[policy]\nmethod = "zopro"\n[zopro]\nsampler = "zopro"\nsubspace_rank = 8\n')
    with pytest.raises(RecipeError, match=r"zopro.subspace_rank = 8 .*zopro.sampler = 'subspace'"):
        load_recipe(path)


ROWS_RECIPE = SUBSPACE_RECIPE.replace(
    'sampler = "subspace"',
    'sampler = "subspace"\nprobes = "rows"\nestimator = "one_sided"\nupdates_per_rollout = 2',
)


@pytest.fixture(scope="module")
def rows_run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("rows"), "rows", ROWS_RECIPE)


def test_a_row_probe_run_moves_the_policy_at_one_pass_a_round_of_directions(rows_run):
    second = zeroth_order_steps(rows_run[1])
    # two rounds (directions = 2), two updates on each rollout: the first costs 2 passes (l(theta) is the
    # rollout's), the second 1 + 2 (its l(theta) is after the first step), on top of the rollout's 3
    assert passes_per_step(second) == {3 + 2 + 1 + 2}
    assert all(m["zo/step_norm"] > 0 and m["zo/directions"] > 1 for m in second)


def test_a_resumed_row_probe_run_equals_an_uninterrupted_one(rows_run, tmp_path):
    recipe, straight = rows_run
    assert_resume_after_sigterm_is_exact(
        recipe, straight, tmp_path / "interrupted", at_step=12 + 12 + 4 + 4 + 2
    )


@pytest.mark.parametrize("estimator", ["one_sided", "two_sided"])
def test_rounds_run_together_in_one_pass_give_the_same_update(pm, rollout, estimator):
    """`rounds_per_pass`: three rounds in passes of 1, 2 + 1, or all 3 rows-times-three: the same estimate
    and step to float rounding, in fewer passes of more rows (counted as copies of the batch)."""
    params, sampler = subspace(pm)
    before = {n: p.detach().clone() for n, p in params.items()}
    outcomes = {}
    for together in (1, 2, 0):
        counted = []
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(before[name])
        with pm.adapter("policy"):
            result = row_probe_update(
                pm, params, rollout, sampler, adapter="policy", run_seed=3, update_index=1, eps=5e-2, lr=0.3,
                clip_range=0.2, rounds=3, rounds_per_pass=together, estimator=estimator,
                count_pass=lambda copies, counted=counted: counted.append(copies),
            )  # fmt: skip
        outcomes[together] = (result, {n: p.detach().clone() for n, p in params.items()}, counted)
    sides = 2 if estimator == "two_sided" else 1
    assert outcomes[1][2] == [1] * 3 * sides and outcomes[2][2] == [2] * sides + [1] * sides
    assert outcomes[0][2] == [3] * sides and outcomes[0][0].forward_passes == sides
    first, moved, _ = outcomes[1]
    assert first.directions == 3 * len(rollout.advantages) and first.step_norm > 0
    for together in (2, 0):
        result, after, _ = outcomes[together]
        assert result.directions == first.directions
        assert result.g_raw == pytest.approx(first.g_raw, rel=1e-4, abs=1e-6)
        assert result.step_norm == pytest.approx(first.step_norm, rel=1e-4)
        for name in moved:
            torch.testing.assert_close(after[name], moved[name], atol=2e-6, rtol=1e-4)
