"""Real data paths end to end: a recipe that points at a fixture in an upstream format runs one iteration
with a tiny built-in model; the llm judge gives verdicts (or counts the ones it cannot parse)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.rundir.reader import read_events
from engine.training.judges import parse_verdict
from tests.conftest import REPO, zopro

FIXTURES = REPO / "tests" / "fixtures" / "datasets"

DATASET_RECIPE = """
name = "data"
threads = 1

[model]
base = "builtin:nano"
lora_rank = 4
lora_alpha = 8
max_prompt_tokens = {prompt_tokens}
max_new_tokens = 12

[task]
name = "dataset"
train_prompts = 8
eval_prompts = 2
sft_examples = 16
preference_pairs = 16

[data]
format = "{format}"
path = "{path}"
{extra}

[sft]
steps = 4
batch_size = 4

[reward]
steps = 4
batch_size = 4
score_mse_weight = {mse}

[train]
iterations = 1
updates_per_iteration = 2
prompts_per_update = 2
samples_per_prompt = 2

[refine]
judge = "{judge}"
{judge_model}
epochs = 1
batch_size = 4
"""


def recipe_for(
    tmp_path: Path,
    fmt: str,
    path: Path,
    *,
    extra: str = "",
    judge: str = "reward",
    judge_model: str = "",
    mse: float = 0.0,
    prompt_tokens: int = 96,
) -> Path:
    text = DATASET_RECIPE.format(
        format=fmt,
        path=path,
        extra=extra,
        judge=judge,
        mse=mse,
        prompt_tokens=prompt_tokens,
        judge_model=f'judge_model = "{judge_model}"' if judge_model else "",
    )
    recipe = tmp_path / f"{fmt}.toml"
    recipe.write_text(text)
    return recipe


@pytest.mark.parametrize(
    ("fmt", "path", "extra", "mse", "prompt_tokens"),
    [
        ("hh_rlhf", FIXTURES / "hh-rlhf" / "train.jsonl", "", 0.0, 96),
        ("summarize_from_feedback", FIXTURES / "summarize_from_feedback" / "comparisons.jsonl", "", 0.0, 240),
        ("wmt20_mlqe", FIXTURES / "wmt20_mlqe_task1" / "en-de.jsonl", 'config = "en-de"', 1.0, 96),
    ],
)
def test_fixture_recipe_runs_one_iteration_end_to_end(tmp_path, fmt, path, extra, mse, prompt_tokens):
    recipe = recipe_for(tmp_path, fmt, path, extra=extra, mse=mse, prompt_tokens=prompt_tokens)
    run = tmp_path / "run"
    result = zopro("run", str(recipe), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    events = read_events(run)
    evals = [e["metrics"] for e in events if e["type"] == "eval"]
    assert len(evals) == 2
    assert "eval/gold" not in evals[-1]  # no gold scorer for real data
    assert 0.0 <= evals[-1]["eval/win_rate_vs_sft"] <= 1.0  # judged by the fixed initial reward model
    assert (run / "checkpoints" / "iter-0000").is_dir()


def test_missing_dataset_file_is_one_sentence(tmp_path):
    recipe = recipe_for(tmp_path, "preference_table", tmp_path / "nope.jsonl")
    result = zopro("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "data.path" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_gold_judge_needs_a_gold_scorer(tmp_path):
    recipe = recipe_for(tmp_path, "hh_rlhf", FIXTURES / "hh-rlhf" / "train.jsonl", judge="gold")
    result = zopro("validate", str(recipe))
    assert result.returncode == 2 and "refine.judge" in result.stderr


def test_llm_judge_on_the_builtin_task_reports_verdicts_and_agreement(tmp_path, fast_recipe):
    # the judge is a local causal LM loaded through transformers: here the built-in base of the run itself
    first = zopro("run", str(fast_recipe), "--run-dir", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    judge_model = json.loads((tmp_path / "first" / "meta.json").read_text())["base"]
    recipe = tmp_path / "llm.toml"
    text = fast_recipe.read_text().replace(
        "[refine]\n", f'[refine]\njudge = "llm"\njudge_model = "{judge_model}"\n'
    )
    recipe.write_text(text)
    result = zopro("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    judged = [e for e in read_events(tmp_path / "run") if e["type"] == "judge"]
    assert judged and all(e["judge"] == "llm" for e in judged)
    for event in judged:
        assert event["judged"] + event["no_verdict"] == event["kept"]  # unparseable verdicts are counted


def test_parse_verdict():
    assert parse_verdict(" A") == 0 and parse_verdict("B.") == 1 and parse_verdict("(a)") == 0
    assert parse_verdict("Both") is None and parse_verdict("") is None and parse_verdict(" Answer") is None
