"""Folding a saved LoRA adapter into plain weights: W <- W + (alpha / r) B A, computed in float32, with a
tied output layer untied first when the adapter changes it (else the input embeddings would change too)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from engine.export.checkpoints import ExportError

PEFT_PREFIX = "base_model.model."


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A peft adapter folder's config and tensors (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as error:  # noqa: BLE001 - json, OS and safetensors errors alike
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ExportError(f"{folder} is not a readable peft adapter: {first}") from None
    if (
        config.get("use_dora")
        or config.get("use_rslora")
        or config.get("rank_pattern")
        or config.get("alpha_pattern")
    ):
        raise ExportError(f"{folder}: only plain LoRA adapters (no DoRA, rsLoRA or per-module ranks) merge")
    return config, tensors


def lora_deltas(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module path in the plain model: the float32 change of its weight}."""
    scaling = float(config["lora_alpha"]) / float(config["r"])
    deltas = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up = tensors.get(f"{module}.lora_B.weight")
        if up is None:
            raise ExportError(f"the adapter has {key} but no matching lora_B tensor")
        path = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        deltas[path] = scaling * (up.float() @ down.float())
    return deltas


def output_is_tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output is not None and output.weight is model.get_input_embeddings().weight


def untie_output(model: nn.Module) -> None:
    """Give the output layer its own copy of the embedding matrix, and say so in the config."""
    output = model.get_output_embeddings()
    output.weight = nn.Parameter(output.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if callable(text_config):
        text_config().tie_word_embeddings = False


@torch.no_grad()
def merge_into(model: nn.Module, deltas: dict[str, torch.Tensor], *, skip_missing: bool = False) -> list[str]:
    """Add each delta to its module's weight (float32 arithmetic, stored in the weight's dtype); returns
    the modules merged. A tied output layer that receives a delta is untied first. `skip_missing`: leave
    out modules the model has not got (the lm_head of a sequence-classification model)."""
    modules = dict(model.named_modules())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    merged = []
    for path, delta in deltas.items():
        module = modules.get(path)
        if module is None:
            if skip_missing:
                continue
            raise ExportError(f"the adapter changes {path}, which the base model has not got")
        if module is output and output_is_tied(model) and bool(delta.abs().max() > 0):
            untie_output(model)
        weight = module.weight
        if weight.shape != delta.shape:
            raise ExportError(
                f"the adapter's change of {path} is {tuple(delta.shape)}, the base's weight "
                f"{tuple(weight.shape)}"
            )
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        merged.append(path)
    return merged
