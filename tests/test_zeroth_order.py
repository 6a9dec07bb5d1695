"""Tests of the SPSA core (methods/zeroth_order/spsa.py): seed replay, MeZO/ZOPrO directions, the update, its guards."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from engine.training.methods.zeroth_order.samplers import IsotropicSampler, ZoproSampler
from engine.training.methods.zeroth_order.spsa import decay_at, direction_seed, replay_direction, zo_update

SHAPES = {"layer.0.lora_A": (4, 16), "layer.0.lora_B": (16, 4), "layer.1.bias": (16,), "scalar": (1,)}


def make_tensors(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def make_params(shapes: dict[str, tuple[int, ...]] = SHAPES, seed: int = 0) -> dict[str, nn.Parameter]:
    return {name: nn.Parameter(tensor) for name, tensor in make_tensors(shapes, seed).items()}


def snapshot(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([tensors[name].detach().reshape(-1) for name in sorted(tensors)])


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[name].detach() - b[name].detach()).abs().max()) for name in a)


class Quadratic:
    """L(theta) = 0.5 * sum_k sum(curvature_k * (theta_k - target_k)^2), evaluated in float64."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 1) -> None:
        self.target = make_tensors(shapes, seed)
        self.curvature = {name: 0.5 + t.abs() for name, t in make_tensors(shapes, seed + 1).items()}

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        return sum(
            0.5 * (self.curvature[name] * (param - self.target[name]) ** 2).double().sum()
            for name, param in params.items()
        )

    def gradient(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        leaves = {name: param.detach().clone().requires_grad_(True) for name, param in params.items()}
        self(leaves).backward()
        return {name: leaf.grad for name, leaf in leaves.items()}


def zopro_sampler(decay: float = 0.5, shapes: dict[str, tuple[int, ...]] = SHAPES) -> ZoproSampler:
    return ZoproSampler(make_tensors(shapes, 10, scale=0.1), make_tensors(shapes, 11), decay=decay)


# ---------------------------------------------------------------- seeds, schedules, samplers


def test_direction_seed_is_pure_63_bit_and_distinct():
    seeds = {direction_seed(run, update, i) for run in range(5) for update in range(20) for i in range(10)}
    assert len(seeds) == 1000
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert direction_seed(3, 7, 1) == direction_seed(3, 7, 1)
    # well mixed: successive updates are not a constant stride apart
    assert len({direction_seed(0, u + 1, 0) - direction_seed(0, u, 0) for u in range(10)}) == 10
    with pytest.raises(TypeError):
        direction_seed(0, 1.0, 0)  # a float would silently give another seed


@pytest.mark.parametrize("sampler", [IsotropicSampler(), zopro_sampler()], ids=["mezo", "zopro"])
def test_same_seed_regenerates_the_same_direction_bit_for_bit(sampler):
    params = make_params()
    z = replay_direction(params, sampler, direction_seed(0, 5, 0))
    again = replay_direction(params, sampler, direction_seed(0, 5, 0))
    other_update = replay_direction(params, sampler, direction_seed(0, 6, 0))
    other_direction = replay_direction(params, sampler, direction_seed(0, 5, 1))
    assert all(torch.equal(z[name], again[name]) for name in params)
    assert all(z[name].dtype == torch.float32 and z[name].shape == params[name].shape for name in params)
    assert not torch.equal(flat(z), flat(other_update))
    assert not torch.equal(flat(z), flat(other_direction))


def test_decay_schedules():
    for s in range(3):
        assert decay_at("exp", s, 4) == pytest.approx(0.999 * math.exp(-s), rel=1e-12)
        assert decay_at("linear", s, 4) == pytest.approx(0.999 - s / 4, rel=1e-12)
    assert decay_at("exp", 1, 4, start=0.5) == pytest.approx(0.5 / math.e)
    assert decay_at("linear", 4, 4) == 0.0  # 0.999 - 1 floored at 0
    assert decay_at("linear", 9, 4) == 0.0
    with pytest.raises(ValueError, match="cosine"):
        decay_at("cosine", 0, 4)
    with pytest.raises(ValueError):
        decay_at("linear", 0, 0)


def test_zopro_noise_is_orthogonal_to_v_and_as_long_as_mu():
    shapes = {"big": (64, 48), "small": (3, 2), "vector": (40,)}
    sampler = zopro_sampler(0.7, shapes)
    params = make_params(shapes)
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        for name in sorted(shapes):
            n_perp = sampler.noise(name, params[name], generator).reshape(-1)
            assert abs(cosine(n_perp, sampler.v[name].reshape(-1))) < 1e-5
            relative = abs(float(n_perp.norm()) / float(sampler.mu[name].norm()) - 1)
            assert relative < 1e-5
    # and the mixed direction leans on mu: cos(z_k, mu_k) ~ d for a big tensor (n_perp is nearly orthogonal to mu)
    z = replay_direction(params, sampler, seed=1)
    assert cosine(z["big"].reshape(-1), sampler.mu["big"].reshape(-1)) == pytest.approx(0.7, abs=0.05)


@pytest.mark.parametrize("reference", ["mu zero, v zero", "mu zero, v random", "mu norm-matched, v random"])
def test_zopro_without_momentum_draws_the_mezo_distribution(reference):
    shapes = {"w": (200, 100)}
    numel = 200 * 100
    mu = {"w": torch.zeros(shapes["w"])} if reference.startswith("mu zero") else make_tensors(shapes, 3)
    if reference.startswith("mu norm"):
        mu["w"] *= math.sqrt(numel) / mu["w"].norm()
    v = {"w": torch.zeros(shapes["w"])} if reference.endswith("v zero") else make_tensors(shapes, 4)
    sampler = ZoproSampler(mu, v, decay=0.0)
    params = make_params(shapes)
    samples = torch.cat(
        [replay_direction(params, sampler, seed)["w"].reshape(-1) for seed in range(5)]
    ).numpy()

    assert abs(samples.mean()) < 0.01
    assert abs(samples.var() - 1.0) < 0.02
    assert stats.kstest(samples, "norm").pvalue > 1e-3
    # the check has power: a 10 % wider or a shifted distribution is rejected
    assert stats.kstest(1.1 * samples, "norm").pvalue < 1e-6
    assert stats.kstest(samples + 0.05, "norm").pvalue < 1e-6


def test_zero_norm_references_give_finite_nonzero_directions():
    shapes = {"a": (10, 10), "b": (1,), "c": (5, 5)}
    mu = {"a": torch.zeros(10, 10), "b": torch.tensor([0.3]), "c": torch.zeros(5, 5)}
    v = {"a": torch.zeros(10, 10), "b": torch.tensor([-2.0]), "c": make_tensors({"c": (5, 5)}, 5)["c"]}
    params = make_params(shapes)
    for decay in (0.0, 0.5, 0.999):
        sampler = ZoproSampler(mu, v, decay=decay)
        for seed in range(3):
            z = replay_direction(params, sampler, seed)
            for name in shapes:
                assert torch.isfinite(z[name]).all() and z[name].norm() > 0, (decay, name)
            # "c" has no momentum but still explores orthogonally to v
            assert abs(cosine(z["c"].reshape(-1), v["c"].reshape(-1))) < 1e-5
    zeros = {name: torch.zeros(shape) for name, shape in shapes.items()}
    result = zo_update(
        params,
        lambda: 1.0,
        ZoproSampler(zeros, zeros, decay=0.9),
        run_seed=0,
        update_index=0,
        eps=1e-3,
        lr=0.1,
    )
    assert (result.cos_z_mu, result.cos_z_v) == (0.0, 0.0)


# ---------------------------------------------------------------- the update


@pytest.mark.parametrize("sampler", [IsotropicSampler(), zopro_sampler()], ids=["mezo", "zopro"])
def test_perturbations_are_plus_and_minus_eps_z_and_theta_is_restored(sampler):
    params = make_params()
    theta0 = snapshot(params)
    seen: list[dict[str, Tensor]] = []

    def loss_fn() -> float:
        seen.append(snapshot(params))
        return float(len(seen))

    eps = 1e-3
    result = zo_update(params, loss_fn, sampler, run_seed=1, update_index=2, eps=eps, lr=0.0)
    z = replay_direction(params, sampler, direction_seed(1, 2, 0))
    assert len(seen) == result.forward_passes == 2
    assert max_abs_diff(seen[0], {n: theta0[n] + eps * z[n] for n in z}) < 1e-6
    assert max_abs_diff(seen[1], {n: theta0[n] - eps * z[n] for n in z}) < 1e-6
    assert max_abs_diff(params, theta0) < 1e-6
    assert result.g == pytest.approx((1.0 - 2.0) / (2 * eps))
    assert (result.loss_plus, result.loss_minus) == (1.0, 2.0)


def test_a_failing_loss_restores_theta_before_the_error_propagates():
    params = make_params()
    theta0 = snapshot(params)
    calls = []

    def loss_fn() -> float:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return 1.0

    with pytest.raises(RuntimeError, match="out of memory"):
        zo_update(params, loss_fn, IsotropicSampler(), run_seed=0, update_index=0, eps=1e-2, lr=1.0)
    assert max_abs_diff(params, theta0) < 1e-6


@pytest.mark.parametrize(
    "losses, reduce_g",
    [([math.nan, 1.0], None), ([1.0, math.inf], None), ([math.inf, math.inf], None), ([1.0, 2.0], "nan")],
    ids=["nan-loss", "inf-loss", "inf-minus-inf", "nan-on-another-rank"],
)
def test_non_finite_g_skips_the_update_and_restores_theta(losses, reduce_g):
    params, twin = make_params(), make_params()
    theta0 = snapshot(params)
    values = iter(losses)
    result = zo_update(
        params,
        lambda: next(values),
        IsotropicSampler(),
        run_seed=0,
        update_index=0,
        eps=1e-3,
        lr=10.0,
        weight_decay=0.1,
        g_clip=0.5,
        reduce_g=(lambda g: math.nan) if reduce_g == "nan" else None,
    )
    assert result.skipped and not math.isfinite(result.g) and result.forward_passes == 2
    # no update at all: theta is exactly where the restore alone leaves it (an lr=0 step with a finite loss)
    zo_update(twin, lambda: 1.0, IsotropicSampler(), run_seed=0, update_index=0, eps=1e-3, lr=0.0)
    assert all(torch.equal(params[name], twin[name]) for name in params)
    assert max_abs_diff(params, theta0) < 1e-6


def test_a_non_finite_direction_stops_the_update_before_the_next_direction():
    params = make_params()
    theta0 = snapshot(params)
    values = iter([1.0, 2.0, math.nan, 1.0, 5.0, 6.0])
    result = zo_update(
        params,
        lambda: next(values),
        IsotropicSampler(),
        run_seed=0,
        update_index=0,
        eps=1e-3,
        lr=1.0,
        directions=3,
    )
    assert result.skipped and result.forward_passes == 4
    assert max_abs_diff(params, theta0) < 1e-6  # the finite first direction was not applied either


def test_weight_decay_spares_biases_and_norms():
    shapes = {
        "proj.weight": (8, 8),
        "proj.bias": (8,),
        "input_layernorm.weight": (8,),
        "lm_head.lora_A": (2, 8),
    }
    params = make_params(shapes)
    theta0 = snapshot(params)
    lr, weight_decay = 0.1, 0.5
    result = zo_update(
        params,
        lambda: 3.0,
        IsotropicSampler(),
        run_seed=0,
        update_index=0,
        eps=1e-3,
        lr=lr,
        weight_decay=weight_decay,
    )
    assert result.g == 0.0  # a constant loss: the update is weight decay alone
    for name in ("proj.weight", "lm_head.lora_A"):
        assert torch.allclose(params[name], (1 - lr * weight_decay) * theta0[name], atol=1e-6)
    for name in ("proj.bias", "input_layernorm.weight"):
        assert torch.allclose(params[name], theta0[name], atol=1e-6)


@pytest.mark.parametrize("sampler", [IsotropicSampler(), zopro_sampler()], ids=["mezo", "zopro"])
def test_q_directions_average_the_single_direction_updates(sampler):
    params = make_params()
    theta0 = snapshot(params)
    loss = Quadratic(SHAPES)
    # the central difference is exact on a quadratic: only float32 rounding separates the two computations
    eps, lr, q = 1e-2, 0.05, 4
    result = zo_update(
        params, lambda: loss(params), sampler, run_seed=7, update_index=3, eps=eps, lr=lr, directions=q
    )

    expected = snapshot(theta0)
    single_g = []
    for i in range(q):  # each direction as its own SPSA step, by hand
        z = replay_direction(theta0, sampler, direction_seed(7, 3, i))
        loss_plus = float(loss({n: theta0[n] + eps * z[n] for n in z}))
        loss_minus = float(loss({n: theta0[n] - eps * z[n] for n in z}))
        single_g.append((loss_plus - loss_minus) / (2 * eps))
        for name in expected:
            expected[name] -= lr * single_g[-1] * z[name] / q
    assert result.g == pytest.approx(sum(single_g) / q, rel=1e-4)
    assert result.forward_passes == 2 * q and result.directions == q
    assert max_abs_diff(params, expected) < 1e-4
    assert max_abs_diff(params, theta0) > 1e-2  # the update did move theta


def test_g_clip_limits_each_g_and_reports_the_raw_one():
    params = make_params()
    theta0 = snapshot(params)
    eps, lr = 1e-3, 0.01
    result = zo_update(
        params,
        lambda: 1000.0 * float(flat(params).double().sum()),
        IsotropicSampler(),
        run_seed=0,
        update_index=0,
        eps=eps,
        lr=lr,
        g_clip=0.5,
    )
    z = replay_direction(params, IsotropicSampler(), direction_seed(0, 0, 0))
    assert result.g_raw == pytest.approx(1000.0 * float(flat(z).sum()), rel=1e-3)
    assert abs(result.g_raw) > 0.5 and result.abs_g == pytest.approx(abs(result.g_raw))
    assert result.g == math.copysign(0.5, result.g_raw) and result.clipped == 1
    assert max_abs_diff(params, {n: theta0[n] - lr * result.g * z[n] for n in z}) < 1e-6


def test_reduce_g_averages_g_across_ranks_before_the_update():
    params, twin = make_params(), make_params()
    theta0 = snapshot(params)
    loss = Quadratic(SHAPES)
    received, local = [], []

    def average_with_other_rank(g: float) -> float:  # two ranks; the other one measured g = 3.0
        received.append(g)
        return (g + 3.0) / 2

    def alone(g: float) -> float:
        local.append(g)
        return g

    common = dict(run_seed=0, update_index=0, eps=1e-2, lr=0.1, directions=2)
    result = zo_update(
        params, lambda: loss(params), IsotropicSampler(), reduce_g=average_with_other_rank, **common
    )
    zo_update(twin, lambda: loss(twin), IsotropicSampler(), reduce_g=alone, **common)
    assert received == local  # each rank hands over its own g, once per direction
    reduced = [(g + 3.0) / 2 for g in local]
    assert result.g == pytest.approx(sum(reduced) / 2)
    z = [replay_direction(theta0, IsotropicSampler(), direction_seed(0, 0, i)) for i in range(2)]
    expected = {n: theta0[n] - 0.1 * (reduced[0] * z[0][n] + reduced[1] * z[1][n]) / 2 for n in theta0}
    assert max_abs_diff(params, expected) < 1e-5


def test_cosines_with_mu_and_v_match_the_replayed_direction():
    params = make_params()
    sampler = zopro_sampler(decay=decay_at("exp", 1, 10))
    result = zo_update(params, lambda: 1.0, sampler, run_seed=4, update_index=9, eps=1e-3, lr=0.0)
    z = flat(replay_direction(params, sampler, direction_seed(4, 9, 0)))
    assert result.cos_z_mu == pytest.approx(cosine(z, flat(sampler.mu)), abs=1e-5)
    assert result.cos_z_v == pytest.approx(cosine(z, flat(sampler.v)), abs=1e-5)
    assert result.decay == pytest.approx(0.999 / math.e)
    mezo = zo_update(params, lambda: 1.0, IsotropicSampler(), run_seed=4, update_index=9, eps=1e-3, lr=0.0)
    assert (mezo.cos_z_mu, mezo.cos_z_v, mezo.decay) == (0.0, 0.0, 0.0)


def test_averaged_estimate_points_along_the_true_gradient_and_zopro_momentum_helps():
    shapes = {"a": (10, 20), "b": (100,)}
    loss = Quadratic(shapes)
    gradient = flat(loss.gradient(make_params(shapes)))

    def estimate(sampler, directions: int) -> float:
        params = make_params(shapes)
        theta0 = flat(params)
        zo_update(
            params,
            lambda: loss(params),
            sampler,
            run_seed=0,
            update_index=0,
            eps=1e-3,
            lr=1.0,
            directions=directions,
        )
        return cosine(theta0 - flat(params), gradient)  # the update is -lr * mean(g z)

    mezo_many = estimate(IsotropicSampler(), 200)
    assert mezo_many > 0.5  # ~ sqrt(q / (q + dim)) = 0.63 for q = 200, dim = 300
    # with mu the true descent direction and d near 1, ten ZOPrO probes beat ten MeZO probes by far
    negative_gradient = {name: -g for name, g in loss.gradient(make_params(shapes)).items()}
    zopro = ZoproSampler(negative_gradient, make_tensors(shapes, 12), decay=decay_at("exp", 0, 10))
    assert estimate(zopro, 10) > 0.95
    assert estimate(IsotropicSampler(), 10) < 0.5


def test_refuses_parameters_and_settings_it_cannot_handle():
    params = make_params()
    theta0 = snapshot(params)
    kwargs = dict(run_seed=0, update_index=0, eps=1e-3, lr=0.1)
    with pytest.raises(TypeError, match="bfloat16"):
        zo_update(
            {"w": nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))},
            lambda: 0.0,
            IsotropicSampler(),
            **kwargs,
        )
    shared = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="share storage"):
        zo_update({"embed": shared, "lm_head": shared}, lambda: 0.0, IsotropicSampler(), **kwargs)
    with pytest.raises(ValueError, match="eps"):
        zo_update(params, lambda: 0.0, IsotropicSampler(), **{**kwargs, "eps": 0.0})
    with pytest.raises(ValueError, match="directions"):
        zo_update(params, lambda: 0.0, IsotropicSampler(), directions=0, **kwargs)
    partial = {name: t for name, t in make_tensors(SHAPES, 3).items() if name != "scalar"}
    with pytest.raises(ValueError, match="scalar"):
        zo_update(params, lambda: 0.0, ZoproSampler(partial, partial, decay=0.5), **kwargs)
    assert all(torch.equal(params[name], theta0[name]) for name in params)  # refused before any perturbation
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        zopro_sampler(decay=1.0)
    with pytest.raises(ValueError, match="same keys"):
        ZoproSampler(partial, make_tensors(SHAPES, 3), decay=0.5)
