"""Hardening, third pass (issue 20), items 9-14, 18, 20 and 21: bad own data, damaged models and caches,
impossible run paths, a run killed before it started, duplicate compare methods, a lowered iteration count
and quiet resumes, each refused or reported in one sentence with the real command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.rundir.controls import send_control
from engine.training.models import ModelError, build_builtin, load_preference_model
from tests.conftest import FAST_RECIPE, REPO, zopro, zopro_popen
from tests.runs import wait_for

CORPUS = [f"a short line number {i} about cats and dogs" for i in range(120)]


def one_sentence(result, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def own_data(folder: Path, extra: bytes = b"") -> Path:
    path = folder / "own.jsonl"
    rows = [
        {"prompt": f"question {i} about cats?", "chosen": f"kind answer {i}", "rejected": "no"}
        for i in range(30)
    ]
    path.write_bytes(b"".join(json.dumps(row).encode() + b"\n" for row in rows) + extra)
    return path


# -- 9. a 10 MB cell does not stall the built-in tokenizer -----------------------------------------------
@pytest.mark.slow
def test_9_a_huge_cell_does_not_stall_building_the_builtin_model(tmp_path):
    script = (
        "import random, sys; from pathlib import Path; from engine.training.models import build_builtin; "
        "cell = ''.join(random.Random(0).choices('abcdefghijklmnopqrstuvwxyz', k=10_000_000)); "
        f"build_builtin('nano', {CORPUS!r} + [cell], 0, Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, timeout=180, capture_output=True
    )
    assert done.returncode == 0, done.stderr


# -- 10. invalid UTF-8 in own data ----------------------------------------------------------------------
def test_10_invalid_utf8_in_own_data_is_one_sentence(tmp_path):
    from engine.data.preference_data import DataError, PreferenceSource, load_preferences

    path = own_data(tmp_path, b'{"prompt": "bad \xff\xfe", "chosen": "x", "rejected": "y"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as caught:
        load_preferences(PreferenceSource(format="preference_table", path=str(path)))
    assert str(path) in str(caught.value)


# -- 11. damaged model folders ------------------------------------------------------------------------------
def load(base: Path):
    return load_preference_model(
        str(base), dtype="float32", device="cpu", lora_rank=2, lora_alpha=4, target_modules=["q_proj"], seed=0
    )


def test_11_a_damaged_builtin_cache_or_local_base_is_one_sentence(tmp_path):
    built = build_builtin("nano", CORPUS, 0, tmp_path / "cache")
    local = tmp_path / "local"
    shutil.copytree(built, local)
    with open(built / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ModelError, match="remove .* built again"):
        load(built)
    (local / "config.json").write_text("[1, 2]\n")
    with pytest.raises(ModelError, match="model.base") as caught:
        load(local)
    assert "damaged" in str(caught.value)


# -- 12. an unwritable model cache ----------------------------------------------------------------------------
def test_12_an_unwritable_cache_is_one_sentence(tmp_path, fast_recipe):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    env_cache = os.environ["ZOPRO_CACHE"]
    os.environ["ZOPRO_CACHE"] = str(blocker / "cache")
    try:
        result = zopro("run", str(fast_recipe), "--run-dir", str(tmp_path / "run"), "-q")
    finally:
        os.environ["ZOPRO_CACHE"] = env_cache
    one_sentence(result, "ZOPRO_CACHE")
    assert not (tmp_path / "run").exists(), "a run folder was left behind"


# -- 13. run folders whose paths the system cannot hold -----------------------------------------------------
@pytest.mark.parametrize("kind", ["long name", "long path"])
def test_13_an_impossible_run_dir_is_refused_before_training(tmp_path, fast_recipe, kind):
    folder = tmp_path / ("n" * 300) if kind == "long name" else tmp_path.joinpath(*["d" * 200] * 20)
    result = zopro("run", str(fast_recipe), "--run-dir", str(folder), "-q")
    one_sentence(result, "--run-dir")
    assert not (tmp_path / ("d" * 200)).exists()


# -- 14. killed between the lock and recipe.toml ---------------------------------------------------------
@pytest.mark.slow
def test_14_a_run_killed_before_its_recipe_is_started_again_in_its_folder(tmp_path, fast_recipe):
    run = tmp_path / "run"
    process = zopro_popen("run", str(fast_recipe), "--run-dir", str(run), "-q")
    wait_for(lambda: (run / "lock").exists() or process.poll() is not None, every=0.01)
    assert not (run / "recipe.toml").exists()
    process.send_signal(signal.SIGKILL)  # SIGINT and SIGTERM there let the lock go (test_p54)
    process.communicate(timeout=120)
    assert not (run / "recipe.toml").exists()
    resumed = zopro("run", "--resume", str(run))
    one_sentence(resumed, "--run-dir")
    again = zopro("run", str(fast_recipe), "--run-dir", str(run), "-q")
    assert again.returncode == 0, again.stderr


# -- 18. the same method twice ----------------------------------------------------------------------------
def test_18_compare_with_a_method_twice_is_refused_before_training(tmp_path, fast_recipe):
    result = zopro("compare", str(fast_recipe), "--methods", "rloo,rloo", "--root", str(tmp_path / "runs"))
    one_sentence(result, "rloo")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- 20 and 21: lowered iterations, and a quiet resume that skips a damaged checkpoint ----------------------
@pytest.mark.slow
def test_20_lowered_iterations_are_refused_and_a_quiet_resume_names_what_it_skips(tmp_path):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE.replace("updates_per_iteration = 4", "updates_per_iteration = 6"))
    run = tmp_path / "run"
    process = zopro_popen("run", str(recipe), "--run-dir", str(run), "-q")

    def in_iteration_1() -> bool:
        try:
            status = json.loads((run / "status.json").read_text())
        except (OSError, ValueError):
            return process.poll() is not None
        return status.get("iteration") == 1 and status.get("step", 0) >= 1

    wait_for(in_iteration_1, timeout=600, every=0.05)
    send_control(run, "stop")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and "--resume" in stderr, stderr
    events = (run / "events.jsonl").read_bytes()
    saved = (run / "recipe.toml").read_text()
    (run / "recipe.toml").write_text(saved.replace("iterations = 2", "iterations = 1", 1))
    lowered = zopro("run", "--resume", str(run), "-q")
    one_sentence(lowered, "train.iterations = 1")
    assert (run / "events.jsonl").read_bytes() == events
    (run / "recipe.toml").write_text(saved)
    (run / "checkpoints" / "resume" / "state.json").write_text("damaged")
    quiet = zopro("run", "--resume", str(run), "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "skipped resume" in quiet.stderr
