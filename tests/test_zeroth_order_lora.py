"""The zeroth-order update on a real tiny Llama with a LoRA adapter, and the adapter history ZOPrO reads mu and v from."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor

from engine.training.methods.zeroth_order.samplers import IsotropicSampler
from engine.training.methods.zeroth_order.spsa import zo_update
from tests.test_zeroth_order import SHAPES, cosine, flat, make_params, make_tensors, max_abs_diff, snapshot  # noqa: F401

# ---------------------------------------------------------------- on a real tiny model with a LoRA adapter


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lora_model(dtype: torch.dtype = torch.float32):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():  # LoRA and the base draw from the global RNG: seed it, then restore it
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).to(dtype)
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "lm_head"], init_lora_weights=False)
        model = get_peft_model(base, lora)
    model.eval()
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    adapter = {name: param for name, param in model.named_parameters() if param.requires_grad}
    return model, adapter, tokens


def test_on_a_tiny_llama_lora_the_estimate_follows_the_true_gradient_and_lowers_the_loss(one_thread):
    model, adapter, tokens = tiny_lora_model()

    def loss_fn() -> Tensor:
        return model(input_ids=tokens, labels=tokens).loss

    loss_fn().backward()
    gradient = flat({name: param.grad for name, param in adapter.items()})
    theta0 = flat(adapter)
    with torch.no_grad():
        before = float(loss_fn())

    result = zo_update(
        adapter, loss_fn, IsotropicSampler(), run_seed=0, update_index=0, eps=1e-3, lr=0.05, directions=64
    )
    step = theta0 - flat(adapter)  # lr * mean(g z)
    assert not result.skipped and result.forward_passes == 128
    assert cosine(step, gradient) > 0.15  # ~ sqrt(q / (q + dim)) = 0.35 for q = 64, dim = 448
    with torch.no_grad():
        assert float(loss_fn()) < before


def test_on_a_bf16_base_the_float32_adapter_moves_and_a_bf16_one_is_refused(one_thread):
    model, adapter, tokens = tiny_lora_model(torch.bfloat16)
    assert all(param.dtype == torch.float32 for param in adapter.values())  # peft keeps adapters in float32
    theta0 = snapshot(adapter)

    def loss_fn() -> Tensor:
        return model(input_ids=tokens, labels=tokens).loss

    result = zo_update(
        adapter, loss_fn, IsotropicSampler(), run_seed=0, update_index=0, eps=1e-2, lr=1e-3, directions=2
    )
    assert not result.skipped and math.isfinite(result.g) and result.g != 0.0
    assert max_abs_diff(adapter, theta0) > 0
    base_weights = {name: param for name, param in model.named_parameters() if "v_proj.base_layer" in name}
    with pytest.raises(TypeError, match="float32"):
        zo_update(base_weights, loss_fn, IsotropicSampler(), run_seed=0, update_index=0, eps=1e-2, lr=0.0)


# ---------------------------------------------------------------- the adapter history (mu and v)


def test_adapter_history_keeps_two_boundaries_as_copies_and_rebuilds_from_checkpoint_files(tmp_path):
    from safetensors.torch import save_file

    from engine.errors import TrainingFailed
    from engine.rundir.checkpoints import adapter_file
    from engine.training.adapter_history import AdapterHistory

    live = make_params()
    history = AdapterHistory(keep=2)
    boundaries = {}
    for iteration in (-1, 0, 1):
        with torch.no_grad():
            for param in live.values():
                param.add_(0.5)
        reward = make_tensors(SHAPES, 20 + iteration)
        history.record(iteration, live, reward)
        boundaries[iteration] = (snapshot(live), reward)
    assert sorted(history.boundaries) == [0, 1]  # only the last two are held
    mu = history.change("policy", since=0, until=1)
    assert max_abs_diff(mu, {k: torch.full(s, 0.5) for k, s in SHAPES.items()}) < 1e-6  # copies, not views
    v = history.change("reward", since=0, until=1)
    assert torch.equal(flat(v), flat(boundaries[1][1]) - flat(boundaries[0][1]))
    with pytest.raises(TrainingFailed, match="checkpoint reward"):
        history.at("policy", -1)

    # a resumed run reads the same tensors from the checkpoint files, bit for bit
    rebuilt = AdapterHistory()
    for iteration in (0, 1):
        folder = tmp_path / f"iter-{iteration:04d}"
        policy, reward = boundaries[iteration]
        for name, tensors in (("policy", policy), ("reward", reward)):
            adapter_file(folder, name).parent.mkdir(parents=True)
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(adapter_file(folder, name)))
        rebuilt.read_checkpoint(iteration, folder)
    rebuilt.read_checkpoint(2, tmp_path / "missing")  # unreadable: left out
    assert sorted(rebuilt.boundaries) == [0, 1]
    for adapter in ("policy", "reward"):
        again = rebuilt.change(adapter, since=0, until=1)
        held = history.change(adapter, since=0, until=1)
        assert all(torch.equal(again[k], held[k]) for k in held)
