"""The direction samplers (isotropic, zopro, subspace, block), the gradient basis, the normalised step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from engine.training.methods.zeroth_order.samplers import (
    BlockSampler,
    GradientSnapshots,
    IsotropicSampler,
    SubspaceSampler,
    ZoproSampler,
    fill_zero_norms,
    layer_blocks,
)
from engine.training.methods.zeroth_order.spsa import RunningRMS, direction_seed, replay_direction, zo_update
from tests.nano import split_flat

SHAPES = {
    "model.layers.0.q_proj.lora_A.policy.weight": (4, 16),
    "model.layers.0.q_proj.lora_B.policy.weight": (16, 4),
    "model.layers.1.q_proj.lora_A.policy.weight": (4, 16),
    "model.layers.1.q_proj.lora_B.policy.weight": (16, 4),
    "lm_head.lora_A.policy.weight": (4, 16),
}


def tensors(seed: int, scale: float = 1.0, shapes=SHAPES) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def flat(z: dict[str, Tensor]) -> Tensor:
    return torch.cat([z[name].reshape(-1) for name in sorted(z)])


def subspace(rank: int = 3, norm: float = 2.5) -> tuple[SubspaceSampler, GradientSnapshots, dict]:
    params = tensors(0)
    snapshots = GradientSnapshots(capacity=8)
    for k in range(rank):
        snapshots.add(tensors(100 + k), params)
    shapes = {n: p.shape for n, p in params.items()}
    return SubspaceSampler(snapshots.basis(), shapes, norm), snapshots, params


def test_subspace_basis_is_orthonormal_and_spans_the_snapshots():
    sampler, snapshots, _ = subspace(rank=3)
    q = sampler.basis
    assert q.shape == (sum(math.prod(s) for s in SHAPES.values()), 3)
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
    for row in snapshots.rows:  # every snapshot lies in the span
        assert torch.allclose(q @ (q.T @ row), row, atol=1e-4)


def test_subspace_directions_lie_in_the_span_have_the_fixed_norm_and_replay_by_seed():
    sampler, _, params = subspace(rank=3, norm=2.5)
    q = sampler.basis
    seen = []
    for seed in (direction_seed(0, 1, 0), direction_seed(0, 1, 1), direction_seed(0, 2, 0)):
        z = flat(replay_direction(params, sampler, seed))
        assert z.norm().item() == pytest.approx(2.5, rel=1e-5)
        assert torch.allclose(q @ (q.T @ z), z, atol=1e-5)  # inside the span
        again = flat(replay_direction(params, sampler, seed))
        assert torch.equal(z, again)  # seed replay, bit for bit
        seen.append(z)
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[0], seen[2])


def test_a_rank_deficient_set_of_snapshots_keeps_only_its_rank():
    params = tensors(0)
    snapshots = GradientSnapshots(capacity=8)
    a, b = tensors(1), tensors(2)
    for grads in (a, b, {n: 2 * a[n] - b[n] for n in a}):
        snapshots.add(grads, params)
    assert snapshots.basis().shape[1] == 2
    empty = GradientSnapshots(capacity=2)
    with pytest.raises(ValueError, match="first-order iteration"):
        empty.basis()


def test_a_truncated_basis_keeps_the_leading_singular_directions_of_the_snapshots():
    """subspace_rank = k: the k directions that hold most of the snapshots' energy, by hand from their SVD:
    two strong shared directions among six noisy snapshots come out as the two columns."""
    params = tensors(0)
    strong = [flat(tensors(1)), flat(tensors(2))]
    generator = torch.Generator().manual_seed(3)
    snapshots = GradientSnapshots(capacity=8)
    for k in range(6):
        row = (
            (k + 3) * strong[0]
            + (5 - k) * strong[1]
            + 0.05 * torch.randn(strong[0].numel(), generator=generator)
        )
        snapshots.add(split_flat(row, params), params)
    full, two = snapshots.basis(), snapshots.basis(2)
    assert full.shape[1] == 6 and two.shape[1] == 2
    assert torch.allclose(two.T @ two, torch.eye(2), atol=1e-5)
    u, s, _ = torch.linalg.svd(torch.stack(snapshots.rows, dim=1), full_matrices=False)
    assert torch.allclose(two @ two.T, u[:, :2] @ u[:, :2].T, atol=1e-5)  # the same span as by hand
    for direction in strong:  # the shared directions lie in it
        assert torch.allclose(
            two @ (two.T @ direction), direction, rtol=0, atol=0.02 * float(direction.norm())
        )
    weighted = snapshots.weighted_basis(2)
    assert weighted.shape[1] == 2 and torch.allclose(weighted.norm(dim=0), s[:2] / s[0], atol=1e-5)
    assert snapshots.basis(50).shape[1] == 6  # more than there are: all of them


def test_snapshots_keep_the_latest_and_round_trip_through_a_checkpoint():
    params = tensors(0)
    snapshots = GradientSnapshots(capacity=2)
    grads = [tensors(10 + k) for k in range(3)]
    for g in grads:
        snapshots.add(g, params)
    assert len(snapshots) == 2 and torch.equal(snapshots.rows[0], flat(grads[1]))
    restored = GradientSnapshots(capacity=1)
    restored.load_state_dict(snapshots.state_dict(), torch.device("cpu"))
    assert restored.capacity == 2 and torch.equal(restored.basis(), snapshots.basis())
    missing = {n: None for n in params}  # a tensor without a gradient counts as zeros
    snapshots.add(missing, params)
    assert snapshots.rows[-1].abs().sum() == 0


def test_block_sampler_perturbs_exactly_one_layer_block_chosen_by_the_seed():
    params = tensors(0)
    blocks = layer_blocks(list(params))
    assert [len(b) for b in blocks] == [2, 2, 1]  # layer 0, layer 1, lm_head
    assert all("layers.0." in n for n in blocks[0]) and all("layers.1." in n for n in blocks[1])
    sampler = BlockSampler(blocks)
    sampler.check(params)
    chosen = set()
    for update in range(30):
        seed = direction_seed(3, update, 0)
        z = replay_direction(params, sampler, seed)
        moved = {n for n, t in z.items() if t.abs().sum() > 0}
        assert moved == set(blocks[sampler.block_of(seed)])
        assert torch.equal(flat(z), flat(replay_direction(params, sampler, seed)))
        chosen.add(sampler.block_of(seed))
    assert chosen == {0, 1, 2}
    with pytest.raises(ValueError, match="cover"):
        BlockSampler(blocks[:2]).check(params)


def test_zopro_reference_norm_keeps_the_step_scale_under_a_shrinking_mu():
    params = tensors(0)
    v = tensors(5)
    mu = tensors(6, scale=0.1)
    reference = {n: float(t.norm()) for n, t in mu.items()}
    for shrink in (1.0, 1e-2, 1e-4):
        small = {n: t * shrink for n, t in mu.items()}
        paper = ZoproSampler(small, v, decay=0.5)
        fixed = ZoproSampler(small, v, decay=0.5, reference_norms=reference)
        seed = direction_seed(0, 0, 0)
        z_paper = replay_direction(params, paper, seed)
        z_fixed = replay_direction(params, fixed, seed)
        for name in params:
            # the paper's z is as long as the last change; the fixed one keeps the reference length
            assert z_paper[name].norm().item() == pytest.approx(reference[name] * shrink, rel=0.35)
            assert z_fixed[name].norm().item() == pytest.approx(reference[name], rel=0.35)
        # the direction along mu is unchanged by the scale
        cos = torch.nn.functional.cosine_similarity(flat(z_fixed), flat(mu), dim=0)
        assert cos > 0.3


def test_a_tensor_that_did_not_move_gets_noise_at_the_scale_of_the_others():
    shapes = {"a": (64, 64), "b": (64, 64)}
    params = tensors(0, shapes=shapes)
    mu = {"a": torch.full((64, 64), 0.01), "b": torch.zeros(64, 64)}
    v = tensors(1, shapes=shapes)
    sampler = ZoproSampler(mu, v, decay=0.0)
    z = replay_direction(params, sampler, 7)
    assert z["b"].norm().item() == pytest.approx(z["a"].norm().item(), rel=1e-5)  # not sqrt(4096) = 64
    assert z["b"].norm().item() == pytest.approx(mu["a"].norm().item(), rel=1e-5)
    assert fill_zero_norms({"a": 0.0, "b": 0.0}, {"a": 4, "b": 9}) == {"a": 2.0, "b": 3.0}


def test_normalised_step_moves_lr_times_the_norm_of_z_whatever_the_loss_scale():
    sampler, _, params = subspace(rank=3, norm=2.0)
    for loss_scale in (1e-4, 1.0, 1e4):
        theta = {n: p.clone() for n, p in params.items()}
        target = tensors(9)

        def loss(theta=theta, target=target, loss_scale=loss_scale) -> float:
            return loss_scale * float(sum(((theta[n] - target[n]) ** 2).sum() for n in theta))

        before = flat(theta)
        result = zo_update(
            theta, loss, sampler, run_seed=0, update_index=0, eps=1e-3, lr=0.1, normalizer=RunningRMS(0.9)
        )
        moved = (flat(theta) - before).norm().item()
        # first update: g / rms(g) = +-1, so the step is lr * |z| = 0.2, and step_norm reports it exactly
        assert result.g == pytest.approx(math.copysign(1.0, result.g_raw))
        assert moved == pytest.approx(0.2, rel=1e-4)
        assert result.step_norm == pytest.approx(moved, rel=1e-4)
        assert result.z_norm == pytest.approx(2.0, rel=1e-5)


def test_running_rms_is_bias_corrected_and_round_trips():
    rms = RunningRMS(0.9)
    assert rms.normalize([3.0]) == [pytest.approx(1.0)]
    out = rms.normalize([1.0, -1.0])
    assert rms.rms == pytest.approx(math.sqrt((0.9 * 0.9 * 0.1 * 9 + 0.9 * 0.1 + 0.1) / (1 - 0.9**3)))
    assert out[0] == pytest.approx(1.0 / rms.rms)
    twin = RunningRMS(0.5)
    twin.load_state_dict(rms.state_dict())
    assert twin.normalize([2.0]) == rms.normalize([2.0])


@pytest.mark.parametrize(
    "make",
    [IsotropicSampler, lambda: subspace()[0], lambda: BlockSampler(layer_blocks(list(SHAPES)))],
    ids=["isotropic", "subspace", "block"],
)
def test_step_norm_with_several_directions_is_the_exact_change(make):
    sampler = make()
    theta = tensors(0)
    before = flat(theta)
    target = tensors(3)
    result = zo_update(
        theta,
        lambda: float(sum(((theta[n] - target[n]) ** 2).sum() for n in theta)),
        sampler,
        run_seed=1,
        update_index=4,
        eps=1e-3,
        lr=1e-3,
        directions=3,
        weight_decay=0.1,
    )
    assert result.step_norm == pytest.approx((flat(theta) - before).norm().item(), rel=1e-4)


def test_isotropic_and_block_directions_can_take_the_reference_length():
    params = tensors(0)
    total = sum(p.numel() for p in params.values())
    iso = IsotropicSampler(scale=3.0 / math.sqrt(total))
    block = BlockSampler(layer_blocks(list(params)), norm=3.0)
    for seed in range(5):
        assert flat(replay_direction(params, iso, seed)).norm().item() == pytest.approx(3.0, rel=0.3)
        assert flat(replay_direction(params, block, seed)).norm().item() == pytest.approx(3.0, rel=0.3)
    plain = flat(replay_direction(params, IsotropicSampler(), 1))
    assert torch.allclose(flat(replay_direction(params, iso, 1)), plain * 3.0 / math.sqrt(total))
