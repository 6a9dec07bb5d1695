"""The built-in nano Llama with its adapters, in process, for tests of the model-level code."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.data.tasks import make_task
from engine.recipe import recipe_from_dict
from engine.training.models import build_builtin, load_preference_model, quiet_transformers


def nano_preference_model(
    model_cache: Path, target_modules: list[str], *, dtype: str = "float32", moved: tuple[str, ...] = ()
):
    """(model, task): the nano base with rank-4 LoRA adapters on `target_modules` (seed 0), the adapters
    named in `moved` moved 0.3 x N(0, 1) away from their zero-B start (one generator, seed 1, in that order),
    so that they differ from each other and every LoRA matrix has a gradient; and the built-in task."""
    quiet_transformers()
    task = make_task(recipe_from_dict({}))
    base = build_builtin("nano", task.corpus(), 0, model_cache)
    model = load_preference_model(
        str(base),
        dtype=dtype,
        device=torch.device("cpu"),
        lora_rank=4,
        lora_alpha=8.0,
        target_modules=target_modules,
        seed=0,
    )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name in moved:
            for param in model.adapter_parameters(name).values():
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model, task


def nano_rollout(pm, prompts: int = 4, k: int = 3):
    """A real rollout of the policy adapter: `prompts` of the model's test prompts, k answers each (seed 0)."""
    from engine.training.rollout import collect_rollout
    from engine.training.telemetry import Counters

    with pm.adapter("policy"):
        return collect_rollout(
            pm, pm.prompts[:prompts], k=k, kl_coef=0.0, missing_eos_penalty=0.0, max_new_tokens=8,
            max_prompt_tokens=16, temperature=1.0, generator=torch.Generator().manual_seed(0),
            counters=Counters(),
        )  # fmt: skip


def split_flat(row: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat vector (sorted-name order, as the gradient snapshots keep it) back into tensors shaped like
    `params`."""
    parts, offset = {}, 0
    for name in sorted(params):
        numel = params[name].numel()
        parts[name] = row[offset : offset + numel].view(params[name].shape)
        offset += numel
    return parts
