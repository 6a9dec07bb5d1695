"""Report a finished (or running) run's policy/reward interplay from its saved checkpoints, one at a time.

The offline counterpart of `engine.analysis.interplay` and of the paper's UMAP analysis (ZOPrO, arXiv 2503.03460),
measured in LoRA parameter space. It reads `RUN_DIR/checkpoints/<name>/adapters/{policy,reward}/
adapter_model.safetensors` for `reward` (the start: policy = sft) and `iter-0000`, `iter-0001`, ... in
order, feeding them to an `InterplayTracker`, so memory holds one checkpoint plus the tracker's four adapter
copies and low-dimensional projections, however many checkpoints there are. Per iteration i it reports the
update vectors dP_i = P_i - P_{i-1} and dR_i (norms, angle, Pearson, distance correlation on a fixed
sketch), the angles between successive updates, the velocities dP_i - dP_{i-1} and dR_i - dR_{i-1} (angle
and Pearson between them), the 2-D trajectories, and the Procrustes disparity between the two trajectories.
Used by `zopro interplay RUN_DIR [--json]`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.spatial
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor

from engine.analysis.interplay import InterplayTracker
from engine.analysis.layers import layer_sort_key
from engine.analysis.projections import derived_seed
from engine.rundir.checkpoints import adapter_file
from engine.rundir.safe_io import is_real_dir, plain_tree
from engine.training.adapter_keys import match_adapter_tensors

_ITERATION_CHECKPOINT = re.compile(r"iter-(\d+)")

# Per-iteration fields, each the tracker's global metric of the same meaning.
_PER_ITERATION_FIELDS = {
    "policy_update_norm": "interplay/policy_update_norm",
    "reward_update_norm": "interplay/reward_update_norm",
    "cos_policy_reward": "interplay/cos_policy_reward",
    "angle_policy_reward_deg": "interplay/angle_policy_reward_deg",
    "pearson_policy_reward": "interplay/pearson_policy_reward",
    "dcor": "interplay/dcor_policy_reward",
    "cos_policy_successive": "interplay/cos_policy_successive",
    "angle_policy_successive_deg": "interplay/angle_policy_successive_deg",
    "cos_reward_successive": "interplay/cos_reward_successive",
    "angle_reward_successive_deg": "interplay/angle_reward_successive_deg",
    "cos_velocity": "interplay/cos_velocity",
    "angle_velocity_deg": "interplay/angle_velocity_deg",
    "pearson_velocity": "interplay/pearson_velocity",
}
_PER_LAYER_FIELDS = (
    "cos_policy_reward",
    "angle_policy_reward_deg",
    "cos_policy_successive",
    "cos_reward_successive",
)


# -- Procrustes --------------------------------------------------------------------------------------------


def procrustes_disparity(reference: np.ndarray, target: np.ndarray) -> float:
    """The disparity of `scipy.spatial.procrustes(reference, target)`: both configurations (rows are points)
    centred and scaled to unit Frobenius norm, `target` rotated/reflected and scaled onto `reference`, the
    squared residuals summed. 0 = same shape, at most 1. ValueError (one sentence) when the shapes differ or
    a configuration has all rows equal (no shape to compare)."""
    reference = np.asarray(reference, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if reference.ndim != 2 or reference.shape != target.shape or reference.size == 0:
        raise ValueError(
            f"Procrustes needs two non-empty matrices of the same shape (got {reference.shape} and {target.shape})"
        )
    try:
        return float(scipy.spatial.procrustes(reference, target)[2])
    except ValueError:  # what is left to refuse: a configuration without two distinct points
        raise ValueError("Procrustes needs configurations with more than one distinct point") from None


def count_sketch(tensor: Tensor, key: str, dims: int, seed: int) -> np.ndarray:
    """One tensor's fixed random projection to `dims` coordinates in O(numel): each coordinate is added, with
    a random sign, to one random output coordinate (a count sketch; inner products preserved in
    expectation). Regenerated from (seed, key), like the tracker's 2-D projection."""
    generator = torch.Generator(device="cpu").manual_seed(derived_seed(seed, "procrustes", key))
    values = tensor.detach().cpu().reshape(-1).to(torch.float64)
    buckets = torch.randint(dims, (values.numel(),), generator=generator)
    signs = torch.randint(2, (values.numel(),), generator=generator).to(torch.float64) * 2 - 1
    return torch.zeros(dims, dtype=torch.float64).index_add_(0, buckets, signs * values).numpy()


def trajectory_projection(adapter: Mapping[str, Tensor], dims: int, seed: int) -> np.ndarray:
    """The whole adapter's count-sketch projection to `dims` coordinates (the sum over its tensors)."""
    return sum(
        (count_sketch(tensor, key, dims, seed) for key, tensor in sorted(adapter.items())), np.zeros(dims)
    )


# -- reading checkpoints -----------------------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """([(name, folder)] of `reward` then `iter-NNNN` in iteration order, [other checkpoint names, skipped]);
    a checkpoint that is a link or holds one (or a FIFO, a device) is skipped: never read."""
    root = Path(run_dir) / "checkpoints"
    if not is_real_dir(root):
        return [], []
    folders = [path for path in root.iterdir() if is_real_dir(path) and not path.name.startswith(".")]
    unreadable = [path for path in folders if not _holds_plain_files(path)]
    folders = [path for path in folders if path not in unreadable]
    iterations = sorted(
        (int(match.group(1)), path)
        for path in folders
        if (match := _ITERATION_CHECKPOINT.fullmatch(path.name))
    )
    ordered = [("reward", root / "reward")] if root / "reward" in folders else []
    ordered += [(path.name, path) for _, path in iterations]
    used = {name for name, _ in ordered}
    return ordered, sorted(path.name for path in folders + unreadable if path.name not in used)


def _holds_plain_files(folder: Path) -> bool:
    try:
        plain_tree(folder)
    except OSError:
        return False
    return True


def _load_adapter(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path} is missing: every checkpoint needs adapters/policy and adapters/reward")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None


def _load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The paired policy and reward tensors of one checkpoint; the `reward` checkpoint's policy is sft."""
    policy_path = adapter_file(folder, "policy")
    if not policy_path.is_file() and folder.name == "reward":
        policy_path = adapter_file(folder, "sft")
    policy = _load_adapter(policy_path)
    reward_path = adapter_file(folder, "reward")
    reward = _load_adapter(reward_path)
    match_adapter_tensors(policy, reward, str(policy_path), str(reward_path))
    return policy, reward


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return _finite(sum(present) / len(present)) if present else None


# -- the report --------------------------------------------------------------------------------------------


def build_report(
    run_dir: Path, *, sketch_size: int = 256, projection_dims: int = 64, seed: int = 0
) -> dict[str, Any]:
    """The interplay report of a run as a JSON-able dict (undefined values are None), streaming checkpoints.

    Keys: run_dir, checkpoints, skipped_checkpoints, iterations, tensors, parameters, layers, sketch_size,
    projection_dims, seed, per_iteration (one dict per iteration: iteration, checkpoint,
    previous_checkpoint, policy_update_norm, reward_update_norm, cos_policy_reward,
    angle_policy_reward_deg, pearson_policy_reward, dcor, cos/angle_policy_successive(_deg),
    cos/angle_reward_successive(_deg), cos_velocity, angle_velocity_deg, pearson_velocity, layers),
    trajectory ({"policy": [[x, y], ...], "reward": [...]}: displacement since the first checkpoint, fixed
    2-D Gaussian projection), procrustes_disparity (between the two adapters' trajectories, rows =
    checkpoints, columns = a common fixed count-sketch projection to min(projection_dims, D) coordinates;
    None when an adapter never moved), summary (means over iterations)."""
    run_dir = Path(run_dir)
    checkpoints, skipped = list_checkpoints(run_dir)
    if len(checkpoints) < 2:
        found = ", ".join(name for name, _ in checkpoints) or "none"
        raise ValueError(
            f"{run_dir} has {len(checkpoints)} usable checkpoint(s) under checkpoints/ ({found}); the interplay "
            "report needs at least 2: `reward` (or a first iteration) and a later `iter-NNNN`."
        )

    tracker: InterplayTracker | None = None
    keys: list[str] = []
    dims = 0
    per_iteration: list[dict[str, Any]] = []
    trajectory: dict[str, list[list[float]]] = {"policy": [], "reward": []}
    policy_rows: list[np.ndarray] = []
    reward_rows: list[np.ndarray] = []
    previous_name = ""
    for name, folder in checkpoints:
        policy, reward = _load_checkpoint(folder)
        if tracker is None:
            keys = sorted(policy)
            dims = min(projection_dims, sum(tensor.numel() for tensor in policy.values()))
            tracker = InterplayTracker(keys, sketch_size=sketch_size, seed=seed, trajectory_history=1)
            metrics = tracker.start(policy, reward)
        else:
            if sorted(policy) != keys:
                raise ValueError(
                    f"{folder} holds other adapter tensors than {checkpoints[0][1]}: "
                    "every checkpoint of a run must have the same LoRA modules and rank"
                )
            metrics = tracker.end_iteration(policy, reward)
            match = _ITERATION_CHECKPOINT.fullmatch(name)
            entry: dict[str, Any] = {
                "iteration": int(match.group(1)) if match else len(per_iteration),
                "checkpoint": name,
                "previous_checkpoint": previous_name,
            }
            entry.update(
                {field: _finite(metrics.get(metric)) for field, metric in _PER_ITERATION_FIELDS.items()}
            )
            entry["layers"] = {
                layer: {
                    field: _finite(metrics.get(f"interplay/{layer}/{field}")) for field in _PER_LAYER_FIELDS
                }
                for layer in tracker.layers
            }
            per_iteration.append(entry)
        for adapter in ("policy", "reward"):
            point = [metrics[f"interplay/traj_{adapter}_x"], metrics[f"interplay/traj_{adapter}_y"]]
            trajectory[adapter].append([_finite(coordinate) for coordinate in point])
        policy_rows.append(trajectory_projection(policy, dims, seed))
        reward_rows.append(trajectory_projection(reward, dims, seed))
        previous_name = name
        del policy, reward  # one checkpoint in memory at a time

    assert tracker is not None
    try:
        disparity: float | None = procrustes_disparity(np.stack(policy_rows), np.stack(reward_rows))
    except (ValueError, np.linalg.LinAlgError):
        disparity = None  # an adapter that never moved (or holds NaN) has no trajectory shape
    return {
        "run_dir": str(run_dir),
        "checkpoints": [name for name, _ in checkpoints],
        "skipped_checkpoints": skipped,
        "iterations": len(per_iteration),
        "tensors": len(keys),
        "parameters": tracker.parameter_count,
        "layers": list(tracker.layers),
        "sketch_size": min(sketch_size, tracker.parameter_count),
        "projection_dims": dims,
        "seed": seed,
        "per_iteration": per_iteration,
        "trajectory": trajectory,
        "procrustes_disparity": _finite(disparity),
        "summary": {
            "mean_angle_policy_reward_deg": _mean([row["angle_policy_reward_deg"] for row in per_iteration]),
            "mean_abs_cos_policy_reward": _mean(
                [
                    abs(row["cos_policy_reward"]) if row["cos_policy_reward"] is not None else None
                    for row in per_iteration
                ]
            ),
            "mean_cos_policy_successive": _mean([row["cos_policy_successive"] for row in per_iteration]),
            "mean_cos_reward_successive": _mean([row["cos_reward_successive"] for row in per_iteration]),
        },
    }


# -- rendering ---------------------------------------------------------------------------------------------


def _format(value: float | None, spec: str) -> str:
    if value is not None and spec == "it":
        return str(int(value) + 1)  # the file's iteration 0 is iteration 1
    return "–" if value is None else format(value, spec)


def _iteration_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Policy–reward interplay in LoRA space: {report['run_dir']}", title_justify="left")
    columns = (
        ("it", "iteration", "it"),  # read from 1, as everywhere a person reads iterations
        ("|dP|", "policy_update_norm", ".3g"),
        ("|dR|", "reward_update_norm", ".3g"),
        ("∠(dP,dR)°", "angle_policy_reward_deg", ".1f"),
        ("Pearson", "pearson_policy_reward", "+.3f"),
        ("dCor", "dcor", ".3f"),
        ("∠ dP succ°", "angle_policy_successive_deg", ".1f"),
        ("∠ dR succ°", "angle_reward_successive_deg", ".1f"),
        ("∠ velocity°", "angle_velocity_deg", ".1f"),
        ("r velocity", "pearson_velocity", "+.3f"),
    )
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in report["per_iteration"]:
        table.add_row(*(_format(row[field], spec) for _, field, spec in columns))
    return table


def _layer_table(report: dict[str, Any]) -> Table:
    table = Table(title="Per layer, mean over iterations", title_justify="left")
    for header in ("layer", "cos(dP,dR)", "∠(dP,dR)°", "cos dP succ", "cos dR succ"):
        table.add_column(header, justify="right")
    for layer in sorted(report["layers"], key=layer_sort_key):
        means = [
            _mean([row["layers"][layer][field] for row in report["per_iteration"]])
            for field in _PER_LAYER_FIELDS
        ]
        table.add_row(
            layer,
            *(
                _format(value, spec)
                for value, spec in zip(means, ("+.3f", ".1f", "+.3f", "+.3f"), strict=True)
            ),
        )
    return table


def _angle_chart(report: dict[str, Any], width: int) -> str:
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, 18)
    plt.theme("clear")
    rows = report["per_iteration"]
    for field, label, marker, color in (
        ("angle_policy_reward_deg", "∠(dP, dR)", "•", "blue"),
        ("angle_policy_successive_deg", "∠(dP_i, dP_i-1)", "+", "green"),
        ("angle_reward_successive_deg", "∠(dR_i, dR_i-1)", "x", "red"),
    ):
        points = [(row["iteration"], row[field]) for row in rows if row[field] is not None]
        if points:
            iterations, angles = zip(*points, strict=True)
            plt.plot(iterations, angles, label=label, marker=marker, color=color)
    plt.ylim(0, 180)
    plt.title("Angles between updates over iterations (90° = orthogonal)")
    plt.xlabel("iteration")
    plt.ylabel("degrees")
    return plt.build()


def _trajectory_chart(report: dict[str, Any], width: int) -> str:
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, 18)
    plt.theme("clear")
    for adapter, marker, color in (("policy", "•", "blue"), ("reward", "x", "red")):
        points = [(x, y) for x, y in report["trajectory"][adapter] if x is not None and y is not None]
        plt.plot([x for x, _ in points], [y for _, y in points], label=adapter, marker=marker, color=color)
    plt.title("Trajectories since the first checkpoint (fixed random 2-D projection)")
    return plt.build()


def render_report(report: dict[str, Any], console: Console, width: int = 100) -> None:
    """Print the report: a table per iteration, a per-layer table, the Procrustes disparity and summary, and
    terminal charts of the angles and of both trajectories (colour only where the console allows it)."""
    width = max(40, min(width, console.width))
    console.print(_iteration_table(report))
    if report["layers"] and report["per_iteration"]:
        console.print(_layer_table(report))
    summary = report["summary"]
    disparity = report["procrustes_disparity"]
    console.print(
        f"Procrustes disparity of the two trajectories: {_format(disparity, '.3f')} "
        "(0 = the same shape up to rotation and scale, 1 = unrelated)"
        + ("" if disparity is not None else "; undefined because an adapter never moved")
    )
    console.print(
        f"Mean angle(dP, dR): {_format(summary['mean_angle_policy_reward_deg'], '.1f')}°, "
        f"mean |cos(dP, dR)|: {_format(summary['mean_abs_cos_policy_reward'], '.3f')}, "
        f"mean cos of successive policy updates: {_format(summary['mean_cos_policy_successive'], '+.3f')}, "
        f"of successive reward updates: {_format(summary['mean_cos_reward_successive'], '+.3f')}."
    )
    console.print(Text.from_ansi(_angle_chart(report, width)))
    console.print(Text.from_ansi(_trajectory_chart(report, width)))
