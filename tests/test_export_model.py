"""`zopro export RUN --model DIR`: what it writes loads with plain transformers/peft and computes what the
run's policy (or reward model) computed; tied embeddings, bf16 bases and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from engine.export.checkpoints import checkpoint_folder
from engine.export.run_model import load_run_model
from engine.training.rollout import encode_responses, position_ids, reward_scores, token_logprobs
from engine.training.telemetry import Counters
from tests.conftest import FAST_RECIPE, zopro
from tests.runs import finished_run

PROMPTS = ["describe the movie .", "how was the city ?", "review the song ."]
ANSWERS = ["the movie was great and lovely .", "bad", "the song was noisy but fun ."]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.mktemp("float"), "fast", FAST_RECIPE)[1]


def run_policy(run: Path, checkpoint: str, adapter: str = "policy"):
    """The run's own computation: the engine's model with the checkpoint applied; token log-probs of the
    fixed answers under `adapter` and the reward model's scores, and the sequences they were taken on."""
    model = load_run_model(run)
    model.load_checkpoint(checkpoint_folder(run, checkpoint))
    pm = model.pm
    seqs = encode_responses(pm, PROMPTS, ANSWERS, max_prompt_tokens=16, max_new_tokens=8)
    with torch.no_grad(), pm.adapter(adapter):
        logprobs = token_logprobs(pm, seqs, Counters())
        scores = reward_scores(pm, seqs.input_ids, seqs.attention_mask, Counters())
    return seqs, logprobs, scores, model.base


@torch.no_grad()
def plain_logprobs(model, seqs) -> torch.Tensor:
    mask = seqs.attention_mask
    logits = model(input_ids=seqs.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logits = logits[:, seqs.prompt_width - 1 : -1].float()
    chosen = torch.log_softmax(logits, -1).gather(-1, seqs.response_ids[..., None]).squeeze(-1)
    return chosen * seqs.response_mask


def export(run: Path, target: Path, *extra: str) -> None:
    result = zopro("export", str(run), "--model", str(target), *extra)
    assert result.returncode == 0, result.stderr


def test_adapter_export_loads_with_peft_and_gives_the_runs_log_probs(float_run, tmp_path):
    export(float_run, tmp_path / "adapter", "--checkpoint", "iter-1")
    seqs, expected, _, base = run_policy(float_run, "iter-1")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    assert (plain_logprobs(model, seqs) - expected).abs().max() < 1e-5
    base_only = plain_logprobs(AutoModelForCausalLM.from_pretrained(base), seqs)
    assert (base_only - expected).abs().max() > 1e-3  # the adapter is what makes the difference
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "method: **rloo**" in card and "| it 1 |" in card and "± " in card and "[sft]" in card
    assert "| it 2 |" in card and "| it 0 |" not in card, "iterations counted from 1, as the run's summary"
    assert "| fixed RM | RM score |" in card and "2 iterations of 4 policy updates" in card
    assert "prompts: the builtin:sentiment task's texts as they are" in card
    assert json.loads((tmp_path / "adapter" / "zopro_export.json").read_text())["checkpoint"] == "iter-0001"


def test_merged_export_loads_with_transformers_alone_and_gives_the_runs_log_probs(float_run, tmp_path):
    export(float_run, tmp_path / "merged", "--merge")
    seqs, expected, _, _ = run_policy(float_run, "latest")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.float32
    assert (plain_logprobs(model, seqs) - expected).abs().max() < 1e-5
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert (
        tokenizer("describe the movie .")["input_ids"]
        == AutoTokenizer.from_pretrained(load_run_model(float_run).base)("describe the movie .")["input_ids"]
    )


def test_sft_checkpoint_exports_the_sft_policy(float_run, tmp_path):
    export(float_run, tmp_path / "sft", "--checkpoint", "sft", "--merge")
    seqs, expected, _, _ = run_policy(float_run, "sft", adapter="sft")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert (plain_logprobs(model, seqs) - expected).abs().max() < 1e-5


def test_reward_export_is_a_sequence_classifier_that_scores_like_the_run(float_run, tmp_path):
    export(float_run, tmp_path / "reward", "--reward")
    seqs, _, expected, _ = run_policy(float_run, "latest")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward")
    mask = seqs.attention_mask
    with torch.no_grad():
        logits = model(input_ids=seqs.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    scores = logits.squeeze(-1) + model.config.zopro_score_bias
    assert torch.allclose(scores, expected, atol=1e-5)
    assert len(set(torch.round(expected, decimals=4).tolist())) > 1


def test_a_missing_checkpoint_a_used_folder_or_a_non_run_is_refused_in_one_sentence(float_run, tmp_path):
    missing = zopro("export", str(float_run), "--model", str(tmp_path / "out"), "--checkpoint", "iter-9")
    assert missing.returncode == 2
    assert "no complete checkpoint 'iter-9'" in missing.stderr and "iter-0001" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    taken = zopro("export", str(float_run), "--model", str(used))
    assert taken.returncode == 2 and "not an empty folder" in taken.stderr
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    stray = zopro("export", str(tmp_path), "--model", str(tmp_path / "out"))
    assert stray.returncode == 2 and "is not a run directory" in stray.stderr
    flags = zopro("export", str(float_run), "--merge")
    assert flags.returncode == 2 and "--model" in flags.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # no half-written folder anywhere
    metrics = zopro("export", str(float_run))  # the metrics export is still there
    assert metrics.returncode == 0 and metrics.stdout.startswith("seq,type,")


def tied_base(folder: Path, like: Path) -> Path:
    """A tiny Llama built here with tie_word_embeddings=True, on the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(like)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(like).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("head_listed", [True, False])
def test_tied_embeddings_merge_to_the_same_function_and_stay_tied(float_run, tmp_path, head_listed):
    """A tied base's output layer is its input embedding: zopro leaves it out of the LoRA even when
    target_modules lists lm_head, so the merged model is the run's function with one shared matrix."""
    base = tied_base(tmp_path / "tied-base", Path(load_run_model(float_run).base))
    targets = '["q_proj", "v_proj", "lm_head"]' if head_listed else '["q_proj", "v_proj"]'
    recipe = FAST_RECIPE.replace('base = "builtin:nano"', f'base = "{base}"\ntarget_modules = {targets}')
    run = finished_run(tmp_path, "tied", recipe)[1]
    export(run, tmp_path / "merged", "--merge")
    export(run, tmp_path / "adapter")
    seqs, expected, _, _ = run_policy(run, "latest")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (plain_logprobs(merged, seqs) - expected).abs().max() < 1e-5
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    assert (plain_logprobs(adapter, seqs) - expected).abs().max() < 1e-5
    adapter_keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert adapter_keys and not any("lm_head" in key for key in adapter_keys)
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in saved


def test_a_bfloat16_run_exports_in_bfloat16_with_the_runs_log_probs(tmp_path):
    recipe = FAST_RECIPE.replace('base = "builtin:nano"', 'base = "builtin:nano"\ndtype = "bfloat16"')
    run = finished_run(tmp_path, "bf16", recipe)[1]
    export(run, tmp_path / "merged", "--merge")
    export(run, tmp_path / "adapter")
    seqs, expected, _, base = run_policy(run, "latest")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    adapter = PeftModel.from_pretrained(base_model, tmp_path / "adapter")
    assert (plain_logprobs(adapter, seqs) - expected).abs().max() < 1e-4  # the run's own path: peft on bf16
    # merged weights are rounded to bf16 once, where the run adds a float32 LoRA term to a bf16 layer
    assert (plain_logprobs(merged, seqs) - expected).abs().max() < 0.1
