"""The offline interplay report from saved checkpoints, and its Procrustes alignment."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.spatial
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import Tensor

from engine.analysis.statistics import angle_deg, pearson
from engine.export.interplay_report import (
    build_report,
    procrustes_disparity,
    render_report,
    trajectory_projection,
)
from engine.rundir.checkpoints import adapter_file
from tests.test_interplay import adapter_shapes, flat_update, random_adapter  # noqa: F401

# -- Procrustes and the offline report -------------------------------------------------------------------------


def test_procrustes_disparity_equals_scipy() -> None:
    generator = np.random.default_rng(0)
    for rows, columns in ((6, 5), (12, 2), (4, 64)):
        reference, target = generator.normal(size=(rows, columns)), generator.normal(size=(rows, columns))
        assert procrustes_disparity(reference, target) == pytest.approx(
            scipy.spatial.procrustes(reference, target)[2], rel=1e-10, abs=1e-14
        )
    rotation, _ = np.linalg.qr(generator.normal(size=(5, 5)))
    reference = generator.normal(size=(7, 5))
    assert procrustes_disparity(reference, 3.0 * reference @ rotation + 2.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="more than one distinct point"):
        procrustes_disparity(np.ones((3, 2)), reference[:3, :2])


def _save_checkpoint(run_dir: Path, name: str, adapters: dict[str, dict[str, Tensor]]) -> None:
    for adapter, tensors in adapters.items():
        path = adapter_file(run_dir / "checkpoints" / name, adapter)
        path.parent.mkdir(parents=True)
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path))


def _synthetic_run_dir(
    run_dir: Path, iterations: int = 4
) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Checkpoints where the policy keeps one direction and the reward moves orthogonally to it, as the
    paper found; the `reward` checkpoint has no policy folder (the report then reads sft)."""
    generator = torch.Generator().manual_seed(7)
    sft, reward = random_adapter(generator), random_adapter(generator)
    direction = {key: torch.randn(tensor.shape, generator=generator) for key, tensor in sft.items()}
    _save_checkpoint(run_dir, "reward", {"sft": sft, "reward": reward})
    states, policy = [(sft, reward)], sft
    for iteration in range(iterations):
        policy = {
            key: policy[key]
            + 0.1 * direction[key]
            + 0.01 * torch.randn(policy[key].shape, generator=generator)
            for key in sft
        }
        reward = {
            key: reward[key] + 0.05 * torch.randn(reward[key].shape, generator=generator) for key in sft
        }
        _save_checkpoint(run_dir, f"iter-{iteration:04d}", {"sft": sft, "policy": policy, "reward": reward})
        states.append((policy, reward))
    (run_dir / "checkpoints" / "resume").mkdir()  # not an iteration boundary: skipped
    (run_dir / "checkpoints" / ".tmp-iter-0009-123").mkdir()  # a crashed write: ignored
    (run_dir / "checkpoints" / "latest").write_text(f"iter-{iterations - 1:04d}\n")
    return states


def test_build_report_from_saved_checkpoints(tmp_path: Path) -> None:
    states = _synthetic_run_dir(tmp_path)
    report = build_report(tmp_path, seed=11)
    json.dumps(report, allow_nan=False)  # what `zopro interplay --json` prints
    assert report["checkpoints"] == ["reward", "iter-0000", "iter-0001", "iter-0002", "iter-0003"]
    assert report["skipped_checkpoints"] == ["resume"]
    assert report["iterations"] == 4 and report["layers"] == ["layer.0", "layer.1", "lm_head"]
    assert [row["iteration"] for row in report["per_iteration"]] == [0, 1, 2, 3]

    keys = sorted(adapter_shapes())
    first = report["per_iteration"][0]
    assert first["angle_policy_successive_deg"] is None and first["pearson_velocity"] is None
    for index, row in enumerate(report["per_iteration"]):
        (policy_before, reward_before), (policy_after, reward_after) = states[index], states[index + 1]
        policy_update = flat_update(policy_after, policy_before, keys)
        reward_update = flat_update(reward_after, reward_before, keys)
        assert row["angle_policy_reward_deg"] == pytest.approx(
            angle_deg(policy_update, reward_update), rel=1e-10
        )
        assert row["policy_update_norm"] == pytest.approx(float(policy_update.double().norm()), rel=1e-10)
        if index:
            previous_policy = flat_update(policy_before, states[index - 1][0], keys)
            previous_reward = flat_update(reward_before, states[index - 1][1], keys)
            assert row["angle_policy_successive_deg"] == pytest.approx(
                angle_deg(policy_update, previous_policy), rel=1e-10
            )
            assert row["angle_velocity_deg"] == pytest.approx(
                angle_deg(policy_update - previous_policy, reward_update - previous_reward), rel=1e-10
            )
            assert row["pearson_velocity"] == pytest.approx(
                pearson(policy_update - previous_policy, reward_update - previous_reward),
                rel=1e-10,
                abs=1e-12,
            )

    # The paper's pattern is visible: a consistent policy direction, a reward update near 90 degrees to it.
    assert report["summary"]["mean_cos_policy_successive"] > 0.9
    assert 80.0 < report["summary"]["mean_angle_policy_reward_deg"] < 100.0
    assert report["trajectory"]["policy"][0] == [0.0, 0.0] and len(report["trajectory"]["reward"]) == 5

    dims = report["projection_dims"]
    policy_rows = np.stack([trajectory_projection(policy, dims, 11) for policy, _ in states])
    reward_rows = np.stack([trajectory_projection(reward, dims, 11) for _, reward in states])
    assert dims == 64
    assert report["procrustes_disparity"] == pytest.approx(
        scipy.spatial.procrustes(policy_rows, reward_rows)[2], rel=1e-10
    )


def test_render_report_plain_and_in_colour(tmp_path: Path) -> None:
    _synthetic_run_dir(tmp_path, iterations=2)
    report = build_report(tmp_path)
    plain = Console(file=io.StringIO(), width=100, no_color=True, force_terminal=False)
    render_report(report, plain, width=100)
    text = plain.file.getvalue()
    assert "Procrustes disparity of the two trajectories" in text and "\x1b" not in text
    assert "Angles between updates" in text and "Trajectories since the first checkpoint" in text
    assert "layer.1" in text and "lm_head" in text
    colour = Console(file=io.StringIO(), width=80, force_terminal=True, color_system="truecolor")
    render_report(report, colour)
    assert "\x1b[" in colour.file.getvalue()


def test_build_report_refuses_too_few_or_unpaired_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"{tmp_path} has 0 usable checkpoint\(s\).*needs at least 2"):
        build_report(tmp_path)
    generator = torch.Generator().manual_seed(0)
    _save_checkpoint(
        tmp_path, "reward", {"sft": random_adapter(generator), "reward": random_adapter(generator)}
    )
    with pytest.raises(ValueError, match=r"has 1 usable checkpoint\(s\) under checkpoints/ \(reward\)"):
        build_report(tmp_path)
    reward = random_adapter(generator)
    del reward["base_model.model.lm_head.lora_A.weight"]
    _save_checkpoint(tmp_path, "iter-0000", {"policy": random_adapter(generator), "reward": reward})
    with pytest.raises(
        ValueError, match=r"iter-0000/adapters/reward/adapter_model\.safetensors do not pair up"
    ):
        build_report(tmp_path)
