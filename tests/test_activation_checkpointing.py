"""Activation checkpointing of the decoder layers (model.gradient_checkpointing, issue 28)."""

from __future__ import annotations

import pytest
import torch

from engine.recipe import RecipeError, recipe_from_dict
from engine.training import activation_checkpointing
from engine.training.activation_checkpointing import set_activation_checkpointing
from engine.training.rollout import sample, token_logprobs
from engine.training.telemetry import Counters
from tests.nano import nano_preference_model


@pytest.fixture(scope="module")
def pm(model_cache):
    # a policy adapter away from its zero-B start, so every LoRA matrix has a gradient
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model, task = nano_preference_model(model_cache, targets, moved=("policy",))
    with model.adapter("policy"), torch.no_grad():
        model.seqs = sample(
            model,
            task.prompts(8, "test"),
            max_new_tokens=12,
            max_prompt_tokens=16,
            temperature=1.0,
            generator=torch.Generator().manual_seed(0),
            counters=Counters(),
        )
    return model


def backward_with_saved_bytes(pm) -> tuple[dict[str, torch.Tensor], int]:
    """The policy adapter's gradient of the summed response log-probs, and the bytes autograd kept."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    params = pm.adapter_parameters("policy")
    with pm.adapter("policy"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = token_logprobs(pm, pm.seqs, Counters()).sum()
        loss.backward()
    grads = {name: p.grad.clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads, sum(storages.values())


def test_checkpointed_layers_give_the_same_gradient_and_keep_a_fraction_of_the_activations(pm):
    try:
        set_activation_checkpointing(pm, "off")
        kept_grads, kept_bytes = backward_with_saved_bytes(pm)
        set_activation_checkpointing(pm, "on")
        recomputed_grads, recomputed_bytes = backward_with_saved_bytes(pm)
    finally:
        set_activation_checkpointing(pm, "auto")
    assert kept_grads.keys() == recomputed_grads.keys() and kept_grads
    for name, grad in kept_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-5, atol=1e-6)
        assert grad.abs().sum() > 0, name
    assert recomputed_bytes < 0.5 * kept_bytes, (recomputed_bytes, kept_bytes)


def test_auto_checkpoints_only_passes_above_its_threshold(pm, monkeypatch):
    try:
        set_activation_checkpointing(pm, "off")
        _, kept_bytes = backward_with_saved_bytes(pm)
        set_activation_checkpointing(pm, "on")
        _, recomputed_bytes = backward_with_saved_bytes(pm)
        set_activation_checkpointing(pm, "auto")  # a few hundred tokens of a 64-wide model: far below
        assert backward_with_saved_bytes(pm)[1] == kept_bytes
        monkeypatch.setattr(activation_checkpointing, "CHECKPOINTING_AUTO_BYTES", 0)
        set_activation_checkpointing(pm, "auto")
        assert backward_with_saved_bytes(pm)[1] == recomputed_bytes
    finally:
        monkeypatch.undo()
        set_activation_checkpointing(pm, "auto")


def test_an_unknown_checkpointing_mode_is_one_sentence(pm):
    with pytest.raises(
        ValueError, match="model.gradient_checkpointing = 'sometimes'; accepted: auto, on, off"
    ):
        set_activation_checkpointing(pm, "sometimes")
    with pytest.raises(RecipeError, match="gradient_checkpointing"):
        recipe_from_dict({"model": {"gradient_checkpointing": "sometimes"}}, "r.toml")
