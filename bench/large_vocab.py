"""The large-vocabulary check (issue 14): a small Llama whose 131,072-token vocabulary dominates its
memory, 16 prompts x 4 answers x 48 new tokens, `zopro bench methods` on it, and each method's update
peak next to the size of ONE float32 logits tensor of that batch. Prints one JSON object.

    PYTHONPATH=. python bench/large_vocab.py [--vocab 131072] [--methods rloo,mezo,zopro] [--updates 3]

Done when (issue 14): zeroth-order update peak < 0.25 x the logits tensor, RLOO's < 1 x."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(folder: Path, vocab: int, seed: int = 0) -> Path:
    """The built-in tokenizer (its ids are the first of the vocabulary) on a 2-layer, hidden-64 Llama."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.data.tasks import make_task
    from engine.recipe import recipe_from_dict
    from engine.training.models import build_builtin

    task = make_task(recipe_from_dict({}))
    tokenizer_dir = build_builtin("nano", task.corpus(), seed, folder / "cache")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    target = folder / f"llama-v{vocab}"
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--methods", default="rloo,mezo,zopro")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    from engine.cli.bench import BenchConfig, run_methods
    from engine.training.models import quiet_transformers

    quiet_transformers()
    folder = Path(tempfile.mkdtemp(prefix="zopro-large-vocab-"))
    try:
        model = build_model(folder, args.vocab)
        config = BenchConfig(
            model=str(model),
            prompts=args.prompts,
            samples_per_prompt=args.samples,
            max_new_tokens=args.new_tokens,
            updates=args.updates,
            threads=args.threads,
        )
        report = run_methods(args.methods.split(","), config)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["config"]["model"] = f"llama hidden 64, 2 layers, vocabulary {args.vocab}"
    rows = report["methods"]
    width = next((r["sequence_width"] for r in rows.values() if "sequence_width" in r), 0)
    sequences = args.prompts * args.samples
    logits_mib = sequences * width * args.vocab * 4 / 2**20
    report["float32_logits_mib"] = round(logits_mib, 1)
    for row in rows.values():
        if "peak_update_mem_mib" in row:
            row["update_mem_x_logits"] = round(row["peak_update_mem_mib"] / logits_mib, 3)
            row["rollout_mem_x_logits"] = round(row["peak_rollout_mem_mib"] / logits_mib, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
