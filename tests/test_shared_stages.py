"""Shared stages: a run that adopts another run's SFT and reward models (`zopro run --stages-from`, and
`zopro compare`, which trains them once) is the run it would have been had it trained them itself."""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine.rundir.reader import read_events
from tests.conftest import FAST_RECIPE, zopro
from tests.runs import adapters, finished_run, metric_events

ZOPRO = (
    FAST_RECIPE
    + '\n[policy]\nmethod = "zopro"\n\n[zopro]\nsampler = "subspace"\ndirections = 2\npremise_prompts = 4\n\n[compare]\nmethods = ["rloo", "zopro"]\n'
)


@pytest.fixture
def zopro_recipe(tmp_path):
    path = tmp_path / "zopro.toml"
    path.write_text(ZOPRO)
    return path


def test_compare_trains_the_stages_once_and_each_method_is_the_run_it_would_have_been(tmp_path, zopro_recipe):
    own = tmp_path / "own"
    result = zopro("run", str(zopro_recipe), "--run-dir", str(own), "-q")
    assert result.returncode == 0, result.stderr
    result = zopro("compare", str(zopro_recipe), "--methods", "rloo,zopro", "--root", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    # piped, the second method's lines do not replay the stages it adopted as if it ran them again
    assert result.stdout.count("supervised fine-tuning") == 1
    assert "the SFT and reward stages adopted from" in result.stdout
    (folder,) = (tmp_path / "cmp").iterdir()
    shared, first = folder / "zopro", folder / "rloo"
    assert json.loads((shared / "meta.json").read_text())["stages_from"] == str(first)
    assert "stages_from" not in json.loads((first / "meta.json").read_text())
    # every metric, SFT and reward stages included, and every adapter at the end: the same as its own run's
    assert metric_events(shared) == metric_events(own)
    mine, theirs = adapters(shared, "iter-0001"), adapters(own, "iter-0001")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[key], theirs[key]) for key in mine)
    (adopted,) = [e for e in read_events(shared) if e["type"] == "resume"]
    assert adopted["stages_from"] == str(first) and "SFT and reward stages" in adopted["message"]
    kinds = [e["type"] for e in read_events(shared)]
    assert kinds.count("run_start") == 1 and kinds.count("stage_start") == kinds.count("stage_end")
    assert sorted(p.name for p in (shared / "samples").iterdir()) == sorted(
        p.name for p in (own / "samples").iterdir()
    )
    # the adopted run resumes from its own checkpoints like any other run
    status = json.loads((shared / "status.json").read_text())
    assert status["state"] == "finished"


def test_no_share_stages_trains_them_again(tmp_path, fast_recipe):
    result = zopro(
        "compare",
        str(fast_recipe),
        "--methods",
        "rloo,mezo",
        "--root",
        str(tmp_path / "cmp"),
        "-q",
        "--no-share-stages",
    )
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "cmp").iterdir()
    assert "stages_from" not in json.loads((folder / "mezo" / "meta.json").read_text())
    assert [e["type"] for e in read_events(folder / "mezo")].count("resume") == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with checkpoints (one iteration): (recipe, run directory)."""
    one_iteration = FAST_RECIPE.replace("iterations = 2", "iterations = 1")
    return finished_run(tmp_path_factory.mktemp("source"), "fast", one_iteration)


def test_a_run_with_other_sft_settings_cannot_take_them(tmp_path, finished):
    recipe, source = finished
    target = tmp_path / "other"
    result = zopro(
        "run", str(recipe), "--run-dir", str(target), "--stages-from", str(source), "--set", "sft.lr=0.01"
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "sft.lr differs" in result.stderr and str(source) in result.stderr
    assert not target.exists()
    # the policy side may differ: method, KL, iterations
    result = zopro(
        "run", str(recipe), "--run-dir", str(target), "--stages-from", str(source), "-q",
        "--set", "policy.method=mezo", "--set", "policy.kl_coef=0.2", "--set", "train.iterations=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((target / "status.json").read_text())["state"] == "finished"


def test_a_folder_that_is_not_a_finished_reward_stage_is_one_sentence(tmp_path, finished):
    recipe, _ = finished
    empty = tmp_path / "empty"
    empty.mkdir()
    result = zopro("run", str(recipe), "--run-dir", str(tmp_path / "t"), "--stages-from", str(empty))
    assert result.returncode == 2 and "not a run directory" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "t").exists()
    result = zopro("run", "--resume", str(empty), "--stages-from", str(empty))
    assert result.returncode == 2 and "--stages-from starts a new run" in result.stderr


def test_a_link_in_the_source_checkpoint_is_refused_and_nothing_is_read_through_it(tmp_path, finished):
    recipe, source = finished
    copy = tmp_path / "copy"
    os.system(f"cp -r {source} {copy}")  # noqa: S605 - a test's own folders
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    planted = copy / "checkpoints" / "reward" / "score_head.safetensors"
    planted.unlink()
    planted.symlink_to(secret)
    target = tmp_path / "target"
    result = zopro("run", str(recipe), "--run-dir", str(target), "--stages-from", str(copy))
    assert result.returncode == 2 and "score_head.safetensors is a symbolic link" in result.stderr
    assert not target.exists()
