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


def a_or_b_judge(base: str, folder: Path) -> Path:
    """A real causal LM folder that always answers "A" or "B": the built-in base with its lm_head rewritten
    so that only those two tokens score, with opposite signs along one direction of the hidden state, so the
    verdict depends on what it reads. (The untrained base alone answers neither: zero verdicts.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    first, second = (tokenizer.encode(letter, add_special_tokens=False) for letter in ("A", "B"))
    assert len(first) == len(second) == 1
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.zero_()
        head[first[0]] = direction
        head[second[0]] = -direction
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_llm_judge_on_the_builtin_task_reports_verdicts_and_agreement(tmp_path, fast_recipe):
    # the judge is a local causal LM loaded through transformers: the run's own base, made to answer A or B
    first = zopro("run", str(fast_recipe), "--run-dir", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    base = json.loads((tmp_path / "first" / "meta.json").read_text())["base"]
    judge_model = a_or_b_judge(base, tmp_path / "judge")
    recipe = tmp_path / "llm.toml"
    text = fast_recipe.read_text().replace(
        "[refine]\n", f'[refine]\njudge = "llm"\njudge_model = "{judge_model}"\n'
    )
    recipe.write_text(text)
    result = zopro("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    events = read_events(tmp_path / "run")
    judged = [e for e in events if e["type"] == "judge"]
    assert len(judged) == 2 and all(e["judge"] == "llm" for e in judged)  # one per iteration
    for event in judged:
        assert event["judged"] + event["no_verdict"] == event["kept"]  # unparseable verdicts are counted
        assert event["judged"] == event["kept"] > 0, event  # it answers A or B: every pair gets a verdict
        assert 0.0 <= event["agreement_with_gold"] <= 1.0, event  # checked against the task's gold
    logged = [
        e["metrics"]["judge/agreement_with_gold"]
        for e in events
        if e["type"] == "metrics" and "judge/agreement_with_gold" in e["metrics"]
    ]
    assert logged == [e["agreement_with_gold"] for e in judged]


def test_parse_verdict():
    assert parse_verdict(" A") == 0 and parse_verdict("B.") == 1 and parse_verdict("(a)") == 0
    assert parse_verdict("Both") is None and parse_verdict("") is None and parse_verdict(" Answer") is None


def test_malformed_rows_are_left_out_with_a_warning_not_silently(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(
        (FIXTURES / "hh-rlhf" / "train.jsonl").read_text()
        + '{"chosen": 42, "rejected": "x"}\n{"chosen": null}\n'
    )
    recipe = recipe_for(tmp_path, "hh_rlhf", data)
    run = tmp_path / "run"
    result = zopro("run", str(recipe), "--run-dir", str(run), "-q")
    assert result.returncode == 0, result.stderr
    (warning,) = [
        e for e in read_events(run) if e["type"] == "warning" and e["code"] == "data_malformed_rows"
    ]
    plain = tmp_path / "plain"
    plain.mkdir()
    baseline = zopro(
        "run",
        str(recipe_for(plain, "hh_rlhf", FIXTURES / "hh-rlhf" / "train.jsonl")),
        "--run-dir",
        str(plain / "run"),
        "-q",
    )
    before = [
        e for e in read_events(plain / "run") if e["type"] == "warning" and e["code"] == "data_malformed_rows"
    ]
    assert baseline.returncode == 0, baseline.stderr
    already = before[0]["malformed"] if before else 0  # the fixture's own diverging dialogues
    assert warning["malformed"] == already + 2 and f"{already + 2} rows are malformed" in warning["message"]
    assert "warning [data_malformed_rows]" in result.stderr and str(data) in result.stderr
