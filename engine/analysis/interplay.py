"""Measure how the policy and reward LoRA adapters move relative to each other, live and in constant memory.

ZOPrO (arXiv 2503.03460) studied the policy/reward interplay offline, in a UMAP embedding of dozens of saved
checkpoints. Here the same relations are measured exactly in LoRA parameter space (docs/method.md section 4),
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
tracker (on any device) and the offline report (`engine.cli.interplay_report`) give the same numbers.

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
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engine.analysis.interplay_metrics import ITERATION_METRICS, LAYER_METRICS, STEP_METRICS  # noqa: F401
from engine.analysis.layers import layer_of, layer_sort_key
from engine.analysis.projections import gaussian_projection, sketch_coordinates, split_coordinates
from engine.analysis.statistics import (
    DOT_FIELDS,
    MOMENT_FIELDS,
    PairMoments,
    angle_from_cosine,
    cosine_from_sums,
    distance_correlation,
    dots,
    flat64,
    moments,
)

Vector = Tensor | np.ndarray | Sequence[float]

# -- the live tracker --------------------------------------------------------------------------------------


class TrajectoryPoint(NamedTuple):
    """Displacement of both adapters since `start` in the fixed 2-D projection; iteration -1 is the start."""

    iteration: int
    policy_x: float
    policy_y: float
    reward_x: float
    reward_y: float


class TableColumns(NamedTuple):
    """Where each part of a row of end_iteration's per-slice table lies (the parts side by side, in order)."""

    updates: slice  # PairMoments of (dP, dR)
    policy_successive: slice  # dots of (dP_i, dP_{i-1})
    reward_successive: slice  # dots of (dR_i, dR_{i-1})
    velocity: slice  # PairMoments of (dP_i - dP_{i-1}, dR_i - dR_{i-1})


def _side_by_side(*widths: int) -> list[slice]:
    ends = np.cumsum(widths).tolist()
    return [slice(end - width, end) for width, end in zip(widths, ends, strict=True)]


_COLUMNS = TableColumns(
    *_side_by_side(len(MOMENT_FIELDS), len(DOT_FIELDS), len(DOT_FIELDS), len(MOMENT_FIELDS))
)

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
            policy_xy += flat64(policy[key].detach().cpu()) @ projection
            reward_xy += flat64(reward[key].detach().cpu()) @ projection
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
        self._sketch = [indices.to(self._device()) for indices in split_coordinates(coordinates, layer_sizes)]

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
                parts = [moments(policy64, reward64)]
                if has_previous:
                    previous_policy64 = self.previous_policy_update[layer][part].double()
                    previous_reward64 = self.previous_reward_update[layer][part].double()
                    parts += [
                        dots(policy64, previous_policy64),
                        dots(reward64, previous_reward64),
                        moments(policy64 - previous_policy64, reward64 - previous_reward64),
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
            velocity = PairMoments.from_rows(table[:, _COLUMNS.velocity])
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
        updates = PairMoments.from_rows(table[:, _COLUMNS.updates])
        metrics = {
            f"{prefix}policy_update_norm": updates.norm_first,
            f"{prefix}reward_update_norm": updates.norm_second,
            f"{prefix}cos_policy_reward": updates.cosine,
            f"{prefix}angle_policy_reward_deg": angle_from_cosine(updates.cosine),
            f"{prefix}pearson_policy_reward": updates.pearson,
        }
        if has_previous:
            for adapter, columns in (
                ("policy", _COLUMNS.policy_successive),
                ("reward", _COLUMNS.reward_successive),
            ):
                sums = dict(zip(DOT_FIELDS, table[:, columns].sum(axis=0).tolist(), strict=True))
                cos = cosine_from_sums(sums["dot"], sums["sq_first"], sums["sq_second"])
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
