"""`zopro export RUN --model DIR`: a checkpoint's policy as a peft adapter folder or merged into its base,
or its reward model as a sequence-classification model; each with the tokenizer and a model card.

The folder is written under a temporary name beside DIR and renamed at the end: an error leaves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.data.preference_data import DataError
from engine.data.prompts import has_chat_template
from engine.data.tasks import make_task
from engine.export.checkpoints import ExportError, checkpoint_folder, policy_adapter_of
from engine.export.lora_merge import lora_deltas, merge_into, output_is_tied, read_adapter
from engine.export.model_card import model_card
from engine.export.run_model import run_base, run_recipe
from engine.training.models import ModelError, quiet_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Exported:
    path: Path
    kind: str  # adapter, merged or reward
    checkpoint: str
    base: str
    notes: list[str] = field(default_factory=list)


def check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(
            f"{target} already exists and is not an empty folder; name a new folder for --model"
        )


def export_model(
    run_dir: Path, target: Path, *, checkpoint: str = "latest", merge: bool = False, reward: bool = False
) -> Exported:
    quiet_transformers()
    target = Path(target)
    check_target(target)
    folder = checkpoint_folder(run_dir, checkpoint)
    recipe = run_recipe(run_dir)
    try:
        base = run_base(run_dir, recipe, make_task(recipe))
    except (ModelError, DataError) as error:
        raise ExportError(f"{run_dir}: {error}") from None
    kind = "reward" if reward else "merged" if merge else "adapter"
    result = Exported(path=target, kind=kind, checkpoint=folder.name, base=base)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if kind == "adapter":
            write_adapter(folder / "adapters" / policy_adapter_of(folder), staging, base)
        elif kind == "merged":
            write_merged(
                folder / "adapters" / policy_adapter_of(folder), staging, base, recipe.model.dtype, result
            )
        else:
            write_reward(folder, staging, base, recipe.model.dtype, result)
        tokenizer = save_tokenizer(base, staging)
        card = model_card(
            run_dir,
            recipe,
            kind=kind,
            checkpoint=folder.name,
            base=base,
            notes=result.notes,
            chat=has_chat_template(tokenizer),
        )
        (staging / "README.md").write_text(card)
        provenance = {
            "run": str(Path(run_dir).resolve()),
            "checkpoint": folder.name,
            "kind": kind,
            "base": base,
        }
        (staging / "zopro_export.json").write_text(json.dumps(provenance, indent=1) + "\n")
        with contextlib.suppress(OSError):
            target.rmdir()  # an empty folder named as the target
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def write_adapter(adapter: Path, out: Path, base: str) -> None:
    """The checkpoint's adapter files as they are (plain peft layout), pointed at the base."""
    config, _ = read_adapter(adapter)
    config["base_model_name_or_path"] = base
    config["inference_mode"] = True
    shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_base(base: str, loader) -> torch.nn.Module:
    try:
        return loader.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ExportError(f"cannot load the base {base!r}: {first}") from None


def write_merged(adapter: Path, out: Path, base: str, dtype: str, result: Exported) -> None:
    """The base with the adapter folded in (float32 arithmetic), saved in the run's dtype."""
    from transformers import AutoModelForCausalLM

    model = load_base(base, AutoModelForCausalLM)
    tied = output_is_tied(model)
    merge_into(model, lora_deltas(*read_adapter(adapter)))
    if tied and not output_is_tied(model):
        result.notes.append(
            "the base ties its output layer to its input embeddings; the policy's LoRA changed the output "
            "layer only, so this model keeps them as two matrices (tie_word_embeddings = false)"
        )
    elif tied:
        result.notes.append("input and output embeddings stay tied, as in the base")
    model.to(DTYPES[dtype]).save_pretrained(out)


def write_reward(folder: Path, out: Path, base: str, dtype: str, result: Exported) -> None:
    """The reward adapter folded into the base's body and the score head as its one-label `score` layer."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = load_base(base, _SequenceClassification(AutoModelForSequenceClassification))
    merge_into(model, lora_deltas(*read_adapter(folder / "adapters" / "reward")), skip_missing=True)
    head = load_file(str(folder / "score_head.safetensors"))
    score = getattr(model, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.weight.shape != head["weight"].shape:
        raise ExportError(f"the base {base!r} has no one-label `score` layer to hold the reward head")
    with torch.no_grad():
        score.weight.copy_(head["weight"])
        bias = float(head["bias"].reshape(-1)[0])
        if score.bias is not None:
            score.bias.fill_(bias)
            bias = 0.0
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model.config.zopro_score_bias = bias
    result.notes.append(
        "score an answer as zopro did: the prompt, the answer and the EOS token, read at the last token"
        + (f"; zopro's score is the logit plus zopro_score_bias = {bias:.6g}" if bias else "")
    )
    model.to(DTYPES[dtype]).save_pretrained(out)


class _SequenceClassification:
    """AutoModelForSequenceClassification with one label (what a reward model is)."""

    def __init__(self, auto):
        self.auto = auto

    def from_pretrained(self, base: str, **kwargs):
        return self.auto.from_pretrained(base, num_labels=1, **kwargs)


def save_tokenizer(base: str, out: Path):
    """The base's tokenizer (and chat template), with the pad token the run used; returns it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    return tokenizer
