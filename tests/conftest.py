"""Shared fixtures: offline hub, a per-session model cache, and small recipes for fast end-to-end runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parents[1]

# A run small enough for tests (~10 s on 2 cores): nano model, few steps, every stage exercised.
FAST_RECIPE = """
name = "fast"
seed = 0
threads = 1

[model]
base = "builtin:nano"
lora_rank = 4
lora_alpha = 8
max_prompt_tokens = 16
max_new_tokens = 8

[task]
train_prompts = 64
eval_prompts = 8
sft_examples = 256
preference_pairs = 128

[sft]
steps = 12
batch_size = 8

[reward]
steps = 12
batch_size = 8

[train]
iterations = 2
updates_per_iteration = 4
prompts_per_update = 4
samples_per_prompt = 2

[refine]
epochs = 1
batch_size = 8
"""


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("zopro-cache")
    os.environ["ZOPRO_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="module")
def moved_nano(model_cache: Path):
    """The nano preference model with LoRA on every projection and the lm_head, its sft, policy and reward
    adapters moved apart (so each adapter's pass is told apart), and six test prompts (`.prompts`)."""
    from tests.nano import nano_preference_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model, task = nano_preference_model(model_cache, targets, moved=("sft", "policy", "reward"))
    model.prompts = task.prompts(6, "test")
    return model


@pytest.fixture
def fast_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_RECIPE)
    return path


def zopro(*args: str, cwd: Path | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `zopro` command line in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        **kwargs,
    )


def zopro_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
