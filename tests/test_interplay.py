"""Policy/reward interplay: exact primitives, streamed values equal to direct ones, bounded memory, the report."""

from __future__ import annotations

import gc
import io
import math
import tracemalloc
from collections import deque

import numpy as np
import pytest
import torch
from torch import Tensor

from engine.analysis import interplay
from engine.analysis.interplay import InterplayTracker
from engine.analysis.layers import layer_of
from engine.analysis.projections import gaussian_projection, sketch_coordinates
from engine.analysis.statistics import angle_deg, cosine, distance_correlation, pearson
from engine.training.adapter_keys import adapter_views, pair_adapter_tensors

HIDDEN, RANK, VOCAB = 24, 4, 40
MODULES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def adapter_shapes(rank: int = RANK) -> dict[str, tuple[int, int]]:
    """Saved-adapter keys (peft layout) of LoRA on 3 modules of 2 layers, plus lm_head."""
    shapes = {}
    for layer in range(2):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, HIDDEN)
            shapes[f"{prefix}.lora_B.weight"] = (HIDDEN, rank)
    shapes["base_model.model.lm_head.lora_A.weight"] = (rank, HIDDEN)
    shapes["base_model.model.lm_head.lora_B.weight"] = (VOCAB, rank)
    return shapes


def random_adapter(generator: torch.Generator, scale: float = 1.0) -> dict[str, Tensor]:
    return {key: scale * torch.randn(shape, generator=generator) for key, shape in adapter_shapes().items()}


def moved(adapter: dict[str, Tensor], generator: torch.Generator, scale: float) -> dict[str, Tensor]:
    """The adapter after an update with a different mean per tensor (exercises the merged moments)."""
    return {
        key: tensor + scale * (torch.randn(tensor.shape, generator=generator) + 0.3 * index)
        for index, (key, tensor) in enumerate(adapter.items())
    }


def flat_update(after: dict[str, Tensor], before: dict[str, Tensor], keys: list[str]) -> Tensor:
    """The concatenated float32 update, as float64 (so that differences of updates are exact, as streamed)."""
    return torch.cat([(after[key].float() - before[key].float()).reshape(-1) for key in keys]).double()


def peft_named_parameters(policy: dict[str, Tensor], reward: dict[str, Tensor]) -> dict[str, Tensor]:
    """What model.named_parameters() gives for a peft model with adapters `policy` and `reward`."""
    named = {}
    for key in policy:
        module, lora, weight = key.rsplit(".", 2)
        named[f"{module}.base_layer.weight"] = torch.zeros(1)
        named[f"{module}.{lora}.policy.{weight}"] = policy[key]
        named[f"{module}.{lora}.reward.{weight}"] = reward[key]
    named["base_model.model.score.modules_to_save.reward.weight"] = torch.zeros(1, HIDDEN)
    return named


# -- primitives ----------------------------------------------------------------------------------------------


def test_cosine_and_angle_of_constructed_vectors() -> None:
    east, north = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    assert cosine(east, north) == 0.0 and angle_deg(east, north) == 90.0
    assert cosine(east, 5 * east) == 1.0 and angle_deg(east, 5 * east) == 0.0
    assert cosine(east, -2 * east) == -1.0 and angle_deg(east, -2 * east) == 180.0
    vector = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert angle_deg(vector, 3 * vector) == pytest.approx(0.0, abs=1e-5)
    assert angle_deg(vector, -0.5 * vector) == pytest.approx(180.0, abs=1e-5)
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(
        math.sqrt(0.5), rel=1e-15
    )
    # A zero vector is treated as orthogonal to everything: defined values, never NaN.
    zero = torch.zeros(3)
    assert cosine(zero, east) == 0.0 and cosine(zero, zero) == 0.0
    assert angle_deg(zero, east) == 90.0 and angle_deg(east, zero) == 90.0


def test_pearson_and_distance_correlation() -> None:
    generator = np.random.default_rng(0)
    first, second = generator.normal(size=300), generator.normal(size=300)
    mixed = first + 0.5 * second + 7.0
    assert pearson(torch.tensor(first), torch.tensor(mixed)) == pytest.approx(
        np.corrcoef(first, mixed)[0, 1], rel=1e-12
    )
    assert pearson(np.full(5, 0.1), first[:5]) == 0.0  # no variance: defined, not NaN
    assert distance_correlation([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert distance_correlation(first, -3 * first + 2) == pytest.approx(1.0)
    assert distance_correlation(np.full(4, 2.0), [1.0, 5.0, 2.0, 0.0]) == 0.0
    # x and x^2 on a symmetric sample: Pearson is blind to the dependence, distance correlation is not.
    assert abs(pearson(first, first**2)) < 0.2 and distance_correlation(first, first**2) > 0.4
    assert distance_correlation(first, second) < 0.15

    # The V-statistic, written naively: dCov^2 = mean over (j, k) of centred |x_j - x_k| times centred |y_j - y_k|.
    def naive(sample_x: list[float], sample_y: list[float]) -> float:
        def centred(sample: list[float]) -> list[list[float]]:
            n = len(sample)
            distance = [[abs(a - b) for b in sample] for a in sample]
            row = [sum(line) / n for line in distance]
            grand = sum(row) / n
            return [[distance[j][k] - row[j] - row[k] + grand for k in range(n)] for j in range(n)]

        a, b = centred(sample_x), centred(sample_y)
        n = len(sample_x)

        def mean_product(p: list[list[float]], q: list[list[float]]) -> float:
            return sum(p[j][k] * q[j][k] for j in range(n) for k in range(n)) / n**2

        return math.sqrt(mean_product(a, b) / math.sqrt(mean_product(a, a) * mean_product(b, b)))

    sample_x, sample_y = list(first[:12]), list(first[:12] ** 2 + second[:12])
    assert distance_correlation(sample_x, sample_y) == pytest.approx(naive(sample_x, sample_y), rel=1e-12)


# -- pairing -------------------------------------------------------------------------------------------------


def test_pair_adapter_tensors_pairs_by_saved_key_and_ignores_the_rest() -> None:
    generator = torch.Generator().manual_seed(0)
    policy, reward = random_adapter(generator), random_adapter(generator)
    pairs = pair_adapter_tensors(peft_named_parameters(policy, reward))
    assert [key for key, _, _ in pairs] == sorted(adapter_shapes())  # the keys of adapter_model.safetensors
    assert all(p is policy[key] and r is reward[key] for key, p, r in pairs)
    policy_view, reward_view = adapter_views(pairs)
    assert (
        policy_view.keys() == policy.keys()
        and reward_view["base_model.model.lm_head.lora_B.weight"]
        is (reward["base_model.model.lm_head.lora_B.weight"])
    )


def test_pair_adapter_tensors_refuses_unpaired_keys_and_shapes() -> None:
    generator = torch.Generator().manual_seed(0)
    policy, reward = random_adapter(generator), random_adapter(generator)
    named = peft_named_parameters(policy, reward)
    del named["base_model.model.lm_head.lora_B.reward.weight"]
    with pytest.raises(
        ValueError, match=r"1 only in adapter 'policy' \(e\.g\. base_model\.model\.lm_head\.lora_B\.weight\)"
    ):
        pair_adapter_tensors(named)

    wider = {key: torch.zeros(shape) for key, shape in adapter_shapes(rank=8).items()}
    with pytest.raises(
        ValueError, match=r"with different shapes .*lora_A\.weight: \(4, 24\) vs \(8, 24\).*same LoRA rank"
    ):
        pair_adapter_tensors(peft_named_parameters(policy, wider))
    with pytest.raises(ValueError, match="No LoRA tensors of adapters 'policy' and 'reward'"):
        pair_adapter_tensors({"model.embed_tokens.weight": torch.zeros(2)})


def test_layer_of() -> None:
    assert layer_of("base_model.model.model.layers.11.mlp.down_proj.lora_B.weight") == "layer.11"
    assert layer_of("base_model.model.transformer.h.3.attn.c_attn.lora_A.weight") == "layer.3"
    assert layer_of("base_model.model.lm_head.lora_A.weight") == "lm_head"
    assert layer_of("base_model.model.model.embed_tokens.lora_embedding_A") == "embed"
    assert layer_of("base_model.model.model.norm.lora_A.weight") == "other"


# -- the live tracker ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slice_size", [None, 7], ids=["whole-layers", "layers-in-slices-of-7"])
def test_tracker_streams_the_values_of_the_concatenated_adapters(
    slice_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if slice_size:  # large layers are processed in slices whose moments are merged: same values
        monkeypatch.setattr(interplay, "_SLICE", slice_size)
    generator = torch.Generator().manual_seed(0)
    policy0, reward0 = random_adapter(generator), random_adapter(generator)
    tracker = InterplayTracker(list(policy0), sketch_size=64, seed=3)
    assert tracker.start(policy0, reward0)["interplay/traj_policy_x"] == 0.0
    policy1, reward1 = moved(policy0, generator, 0.1), moved(reward0, generator, 0.05)
    first = tracker.end_iteration(policy1, reward1)
    policy2, reward2 = moved(policy1, generator, 0.1), moved(reward1, generator, 0.05)
    second = tracker.end_iteration(policy2, reward2)
    assert "interplay/cos_policy_successive" not in first and "interplay/angle_velocity_deg" not in first

    def expected(keys: list[str]) -> dict[str, float]:
        policy_update, reward_update = (
            flat_update(policy2, policy1, keys),
            flat_update(reward2, reward1, keys),
        )
        previous_policy, previous_reward = (
            flat_update(policy1, policy0, keys),
            flat_update(reward1, reward0, keys),
        )
        return {
            "policy_update_norm": float(policy_update.double().norm()),
            "reward_update_norm": float(reward_update.double().norm()),
            "cos_policy_reward": cosine(policy_update, reward_update),
            "angle_policy_reward_deg": angle_deg(policy_update, reward_update),
            "pearson_policy_reward": float(np.corrcoef(policy_update.double(), reward_update.double())[0, 1]),
            "cos_policy_successive": cosine(policy_update, previous_policy),
            "angle_policy_successive_deg": angle_deg(policy_update, previous_policy),
            "cos_reward_successive": cosine(reward_update, previous_reward),
            "angle_reward_successive_deg": angle_deg(reward_update, previous_reward),
            "cos_velocity": cosine(policy_update - previous_policy, reward_update - previous_reward),
            "angle_velocity_deg": angle_deg(policy_update - previous_policy, reward_update - previous_reward),
            "pearson_velocity": pearson(policy_update - previous_policy, reward_update - previous_reward),
        }

    keys = tracker.keys  # network order: the order of the concatenated adapter
    for name, value in expected(keys).items():
        assert second[f"interplay/{name}"] == pytest.approx(value, rel=1e-10, abs=1e-12), name
    for layer in ("layer.0", "layer.1", "lm_head"):
        layer_values = expected([key for key in keys if layer_of(key) == layer])
        for name in (
            "policy_update_norm",
            "reward_update_norm",
            "cos_policy_reward",
            "angle_policy_reward_deg",
        ):
            assert second[f"interplay/{layer}/{name}"] == pytest.approx(layer_values[name], rel=1e-10), (
                layer,
                name,
            )
        for name in ("pearson_policy_reward", "cos_policy_successive", "cos_reward_successive"):
            assert second[f"interplay/{layer}/{name}"] == pytest.approx(layer_values[name], rel=1e-10), (
                layer,
                name,
            )

    # Distance correlation on the fixed sketch, and the trajectory by the fixed Gaussian projection.
    policy_update, reward_update = flat_update(policy2, policy1, keys), flat_update(reward2, reward1, keys)
    sketch = sketch_coordinates(policy_update.numel(), 64, seed=3)
    assert len(sketch) == 64
    assert second["interplay/dcor_policy_reward"] == pytest.approx(
        distance_correlation(policy_update[sketch], reward_update[sketch]), rel=1e-12
    )
    projection = torch.cat([gaussian_projection(key, policy0[key].numel(), 2, seed=3) for key in keys])
    policy_xy = flat_update(policy2, policy0, keys).double() @ projection
    reward_xy = flat_update(reward2, reward0, keys).double() @ projection
    assert [second["interplay/traj_policy_x"], second["interplay/traj_policy_y"]] == pytest.approx(
        policy_xy.tolist(), rel=1e-6
    )
    assert [second["interplay/traj_reward_x"], second["interplay/traj_reward_y"]] == pytest.approx(
        reward_xy.tolist(), rel=1e-6
    )
    assert [point.iteration for point in tracker.trajectory] == [-1, 0, 1]
    assert all(math.isfinite(value) for value in second.values())


def test_tracker_steps_and_a_zero_update() -> None:
    generator = torch.Generator().manual_seed(1)
    policy, reward = random_adapter(generator), random_adapter(generator)
    keys = sorted(policy)
    tracker = InterplayTracker(keys, sketch_size=32)
    tracker.start(policy, reward)
    # The reward model does not move in iteration 0: its cosines are defined (0, i.e. 90 degrees).
    step_policies, step_metrics = [policy], []
    for _ in range(3):
        step_policies.append(moved(step_policies[-1], generator, 0.01))
        step_metrics.append(tracker.observe_policy_step(step_policies[-1]))
    metrics = tracker.end_iteration(step_policies[-1], reward)
    steps = [
        flat_update(after, before, keys)
        for before, after in zip(step_policies, step_policies[1:], strict=False)
    ]
    assert [m["interplay/step_policy_update_norm"] for m in step_metrics] == pytest.approx(
        [float(step.double().norm()) for step in steps], rel=1e-12
    )
    assert "interplay/step_cos_policy_successive" not in step_metrics[0]
    assert step_metrics[2]["interplay/step_cos_policy_successive"] == pytest.approx(
        cosine(steps[2], steps[1]), rel=1e-10
    )
    path_length = sum(float(step.double().norm()) for step in steps)
    assert metrics["interplay/policy_path_length"] == pytest.approx(path_length, rel=1e-12)
    assert metrics["interplay/policy_path_efficiency"] == pytest.approx(
        float(flat_update(step_policies[-1], policy, keys).double().norm()) / path_length, rel=1e-10
    )
    assert metrics["interplay/reward_update_norm"] == 0.0
    assert (
        metrics["interplay/cos_policy_reward"] == 0.0 and metrics["interplay/angle_policy_reward_deg"] == 90.0
    )
    assert (
        metrics["interplay/pearson_policy_reward"] == 0.0 and metrics["interplay/dcor_policy_reward"] == 0.0
    )

    # In iteration 1 each step is compared with the previous iteration's dP (and dR, zero: cosine 0).
    previous_policy_update = flat_update(step_policies[-1], policy, keys)
    next_policy = moved(step_policies[-1], generator, 0.01)
    step = tracker.observe_policy_step(next_policy)
    assert "interplay/step_cos_policy_successive" not in step  # steps are compared within an iteration
    assert step["interplay/step_cos_prev_policy_update"] == pytest.approx(
        cosine(flat_update(next_policy, step_policies[-1], keys), previous_policy_update), rel=1e-10
    )
    assert step["interplay/step_cos_prev_reward_update"] == 0.0


def test_tracker_resumes_from_its_state_dict() -> None:
    generator = torch.Generator().manual_seed(2)
    policy, reward = random_adapter(generator), random_adapter(generator)
    tracker = InterplayTracker(list(policy), sketch_size=48, seed=5)
    tracker.start(policy, reward)
    policy, reward = moved(policy, generator, 0.1), moved(reward, generator, 0.1)
    tracker.end_iteration(policy, reward)
    policy = moved(policy, generator, 0.1)
    tracker.observe_policy_step(policy)

    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)  # as a pipeline checkpoint would
    resumed = InterplayTracker(list(policy), sketch_size=48, seed=5)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))

    later_policy, later_reward = moved(policy, generator, 0.1), moved(reward, generator, 0.1)
    assert resumed.observe_policy_step(later_policy) == tracker.observe_policy_step(later_policy)
    assert resumed.end_iteration(later_policy, later_reward) == tracker.end_iteration(
        later_policy, later_reward
    )
    assert list(resumed.trajectory) == list(tracker.trajectory)

    with pytest.raises(ValueError, match="seed 5, this tracker 6"):
        InterplayTracker(list(policy), sketch_size=48, seed=6).load_state_dict(tracker.state_dict())


def _footprint(tracker: InterplayTracker) -> tuple[int, int]:
    """(bytes of every tensor and array reachable from the tracker, total length of its containers)."""
    seen: set[int] = set()
    totals = [0, 0]

    def visit(value: object) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, Tensor):
            totals[0] += value.untyped_storage().nbytes()
        elif isinstance(value, np.ndarray):
            totals[0] += value.nbytes
        elif isinstance(value, dict):
            totals[1] += len(value)
            for key, item in value.items():
                visit(key)
                visit(item)
        elif isinstance(value, (list, tuple, set, frozenset, deque)):
            totals[1] += len(value)
            for item in value:
                visit(item)
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("engine"):
            visit(vars(value))

    visit(tracker)
    return totals[0], totals[1]


def _synthetic_run(iterations: int) -> tuple[InterplayTracker, int]:
    """A tracker after `iterations` iterations of 2 observed policy steps, and its held tensor bytes."""
    generator = torch.Generator().manual_seed(4)
    policy, reward = random_adapter(generator), random_adapter(generator)
    tracker = InterplayTracker(list(policy), sketch_size=32, trajectory_history=4)
    tracker.start(policy, reward)
    for _ in range(iterations):
        for _ in range(2):
            policy = moved(policy, generator, 0.01)
            tracker.observe_policy_step(policy)
        reward = moved(reward, generator, 0.01)
        tracker.end_iteration(policy, reward)
    return tracker, tracker.held_bytes()


def test_tracker_memory_does_not_grow_with_the_run() -> None:
    _synthetic_run(3)  # warm caches and lazy imports
    retained, grown, footprints, held = {}, {}, {}, {}
    for iterations in (10, 100):
        gc.collect()
        tracemalloc.start()
        tracker, held[iterations] = _synthetic_run(iterations)
        gc.collect()
        with_tracker = grown[iterations] = tracemalloc.get_traced_memory()[0]
        footprints[iterations] = _footprint(tracker)
        del tracker
        gc.collect()
        # Python memory that lives exactly as long as the tracker (torch's own caches excluded).
        retained[iterations] = with_tracker - tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    adapter_bytes = sum(4 * math.prod(shape) for shape in adapter_shapes().values())
    assert held[10] == held[100] == 4 * adapter_bytes  # start policy, start reward, previous dP and dR
    assert footprints[100] == footprints[10]  # no container or tensor grows with iterations
    assert abs(retained[100] - retained[10]) < 4096, retained  # nor any Python object it owns
    assert grown[100] - grown[10] < 65_536, (
        grown
    )  # nor anything it leaves behind (bounds torch's cache noise)
