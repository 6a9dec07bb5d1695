"""The LoRA layers' own forward (engine/training/lora_forward.py): under autograd the fused path equals
peft's in output and in every gradient; the cases it does not handle go to peft's path."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear

from engine.training.rollout import position_ids


@pytest.fixture(scope="module")
def pm(moved_nano):
    return moved_nano


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


def test_cases_it_does_not_handle_go_to_peft(pm, monkeypatch):
    """Each case the fused path does not handle calls peft's forward (counted), with peft's result; the
    plain case under autograd does not."""
    layer = next(
        m for m in lora_layers(pm) if m.get_base_layer().in_features == m.get_base_layer().out_features
    )
    x = torch.randn(3, layer.get_base_layer().in_features, generator=torch.Generator().manual_seed(0))
    peft_forward, calls = LoraLinear.forward, []
    monkeypatch.setattr(LoraLinear, "forward", lambda *a, **k: calls.append(1) or peft_forward(*a, **k))

    def peft_calls(run) -> int:
        calls.clear()
        run()
        return len(calls)

    with pm.adapter("policy"):
        expected = peft_forward(layer, x)
        assert peft_calls(lambda: torch.testing.assert_close(layer(x), expected)) == 0  # the fused path
        with torch.no_grad():  # no autograd, outside merged_lora: peft's path
            assert peft_calls(lambda: torch.testing.assert_close(layer(x), expected)) == 1
        with pm.model.disable_adapter():  # adapters off: the base layer alone, by peft
            assert peft_calls(lambda: torch.testing.assert_close(layer(x), layer.get_base_layer()(x))) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert peft_calls(lambda: layer(x)) == 1
        layer.set_adapter(["policy", "sft"])  # two adapters at once: their sum, by peft
        try:
            assert peft_calls(lambda: layer(x)) == 1
        finally:
            layer.set_adapter("policy")
        layer.lora_bias["policy"] = True  # a bias on B (not one zopro configures)
        try:
            assert peft_calls(lambda: layer(x)) == 1
        finally:
            layer.lora_bias["policy"] = False
        calls.clear()
        with pytest.raises(RuntimeError):  # a dtype that is not the weights': peft's path, which refuses it
            layer(x.double())
        assert len(calls) == 1
