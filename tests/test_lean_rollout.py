"""Log-probs without full logits, the on-device sampler and the reference pass (issue 14)."""

from __future__ import annotations

import pytest
import torch

from engine.training.rollout import (
    collect_rollout,
    position_ids,
    sample,
    sample_with_logprobs,
    selective_logprobs,
    token_logprobs,
)
from engine.training.row_chunks import inference_rows
from engine.training.telemetry import Counters
from tests.nano import nano_preference_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def pm(moved_nano):
    return moved_nano


def full_logprobs(pm, seqs):
    """The reference computation: full float32 logits, log-softmax over the whole vocabulary."""
    mask = seqs.attention_mask
    logits = pm.model(input_ids=seqs.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logits = logits[:, seqs.prompt_width - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, seqs.response_ids[..., None]).squeeze(-1)
    return logp * seqs.response_mask


def draw(pm, seed=0, **kwargs):
    return sample(
        pm,
        pm.prompts,
        max_new_tokens=12,
        max_prompt_tokens=16,
        temperature=1.0,
        generator=torch.Generator().manual_seed(seed),
        counters=Counters(),
        **kwargs,
    )


def test_chunked_logprobs_equal_the_full_log_softmax(pm):
    with pm.adapter("policy"):
        seqs = draw(pm)
        with torch.no_grad():
            expected = full_logprobs(pm, seqs)
            got = token_logprobs(pm, seqs, Counters())
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # merged weights: float32 rounding
    assert bool((got[seqs.response_mask == 0] == 0).all())


def test_chunked_logprobs_under_autograd_give_the_full_gradient(pm):
    params = list(pm.adapter_parameters("policy").values())
    with pm.adapter("policy"):
        seqs = draw(pm)
        weights = torch.linspace(-1, 1, seqs.response_mask.numel()).view_as(seqs.response_mask.float())
        grads = []
        for compute in (full_logprobs, lambda p, s: token_logprobs(p, s, Counters())):
            for p in params:
                p.grad = None
            values = compute(pm, seqs)
            (values * weights).sum().backward()
            grads.append([p.grad.clone() for p in params])
            for p in params:
                p.grad = None
    for full, chunked in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, full, atol=2e-4, rtol=1e-3)  # summation order differs


def test_selective_logprobs_with_tiny_chunks_and_without_mask():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    targets = torch.randint(50, (3, 5), generator=gen)
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
    chunked = selective_logprobs(hidden, head, targets, chunk_bytes=4 * 50 * 2)  # 2 rows a chunk
    torch.testing.assert_close(chunked, full)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(g_chunked, g_full)


@pytest.mark.parametrize(("chunk_rows", "head_calls"), [(15, 1), (2, 16)])
def test_selective_logprobs_recomputes_the_head_only_when_chunked(chunk_rows, head_calls):
    """One chunk keeps its logits for the backward (the head runs once); several are checkpointed (each
    chunk's head runs again in the backward: 8 chunks of 2 rows, 16 calls). The gradient is the same."""
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50)
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    hidden = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    targets = torch.randint(50, (3, 5), generator=gen)
    chunked = selective_logprobs(hidden, head, targets, chunk_bytes=4 * 50 * chunk_rows)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    assert len(calls) == head_calls
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    torch.testing.assert_close(g_chunked, g_full)


def test_sampler_is_reproducible_and_its_logprobs_match_a_recomputation(pm):
    with pm.adapter("policy"):
        first, logprobs = sample_with_logprobs(
            pm,
            pm.prompts,
            max_new_tokens=12,
            max_prompt_tokens=16,
            temperature=1.0,
            generator=torch.Generator().manual_seed(3),
            counters=Counters(),
            logprobs=True,
        )
        second = draw(pm, seed=3)
        other = draw(pm, seed=4)
        with torch.no_grad():
            recomputed = full_logprobs(pm, first)
    assert torch.equal(first.input_ids, second.input_ids) and first.responses == second.responses
    assert not torch.equal(first.input_ids, other.input_ids)
    torch.testing.assert_close(logprobs, recomputed, atol=1e-4, rtol=1e-4)  # merged weights: rounding
    assert bool(first.response_mask[:, -1].any())  # no trailing all-padding column
    lora_layers = [m for m in pm.model.modules() if hasattr(m, "lora_A")]  # what merged_lora switches
    assert lora_layers and all(
        m.zopro_merging is None and "zopro_merged_weight" not in vars(m) for m in lora_layers
    )


def test_sampler_matches_a_generator_derived_on_another_device(monkeypatch):
    """A generator that lives elsewhere seeds a device generator with one draw: same state, same seed (so the
    same samples), the source advanced by exactly that draw. This machine may have no second device, so the
    device generator is a CPU one, recorded with the device it was asked for; the branch is the real one."""
    from engine.training.rollout import device_generator

    cpu_generator = torch.Generator
    source = cpu_generator().manual_seed(5)
    assert device_generator(source, torch.device("cpu")) is source  # same device: the generator itself
    one_draw = int(torch.randint(0, 2**62, (1,), generator=cpu_generator().manual_seed(5)))
    asked_for: list[torch.device] = []

    def generator_on(device=None):
        asked_for.append(torch.device(device))
        return cpu_generator()

    monkeypatch.setattr(torch, "Generator", generator_on)
    derived = device_generator(source, torch.device("cuda", 0))
    again = device_generator(cpu_generator().manual_seed(5), torch.device("cuda", 0))
    other = device_generator(cpu_generator().manual_seed(6), torch.device("cuda", 0))
    monkeypatch.undo()
    assert asked_for == [torch.device("cuda", 0)] * 3
    assert derived is not source and derived.initial_seed() == again.initial_seed() == one_draw
    assert other.initial_seed() != one_draw
    assert torch.equal(torch.rand(4, generator=derived), torch.rand(4, generator=again))
    after_one_draw = cpu_generator().manual_seed(5)
    torch.randint(0, 2**62, (1,), generator=after_one_draw)
    assert torch.equal(torch.rand(4, generator=source), torch.rand(4, generator=after_one_draw))


def test_the_rollout_reference_pass_equals_the_sft_adapter_pass(pm):
    rollout = collect_rollout(
        pm,
        pm.prompts[:3],
        k=2,
        kl_coef=0.05,
        missing_eos_penalty=0.0,
        max_new_tokens=12,
        max_prompt_tokens=16,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
        counters=Counters(),
    )
    seqs = rollout.sequences
    with torch.no_grad():
        with pm.adapter("sft"):
            ref = full_logprobs(pm, seqs)
        with pm.adapter("policy"):
            old = full_logprobs(pm, seqs)
    torch.testing.assert_close(rollout.ref_logprobs, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollout.old_logprobs, old, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollout.kl, (old - ref).sum(-1), atol=1e-4, rtol=1e-4)


def test_copy_adapter_keeps_the_parameters_and_copies_values(pm):
    before = {n: p for n, p in pm.adapter_parameters("policy").items()}
    saved = {n: p.detach().clone() for n, p in before.items()}
    pm.copy_adapter("sft", "policy")
    after = pm.adapter_parameters("policy")
    sft = pm.adapter_parameters("sft")
    for name, param in after.items():
        assert param is before[name]
        assert torch.equal(param, sft[name.replace(".policy.", ".sft.")])
    with torch.no_grad():
        for name, param in after.items():
            param.copy_(saved[name])


def test_bf16_base_keeps_float32_adapters_and_recomputes_old_logprobs(model_cache):
    """A bfloat16 base (the paper recipes, on a GPU) with float32 adapters: log-probs come back float32,
    close to the full computation, and the rollout recomputes the old log-probs as the update will."""
    pm16, task = nano_preference_model(model_cache, TARGETS, dtype="bfloat16")
    assert pm16.base_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pm16.adapter_parameters("policy").values())
    counters = Counters()
    rollout = collect_rollout(
        pm16,
        task.prompts(3, "test"),
        k=2,
        kl_coef=0.05,
        missing_eos_penalty=0.0,
        max_new_tokens=8,
        max_prompt_tokens=16,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
        counters=counters,
    )
    assert counters.forward_passes == 4  # sample, old (recomputed in bf16), reference, reward
    seqs = rollout.sequences
    assert rollout.old_logprobs.dtype == torch.float32
    with torch.no_grad(), pm16.adapter("policy"):
        again = token_logprobs(pm16, seqs, Counters())
        full = full_logprobs(pm16, seqs)
    assert torch.equal(rollout.old_logprobs, again)
    torch.testing.assert_close(again, full, atol=0.05, rtol=0.05)


def test_merged_lora_passes_equal_peft_and_leave_the_weights_alone(pm):
    """Without autograd the body multiplies by temporary merged weights: the same hidden states as peft's
    path, the base weights untouched, every adapter (and none) honoured."""
    seqs = draw(pm)
    mask = seqs.attention_mask
    weights = {n: p.detach().clone() for n, p in pm.model.named_parameters()}
    for name in ("sft", "policy", "reward", None):
        context = pm.model.disable_adapter() if name is None else pm.adapter(name)
        with context, torch.no_grad():
            merged = pm.hidden_states(seqs.input_ids, mask, position_ids(mask))
            with torch.enable_grad():
                plain = pm.hidden_states(seqs.input_ids, mask, position_ids(mask)).detach()
        torch.testing.assert_close(merged, plain, atol=2e-4, rtol=1e-3)  # float32 rounding
    for n, p in pm.model.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert all(m.zopro_merging is None for m in pm.model.modules() if hasattr(m, "lora_A"))  # merged_lora's


def test_passes_without_autograd_run_a_chunk_of_rows_at_a_time(pm, monkeypatch):
    """Without autograd the body runs even chunks of rows that keep one layer's temporaries under the
    budget: the same hidden states as one pass over the batch; with autograd, one pass whatever the budget."""
    seqs = draw(pm)
    mask = seqs.attention_mask
    rows, width = seqs.input_ids.shape
    calls = []
    decoder = type(pm.decoder)
    forward = decoder.forward
    monkeypatch.setattr(
        decoder, "forward", lambda self, **kw: calls.append(len(kw["input_ids"])) or forward(self, **kw)
    )
    with torch.no_grad():
        whole = pm.hidden_states(seqs.input_ids, mask, position_ids(mask))
    assert calls == [rows]
    per_row = pm.inference_chunk_bytes // inference_rows(pm, width)  # the estimate for one row, at least
    monkeypatch.setattr(pm, "inference_chunk_bytes", per_row * 2)  # two rows' worth
    calls.clear()
    with torch.no_grad():
        chunked = pm.hidden_states(seqs.input_ids, mask, position_ids(mask))
    assert inference_rows(pm, width) == 2 and calls == [2] * (rows // 2) + [rows % 2] * (rows % 2)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    calls.clear()
    pm.hidden_states(seqs.input_ids, mask, position_ids(mask)).sum().backward()
    assert calls == [rows]
    pm.model.zero_grad(set_to_none=True)
    monkeypatch.setattr(pm, "inference_chunk_bytes", 1)  # below one row: a row at a time
    calls.clear()
    with torch.no_grad():
        single = pm.hidden_states(seqs.input_ids, mask, position_ids(mask))
    assert calls == [1] * rows
    torch.testing.assert_close(single, whole, atol=1e-5, rtol=1e-5)
