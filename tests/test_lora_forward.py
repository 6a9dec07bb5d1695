"""The LoRA layers' own forward (engine/training/lora_forward.py): under autograd the fused path equals
peft's in output and in every gradient; the cases it does not handle go to peft's path."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear

from engine.training.rollout import position_ids
from tests.nano import nano_preference_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def pm(model_cache):
    model, task = nano_preference_model(model_cache, TARGETS, moved=("sft", "policy", "reward"))
    model.prompts = task.prompts(6, "test")
    return model


def lora_layers(pm):
    return [m for m in pm.model.modules() if isinstance(m, LoraLinear)]


def logits_and_grads(pm, ids, mask, *, peft_path: bool, monkeypatch):
    """The policy's logits on a batch, and the gradient of a loss of them for every policy LoRA tensor."""
    peft_calls = []
    if peft_path:  # the class's forward: what peft computes
        for layer in lora_layers(pm):
            monkeypatch.delattr(layer, "forward")
    else:  # count the calls that fall back to peft's forward
        peft_forward = LoraLinear.forward
        monkeypatch.setattr(
            LoraLinear, "forward", lambda *a, **k: peft_calls.append(1) or peft_forward(*a, **k)
        )
    params = pm.adapter_parameters("policy")
    with pm.adapter("policy"):
        logits = pm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        loss = (torch.log_softmax(logits, -1)[..., 7] * mask).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
    monkeypatch.undo()
    return logits.detach(), dict(zip(params, grads, strict=True)), len(peft_calls)


def test_the_fused_path_equals_peft_in_output_and_gradient(pm, monkeypatch):
    encoded = pm.tokenizer(pm.prompts, return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    fused_logits, fused_grads, fallbacks = logits_and_grads(
        pm, ids, mask, peft_path=False, monkeypatch=monkeypatch
    )
    peft_logits, peft_grads, _ = logits_and_grads(pm, ids, mask, peft_path=True, monkeypatch=monkeypatch)
    assert fallbacks == 0  # every adapted layer took the fused path
    torch.testing.assert_close(fused_logits, peft_logits, atol=1e-5, rtol=1e-5)
    for name, grad in peft_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-4, rtol=1e-3)  # rounding


def test_cases_it_does_not_handle_go_to_peft(pm):
    layer = next(
        m for m in lora_layers(pm) if m.get_base_layer().in_features == m.get_base_layer().out_features
    )
    x = torch.randn(3, layer.get_base_layer().in_features, generator=torch.Generator().manual_seed(0))
    base = layer.get_base_layer()
    with pm.adapter("policy"):
        with pm.model.disable_adapter():  # adapters off: the base layer alone
            torch.testing.assert_close(layer(x), base(x))
        expected = type(layer).forward(layer, x)
        torch.testing.assert_close(layer(x), expected)  # autograd on: the fused path, same function
        with torch.no_grad():  # no autograd, outside merged_lora: peft's path exactly
            assert torch.equal(layer(x), type(layer).forward(layer, x))
        double = x.double()  # a dtype that is not the weights': peft's path (which raises, as peft does)
        with pytest.raises(RuntimeError):
            layer(double)
