"""Measure how the policy and reward LoRA adapters move relative to each other, live and in constant memory.

ZOPrO (arXiv 2503.03460) studied the policy/reward interplay offline, in a UMAP embedding of dozens of saved
checkpoints. Here the same relations are measured exactly in LoRA parameter space (method.md section 4),
over the paired tensors of the `policy` and `reward` adapters, globally and per layer:

- dP, dR: the change of the policy / reward adapter over an interval (one iteration, or one policy step);
- the cosine and angle between dP and dR, between successive dP, between successive dR;
- velocities, the changes of successive updates (dP_i - dP_{i-1}, dR_i - dR_{i-1}), with the angle and the
  Pearson correlation between the policy's and the reward's velocity;
- the Pearson correlation of dP and dR over all coordinates, and their distance correlation on a fixed
  random sketch of coordinates (distance correlation is O(n^2), so it cannot use them all);
- a 2-D trajectory of each adapter, its displacement since `start` under a fixed random Gaussian projection.

Every global or per-layer value is streamed, layer by layer, over bounded slices of the paired tensors
(float64 dot products, squared norms, and moments merged with Chan's formula), and equals up to float64
rounding the same quantity computed over the concatenated adapters (network order: `canonical_order`).
Conventions: a cosine is 0.0 when either vector is zero, so the angle is 90 degrees; a Pearson or distance
correlation is 0.0 when either side has no variance; a value that needs a previous interval (successive,
velocity) is left out of the metrics of the first one; policy steps are compared within an iteration.

Memory is bounded by the adapter, not by the run: the tracker holds the two adapters at the start of the
interval and the previous iteration's two updates (four float32 copies of one adapter), during an
iteration also the policy after the last observed step and that step's update (six at most), plus a
bounded deque of 2-D trajectory points. Projections are regenerated from the seed on the CPU, so the live
tracker (on any device) and the offline report (`engine.analysis.interplay_report`) give the same numbers.

Use in a training loop:

    pairs = pair_adapter_tensors(dict(model.named_parameters()))
    tracker = InterplayTracker([key for key, _, _ in pairs])
    policy, reward = adapter_views(pairs)  # neutral key -> live parameter
    tracker.start(policy, reward)
    ...after each policy update:       log(tracker.observe_policy_step(policy))
    ...after the reward refinement:    log(tracker.end_iteration(policy, reward))
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engine.seeds import MASK_63, digest64

Vector = Tensor | np.ndarray | Sequence[float]

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

# A variance this small relative to the mean square is float64 rounding of a constant vector.
_NEGLIGIBLE_VARIANCE = 1e-24


# -- exact primitives ----------------------------------------------------------------------------------------


def _flat64(values: Vector, device: torch.device | None = None) -> Tensor:
    if isinstance(values, Tensor):
        flat = values.detach().reshape(-1).to(torch.float64)
    else:
        flat = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1))
    return flat if device is None else flat.to(device)


def _same_size(first: Tensor, second: Tensor) -> None:
    if first.numel() != second.numel():
        raise ValueError(f"the two vectors have different sizes ({first.numel()} and {second.numel()})")


def _clamp_unit(value: float) -> float:
    return value if math.isnan(value) else max(-1.0, min(1.0, value))


def cosine_from_sums(dot: float, squared_norm_first: float, squared_norm_second: float) -> float:
    """cos = <a, b> / (|a| |b|) from the streamed sums; 0.0 when either norm is 0 (never NaN for zero norms)."""
    if squared_norm_first <= 0.0 or squared_norm_second <= 0.0:
        return 0.0
    return _clamp_unit(dot / (math.sqrt(squared_norm_first) * math.sqrt(squared_norm_second)))


def angle_from_cosine(cos: float) -> float:
    """The angle in degrees, in [0, 180], of a cosine (clamped to [-1, 1] against rounding)."""
    return math.degrees(math.acos(_clamp_unit(cos)))


def cosine(first: Vector, second: Vector) -> float:
    """Cosine of two same-size tensors, accumulated in float64; 0.0 when either norm is 0."""
    first64 = _flat64(first)
    second64 = _flat64(second, first64.device)
    _same_size(first64, second64)
    return cosine_from_sums(float(first64 @ second64), float(first64 @ first64), float(second64 @ second64))


def angle_deg(first: Vector, second: Vector) -> float:
    """Angle between two tensors in degrees, acos of `cosine`: 90.0 when either norm is 0 (a zero vector is
    treated as orthogonal to everything), 0 for parallel and 180 for anti-parallel vectors."""
    return angle_from_cosine(cosine(first, second))


def pearson(first: Vector, second: Vector) -> float:
    """Pearson correlation of the coordinates of two same-size tensors (float64); 0.0 when a variance is 0."""
    first64 = _flat64(first)
    second64 = _flat64(second, first64.device)
    _same_size(first64, second64)
    return PairMoments.from_rows(_moments(first64, second64).cpu().numpy()[None, :]).pearson


def distance_correlation(first: Vector, second: Vector) -> float:
    """Distance correlation of two 1-D samples (Szekely, Rizzo and Bakirov 2007), the V-statistic, O(n^2).

    dCor is 0 for independent samples (in the limit) and 1 for y = a x + b; unlike Pearson it also sees
    non-linear dependence. 0.0 when either sample is constant or has fewer than 2 points."""
    first64 = _flat64(first).cpu().numpy()
    second64 = _flat64(second).cpu().numpy()
    if first64.size != second64.size:
        raise ValueError(f"the two samples have different sizes ({first64.size} and {second64.size})")
    if first64.size < 2:
        return 0.0

    def centred_distances(sample: np.ndarray) -> np.ndarray:
        distances = np.abs(sample[:, None] - sample[None, :])
        return (
            distances - distances.mean(axis=0, keepdims=True) - distances.mean(axis=1, keepdims=True)
        ) + distances.mean()

    first_centred = centred_distances(first64)
    second_centred = centred_distances(second64)
    covariance_sq = float((first_centred * second_centred).mean())
    variance_first_sq = float((first_centred * first_centred).mean())
    variance_second_sq = float((second_centred * second_centred).mean())
    if variance_first_sq <= 0.0 or variance_second_sq <= 0.0:
        return 0.0
    return math.sqrt(max(covariance_sq, 0.0) / math.sqrt(variance_first_sq * variance_second_sq))


# -- streamed sums ---------------------------------------------------------------------------------------

_MOMENT_FIELDS = 9  # count, sum_first, sum_second, m2_first, m2_second, comoment, dot, sq_first, sq_second


def _moments(first: Tensor, second: Tensor) -> Tensor:
    """Per-tensor float64 moments of two flat float64 vectors, in the order of PairMoments' fields."""
    count = first.numel()
    if count == 0:
        return first.new_zeros(_MOMENT_FIELDS)
    sum_first, sum_second = first.sum(), second.sum()
    centred_first = first - sum_first / count
    centred_second = second - sum_second / count
    return torch.stack(
        [
            first.new_tensor(float(count)),
            sum_first,
            sum_second,
            centred_first @ centred_first,
            centred_second @ centred_second,
            centred_first @ centred_second,
            first @ second,
            first @ first,
            second @ second,
        ]
    )


def _dots(first: Tensor, second: Tensor) -> Tensor:
    """[<a, b>, |a|^2, |b|^2] of two flat float64 vectors."""
    return torch.stack([first @ second, first @ first, second @ second])


@dataclass(frozen=True)
class PairMoments:
    """Sums over the coordinates of two vectors, enough for their norms, cosine and Pearson correlation."""

    count: float
    sum_first: float
    sum_second: float
    m2_first: float  # sum of (a - mean a)^2
    m2_second: float
    comoment: float  # sum of (a - mean a)(b - mean b)
    dot: float
    sq_first: float
    sq_second: float

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> PairMoments:
        """Merge per-tensor rows (Chan, Golub and LeVeque's pairwise update): the moments of the concatenation."""
        counts = rows[:, 0]
        total = float(counts.sum())
        if total == 0.0:
            return cls(*([0.0] * _MOMENT_FIELDS))
        safe_counts = np.where(counts > 0, counts, 1.0)
        mean_first, mean_second = rows[:, 1].sum() / total, rows[:, 2].sum() / total
        offset_first = rows[:, 1] / safe_counts - mean_first
        offset_second = rows[:, 2] / safe_counts - mean_second
        return cls(
            count=total,
            sum_first=float(rows[:, 1].sum()),
            sum_second=float(rows[:, 2].sum()),
            m2_first=float((rows[:, 3] + counts * offset_first**2).sum()),
            m2_second=float((rows[:, 4] + counts * offset_second**2).sum()),
            comoment=float((rows[:, 5] + counts * offset_first * offset_second).sum()),
            dot=float(rows[:, 6].sum()),
            sq_first=float(rows[:, 7].sum()),
            sq_second=float(rows[:, 8].sum()),
        )

    @property
    def norm_first(self) -> float:
        return math.sqrt(self.sq_first)

    @property
    def norm_second(self) -> float:
        return math.sqrt(self.sq_second)

    @property
    def cosine(self) -> float:
        return cosine_from_sums(self.dot, self.sq_first, self.sq_second)

    @property
    def pearson(self) -> float:
        if (
            self.m2_first <= _NEGLIGIBLE_VARIANCE * self.sq_first
            or self.m2_second <= _NEGLIGIBLE_VARIANCE * self.sq_second
        ):
            return 0.0
        return _clamp_unit(self.comoment / (math.sqrt(self.m2_first) * math.sqrt(self.m2_second)))


# -- pairing the two adapters ------------------------------------------------------------------------------


def neutral_key(name: str, adapter: str) -> str | None:
    """The parameter name without its adapter segment (`...lora_A.policy.weight` -> `...lora_A.weight`, the
    key peft writes in adapter_model.safetensors), or None when `name` is not a LoRA tensor of `adapter`."""
    key, found = re.subn(rf"(\.lora_[^.]+)\.{re.escape(adapter)}(?=\.|$)", r"\1", name)
    return key if found else None


def match_adapter_tensors(
    policy_by_key: Mapping[str, Tensor],
    reward_by_key: Mapping[str, Tensor],
    policy_source: str = "the policy adapter",
    reward_source: str = "the reward adapter",
) -> list[tuple[str, Tensor, Tensor]]:
    """Pair two adapters' tensors by key, sorted by key; ValueError naming the first unpaired keys or shapes."""
    only_policy = sorted(set(policy_by_key) - set(reward_by_key))
    only_reward = sorted(set(reward_by_key) - set(policy_by_key))
    common = sorted(set(policy_by_key) & set(reward_by_key))
    mismatched = [key for key in common if policy_by_key[key].shape != reward_by_key[key].shape]
    problems = []
    if only_policy:
        problems.append(f"{len(only_policy)} only in {policy_source} (e.g. {', '.join(only_policy[:3])})")
    if only_reward:
        problems.append(f"{len(only_reward)} only in {reward_source} (e.g. {', '.join(only_reward[:3])})")
    if mismatched:
        examples = ", ".join(
            f"{key}: {tuple(policy_by_key[key].shape)} vs {tuple(reward_by_key[key].shape)}"
            for key in mismatched[:3]
        )
        problems.append(f"{len(mismatched)} paired with different shapes (e.g. {examples})")
    if problems:
        raise ValueError(
            f"The tensors of {policy_source} and {reward_source} do not pair up key by key: "
            f"{'; '.join(problems)}. Both adapters must target the same modules with the same LoRA rank."
        )
    if not common:
        raise ValueError(f"{policy_source} and {reward_source} have no LoRA tensors to pair.")
    return [(key, policy_by_key[key], reward_by_key[key]) for key in common]


def pair_adapter_tensors(
    named_tensors: Mapping[str, Tensor], policy: str = "policy", reward: str = "reward"
) -> list[tuple[str, Tensor, Tensor]]:
    """Pair the LoRA tensors of two adapters of one peft model by neutral key: (key, policy, reward), sorted.

    Tensors that belong to neither adapter's LoRA (base weights, other adapters, a `modules_to_save` score
    head) are ignored. ValueError when a LoRA tensor has no counterpart or the shapes differ."""
    if policy == reward:
        raise ValueError(f"the policy and reward adapters must have different names (both are {policy!r})")
    policy_by_key: dict[str, Tensor] = {}
    reward_by_key: dict[str, Tensor] = {}
    for name, tensor in named_tensors.items():
        if (key := neutral_key(name, policy)) is not None:
            policy_by_key[key] = tensor
        elif (key := neutral_key(name, reward)) is not None:
            reward_by_key[key] = tensor
    if not policy_by_key and not reward_by_key:
        examples = ", ".join(list(named_tensors)[:3]) or "none"
        raise ValueError(
            f"No LoRA tensors of adapters {policy!r} and {reward!r} among {len(named_tensors)} tensors "
            f"(e.g. {examples}); expected names like ...q_proj.lora_A.{policy}.weight."
        )
    return match_adapter_tensors(policy_by_key, reward_by_key, f"adapter {policy!r}", f"adapter {reward!r}")


def adapter_views(pairs: Sequence[tuple[str, Tensor, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split pairs into the {key: policy tensor} and {key: reward tensor} dicts the tracker reads."""
    return {key: policy for key, policy, _ in pairs}, {key: reward for key, _, reward in pairs}


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(key: str) -> str:
    """The layer a tensor belongs to: "layer.<i>" for a transformer block, "lm_head", "embed" or "other"."""
    if match := _LAYER_INDEX.search(f".{key}"):
        return f"layer.{int(match.group(1))}"
    segments = key.split(".")
    if "lm_head" in segments or "embed_out" in segments:
        return "lm_head"
    if any("embed" in segment or segment in ("wte", "wpe") for segment in segments):
        return "embed"
    return "other"


def layer_sort_key(layer: str) -> tuple[int, int]:
    """Order layers as in the network: embed, layer.0, layer.1, ..., lm_head, other."""
    if layer.startswith("layer."):
        return (1, int(layer.split(".", 1)[1]))
    return ({"embed": 0, "lm_head": 2}.get(layer, 3), 0)


# -- fixed random projections and sketches -----------------------------------------------------------------


def derived_seed(seed: int, purpose: str, key: str = "") -> int:
    """A 63-bit seed that is a pure function of (seed, purpose, key), stable across runs and machines."""
    return digest64(f"{seed}/{purpose}/{key}") & MASK_63


def gaussian_projection(key: str, numel: int, dims: int, seed: int) -> Tensor:
    """The fixed (numel, dims) float64 N(0, 1/dims) projection of one tensor, regenerated on the CPU from
    (seed, key) so no D x dims matrix is stored and every device gets the same one; E|x G|^2 = |x|^2."""
    generator = torch.Generator(device="cpu").manual_seed(derived_seed(seed, "trajectory", key))
    return torch.randn(numel, dims, generator=generator, dtype=torch.float64) / math.sqrt(dims)


def sketch_coordinates(total: int, sketch_size: int, seed: int) -> np.ndarray:
    """A fixed random subset of min(sketch_size, total) coordinates of the concatenated adapter (keys in
    sorted order), as sorted indices; chosen once from the seed."""
    rng = np.random.Generator(np.random.PCG64(derived_seed(seed, "sketch")))
    return np.sort(rng.choice(total, size=min(sketch_size, total), replace=False))


def _split_coordinates(coordinates: np.ndarray, numels: Sequence[int]) -> list[Tensor]:
    offsets = np.cumsum([0, *numels])
    owners = np.searchsorted(offsets, coordinates, side="right") - 1
    return [torch.as_tensor(coordinates[owners == index] - offsets[index]) for index in range(len(numels))]


# -- the live tracker --------------------------------------------------------------------------------------


class TrajectoryPoint(NamedTuple):
    """Displacement of both adapters since `start` in the fixed 2-D projection; iteration -1 is the start."""

    iteration: int
    policy_x: float
    policy_y: float
    reward_x: float
    reward_y: float


# Columns of the per-slice table built by end_iteration.
_UPDATES = slice(0, 9)  # moments of (dP, dR)
_POLICY_SUCCESSIVE = slice(9, 12)  # dots of (dP_i, dP_{i-1})
_REWARD_SUCCESSIVE = slice(12, 15)  # dots of (dR_i, dR_{i-1})
_VELOCITY = slice(15, 24)  # moments of (dP_i - dP_{i-1}, dR_i - dR_{i-1})

# Float64 work runs on slices of at most this many coordinates, bounding the temporary memory (~64 MB).
_SLICE = 1 << 20

_HELD = ("start_policy", "start_reward", "previous_policy_update", "previous_reward_update")
_HELD_DURING_ITERATION = ("step_policy", "previous_step_update")


def canonical_order(keys: Iterable[str]) -> list[str]:
    """Keys in network order (by layer, then by name): the order of the concatenated adapter."""
    return sorted(set(keys), key=lambda key: (layer_sort_key(layer_of(key)), key))


def _slices(length: int) -> list[slice]:
    return [slice(begin, min(begin + _SLICE, length)) for begin in range(0, length, _SLICE)]


def _put(held: list[Tensor], layer: int, vector: Tensor) -> None:
    """Replace one layer's held vector (appending while an empty list is filled layer by layer)."""
    if layer < len(held):
        held[layer] = vector
    else:
        held.append(vector)


class InterplayTracker:
    """Live policy/reward interplay over intervals (policy steps, iterations) in memory bounded by the adapter.

    The held copies are float32 vectors, one per layer (its tensors concatenated in key order), on the
    device of the adapter passed to `start`; every call does a few dozen vector operations per layer."""

    def __init__(
        self,
        pair_keys: Iterable[str],
        sketch_size: int = 256,
        seed: int = 0,
        trajectory_history: int = 10_000,
    ) -> None:
        self.keys = canonical_order(pair_keys)
        if not self.keys:
            raise ValueError("the interplay tracker needs at least one paired adapter tensor")
        if sketch_size < 2:
            raise ValueError(f"sketch_size must be at least 2 (got {sketch_size})")
        self.sketch_size = sketch_size
        self.seed = seed
        self.layers: list[str] = []
        self.layer_keys: list[list[str]] = []  # keys of each layer, in canonical order
        for key in self.keys:
            if not self.layers or layer_of(key) != self.layers[-1]:
                self.layers.append(layer_of(key))
                self.layer_keys.append([])
            self.layer_keys[-1].append(key)
        self.trajectory: deque[TrajectoryPoint] = deque(maxlen=trajectory_history)
        self._reset()

    def _reset(self) -> None:
        self.iteration = 0  # iterations ended so far
        self.shapes: dict[str, torch.Size] = {}
        # Per layer, flat float32: the adapters at the start of the iteration, the last iteration's dP and dR.
        self.start_policy: list[Tensor] = []
        self.start_reward: list[Tensor] = []
        self.previous_policy_update: list[Tensor] = []
        self.previous_reward_update: list[Tensor] = []
        # During an iteration: the policy after the last observed step (empty: start_policy) and that step.
        self.step_policy: list[Tensor] = []
        self.previous_step_update: list[Tensor] = []
        self.steps = 0  # observed in the current iteration
        self.path_length = 0.0  # sum of their norms
        self.origin_policy_xy = np.zeros(2)
        self.origin_reward_xy = np.zeros(2)
        self._sketch: list[Tensor] = []  # per layer, indices into its flat vector
        self.trajectory.clear()

    @property
    def started(self) -> bool:
        return bool(self.start_policy)

    @property
    def parameter_count(self) -> int:
        """D, the number of coordinates of one adapter (known once started)."""
        return sum(shape.numel() for shape in self.shapes.values())

    def held_bytes(self) -> int:
        """Bytes of the adapter copies held now: four float32 copies, six during an observed iteration."""
        return sum(
            tensor.numel() * tensor.element_size()
            for name in (*_HELD, *_HELD_DURING_ITERATION)
            for tensor in getattr(self, name)
        )

    # -- inputs --------------------------------------------------------------------------------------------

    def _check(self, tensors: Mapping[str, Tensor], which: str) -> None:
        missing = [key for key in self.keys if key not in tensors]
        if missing:
            raise ValueError(
                f"the {which} tensors lack {len(missing)} tracked key(s), e.g. {', '.join(missing[:3])}"
            )
        wrong = [key for key in self.shapes if tensors[key].shape != self.shapes[key]]
        if wrong:
            key = wrong[0]
            raise ValueError(
                f"the {which} tensor {key} has shape {tuple(tensors[key].shape)}, "
                f"the tracker holds {tuple(self.shapes[key])}"
            )

    def _device(self) -> torch.device:
        return self.start_policy[0].device

    def _flatten(
        self, tensors: Mapping[str, Tensor], layer: int, device: torch.device | None = None
    ) -> Tensor:
        """One layer's tensors as a new flat float32 vector (on the held device unless given)."""
        device = device or self._device()
        return torch.cat(
            [tensors[key].detach().reshape(-1).to(device, torch.float32) for key in self.layer_keys[layer]]
        )

    def _follow_device(self, device: torch.device) -> None:
        """Move the held copies to the device of the live adapter (after a resume onto another device)."""
        if self._device() == device:
            return
        for name in (*_HELD, *_HELD_DURING_ITERATION):
            setattr(self, name, [tensor.to(device) for tensor in getattr(self, name)])
        self._sketch = [indices.to(device) for indices in self._sketch]

    def _project(self, policy: Mapping[str, Tensor], reward: Mapping[str, Tensor]) -> tuple[np.ndarray, ...]:
        """Both adapters' positions under the fixed 2-D Gaussian projection (computed on the CPU)."""
        policy_xy = torch.zeros(2, dtype=torch.float64)
        reward_xy = torch.zeros(2, dtype=torch.float64)
        for key in self.keys:
            projection = gaussian_projection(key, policy[key].numel(), 2, self.seed)
            policy_xy += _flat64(policy[key].detach().cpu()) @ projection
            reward_xy += _flat64(reward[key].detach().cpu()) @ projection
        return policy_xy.numpy(), reward_xy.numpy()

    def _trajectory_metrics(
        self, iteration: int, policy_xy: np.ndarray, reward_xy: np.ndarray
    ) -> dict[str, float]:
        policy_shift = policy_xy - self.origin_policy_xy
        reward_shift = reward_xy - self.origin_reward_xy
        point = TrajectoryPoint(iteration, *map(float, policy_shift), *map(float, reward_shift))
        self.trajectory.append(point)
        return {
            "interplay/traj_policy_x": point.policy_x,
            "interplay/traj_policy_y": point.policy_y,
            "interplay/traj_reward_x": point.reward_x,
            "interplay/traj_reward_y": point.reward_y,
        }

    def _build_sketch(self) -> None:
        layer_sizes = [int(tensor.numel()) for tensor in self.start_policy]
        coordinates = sketch_coordinates(sum(layer_sizes), self.sketch_size, self.seed)
        self._sketch = [
            indices.to(self._device()) for indices in _split_coordinates(coordinates, layer_sizes)
        ]

    def _require_started(self) -> None:
        if not self.started:
            raise RuntimeError("InterplayTracker.start(policy, reward) must be called first")

    # -- intervals -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def start(self, policy: Mapping[str, Tensor], reward: Mapping[str, Tensor]) -> dict[str, float]:
        """Begin tracking from these adapters (the origin of the trajectory); returns the origin point."""
        self._reset()
        self._check(policy, "policy")
        self._check(reward, "reward")
        for key in self.keys:
            if policy[key].shape != reward[key].shape:
                raise ValueError(
                    f"policy and reward tensors {key} differ in shape: "
                    f"{tuple(policy[key].shape)} vs {tuple(reward[key].shape)}"
                )
        self.shapes = {key: policy[key].shape for key in self.keys}
        device = policy[self.keys[0]].device
        self.start_policy = [self._flatten(policy, layer, device) for layer in range(len(self.layers))]
        self.start_reward = [self._flatten(reward, layer, device) for layer in range(len(self.layers))]
        self._build_sketch()
        self.origin_policy_xy, self.origin_reward_xy = self._project(policy, reward)
        return self._trajectory_metrics(-1, self.origin_policy_xy, self.origin_reward_xy)

    @torch.no_grad()
    def observe_policy_step(self, policy: Mapping[str, Tensor]) -> dict[str, float]:
        """After one policy update: the step's norm and its cosine with the previous step's update (within
        the iteration) and with the previous iteration's dP and dR."""
        self._require_started()
        self._check(policy, "policy")
        self._follow_device(policy[self.keys[0]].device)
        has_previous_step = bool(self.previous_step_update)
        has_previous_iteration = bool(self.previous_policy_update)
        rows = []
        for layer in range(len(self.layers)):
            current = self._flatten(policy, layer)
            step_update = current - (self.step_policy if has_previous_step else self.start_policy)[layer]
            for part in _slices(step_update.numel()):
                step64 = step_update[part].double()
                # [|s|^2, then <s, other>, |other|^2 for each earlier update to compare the step with]
                row = [(step64 @ step64).reshape(1)]
                earlier = []
                if has_previous_step:
                    earlier.append(self.previous_step_update[layer])
                if has_previous_iteration:
                    earlier += [self.previous_policy_update[layer], self.previous_reward_update[layer]]
                for other in earlier:
                    other64 = other[part].double()
                    row.append(torch.stack([step64 @ other64, other64 @ other64]))
                rows.append(torch.cat(row))
            _put(self.step_policy, layer, current)
            _put(self.previous_step_update, layer, step_update)
        sums = torch.stack(rows).sum(dim=0).cpu().tolist()
        step_sq = sums.pop(0)
        step_norm = math.sqrt(step_sq)
        self.steps += 1
        self.path_length += step_norm
        metrics = {"interplay/step_policy_update_norm": step_norm}
        names = ["interplay/step_cos_policy_successive"] if has_previous_step else []
        if has_previous_iteration:
            names += ["interplay/step_cos_prev_policy_update", "interplay/step_cos_prev_reward_update"]
        for name in names:
            dot, other_sq = sums.pop(0), sums.pop(0)
            metrics[name] = cosine_from_sums(dot, step_sq, other_sq)
        return metrics

    @torch.no_grad()
    def end_iteration(self, policy: Mapping[str, Tensor], reward: Mapping[str, Tensor]) -> dict[str, float]:
        """Close the iteration: metrics of dP = policy - start and dR = reward - start (global and per layer),
        then these adapters become the next iteration's start."""
        self._require_started()
        self._check(policy, "policy")
        self._check(reward, "reward")
        self._follow_device(policy[self.keys[0]].device)
        has_previous = bool(self.previous_policy_update)
        self.step_policy, self.previous_step_update = [], []  # steps are compared within an iteration
        rows, row_layers, policy_sketch, reward_sketch = [], [], [], []
        for layer in range(len(self.layers)):
            current_policy, current_reward = self._flatten(policy, layer), self._flatten(reward, layer)
            policy_update = current_policy - self.start_policy[layer]
            reward_update = current_reward - self.start_reward[layer]
            for part in _slices(policy_update.numel()):
                policy64, reward64 = policy_update[part].double(), reward_update[part].double()
                parts = [_moments(policy64, reward64)]
                if has_previous:
                    previous_policy64 = self.previous_policy_update[layer][part].double()
                    previous_reward64 = self.previous_reward_update[layer][part].double()
                    parts += [
                        _dots(policy64, previous_policy64),
                        _dots(reward64, previous_reward64),
                        _moments(policy64 - previous_policy64, reward64 - previous_reward64),
                    ]
                rows.append(torch.cat(parts))
                row_layers.append(layer)
            policy_sketch.append(policy_update[self._sketch[layer]])
            reward_sketch.append(reward_update[self._sketch[layer]])
            # These adapters start the next iteration and this update becomes the previous one, layer by
            # layer, so that no more than one layer's extra copies exist at any time.
            self.start_policy[layer], self.start_reward[layer] = current_policy, current_reward
            _put(self.previous_policy_update, layer, policy_update)
            _put(self.previous_reward_update, layer, reward_update)
        table = torch.stack(rows).cpu().numpy()
        row_layers_array = np.array(row_layers)

        metrics = self._group_metrics(table, has_previous, "interplay/")
        if has_previous:
            velocity = PairMoments.from_rows(table[:, _VELOCITY])
            metrics["interplay/cos_velocity"] = velocity.cosine
            metrics["interplay/angle_velocity_deg"] = angle_from_cosine(velocity.cosine)
            metrics["interplay/pearson_velocity"] = velocity.pearson
        metrics["interplay/dcor_policy_reward"] = distance_correlation(
            torch.cat(policy_sketch), torch.cat(reward_sketch)
        )
        if self.steps:
            metrics["interplay/policy_steps"] = float(self.steps)
            metrics["interplay/policy_path_length"] = self.path_length
            efficiency = (
                metrics["interplay/policy_update_norm"] / self.path_length if self.path_length else 0.0
            )
            metrics["interplay/policy_path_efficiency"] = efficiency
        for layer, name in enumerate(self.layers):
            layer_metrics = self._group_metrics(table[row_layers_array == layer], has_previous, "")
            metrics.update(
                {
                    f"interplay/{name}/{field}": layer_metrics[field]
                    for field in LAYER_METRICS
                    if field in layer_metrics
                }
            )
        metrics.update(self._trajectory_metrics(self.iteration, *self._project(policy, reward)))

        self.steps, self.path_length = 0, 0.0
        self.iteration += 1
        return metrics

    @staticmethod
    def _group_metrics(table: np.ndarray, has_previous: bool, prefix: str) -> dict[str, float]:
        updates = PairMoments.from_rows(table[:, _UPDATES])
        metrics = {
            f"{prefix}policy_update_norm": updates.norm_first,
            f"{prefix}reward_update_norm": updates.norm_second,
            f"{prefix}cos_policy_reward": updates.cosine,
            f"{prefix}angle_policy_reward_deg": angle_from_cosine(updates.cosine),
            f"{prefix}pearson_policy_reward": updates.pearson,
        }
        if has_previous:
            for adapter, columns in (("policy", _POLICY_SUCCESSIVE), ("reward", _REWARD_SUCCESSIVE)):
                dot, current_sq, previous_sq = table[:, columns].sum(axis=0)
                cos = cosine_from_sums(float(dot), float(current_sq), float(previous_sq))
                metrics[f"{prefix}cos_{adapter}_successive"] = cos
                metrics[f"{prefix}angle_{adapter}_successive_deg"] = angle_from_cosine(cos)
        return metrics

    # -- checkpointing -------------------------------------------------------------------------------------

    def _by_key(self, flat_layers: list[Tensor]) -> dict[str, Tensor]:
        """Per-layer flat vectors as {key: CPU tensor of the key's shape} (a new copy)."""
        tensors = {}
        for keys, flat in zip(self.layer_keys, flat_layers, strict=True):
            pieces = flat.detach().cpu().split([self.shapes[key].numel() for key in keys])
            tensors.update(
                {
                    key: piece.reshape(self.shapes[key]).clone()
                    for key, piece in zip(keys, pieces, strict=True)
                }
            )
        return tensors

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; tensors per key on the CPU (copies: later updates do not alter it)."""
        state: dict[str, Any] = {
            "keys": list(self.keys),
            "sketch_size": self.sketch_size,
            "seed": self.seed,
            "iteration": self.iteration,
            "steps": self.steps,
            "path_length": self.path_length,
            "origin_policy_xy": self.origin_policy_xy.tolist(),
            "origin_reward_xy": self.origin_reward_xy.tolist(),
            "trajectory": [tuple(point) for point in self.trajectory],
        }
        for name in (*_HELD, *_HELD_DURING_ITERATION):
            state[name] = self._by_key(getattr(self, name)) if getattr(self, name) else {}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by `state_dict`; ValueError if it was saved for other keys, seed or sketch."""
        if sorted(state["keys"]) != sorted(self.keys):
            unknown = sorted(set(state["keys"]) ^ set(self.keys))
            raise ValueError(
                f"the saved interplay state tracks other adapter tensors (e.g. {', '.join(unknown[:3])})"
            )
        for setting in ("seed", "sketch_size"):
            if state[setting] != getattr(self, setting):
                raise ValueError(
                    f"the saved interplay state has {setting} {state[setting]}, "
                    f"this tracker {getattr(self, setting)}"
                )
        self._reset()
        if state["start_policy"]:
            self.shapes = {key: state["start_policy"][key].shape for key in self.keys}
        for name in (*_HELD, *_HELD_DURING_ITERATION):
            by_key = state[name]
            if by_key:
                setattr(
                    self,
                    name,
                    [
                        torch.cat([by_key[key].reshape(-1).to(torch.float32) for key in keys])
                        for keys in self.layer_keys
                    ],
                )
        self.iteration = int(state["iteration"])
        self.steps = int(state["steps"])
        self.path_length = float(state["path_length"])
        self.origin_policy_xy = np.asarray(state["origin_policy_xy"], dtype=np.float64)
        self.origin_reward_xy = np.asarray(state["origin_reward_xy"], dtype=np.float64)
        self.trajectory.extend(TrajectoryPoint(*point) for point in state["trajectory"])
        if self.started:
            self._build_sketch()
