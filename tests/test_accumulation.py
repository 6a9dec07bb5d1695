"""First-order updates a chunk of rows at a time (gradient accumulation, engine/training/accumulation.py):
the same gradient, loss and statistics as one pass over the batch, for rloo and every loss aggregation of
the group presets; counted as one forward and one backward pass."""

from __future__ import annotations

import pytest
import torch

from engine.training import accumulation
from tests.nano import nano_preference_model
from tests.test_group_methods import method_update, rollout_of

AGGREGATIONS = ("sequence", "answer_token_mean", "token_mean", "constant")


@pytest.fixture(scope="module")
def pm(model_cache):
    # a policy apart from the reference, so the KL is not zero
    model, task = nano_preference_model(
        model_cache, ["q_proj", "v_proj", "down_proj", "lm_head"], moved=("policy",)
    )
    model.prompts = task.prompts(8, "test")
    return model


def update_with_gradient(pm, method: str, rollout, **settings):
    """(the gradient the optimiser's clip sees, metrics, counters) of one update of `method`; the trained
    parameters (the policy adapter, PPO's value head) are restored."""
    update, counters = method_update(pm, method, **settings)
    if method == "ppo":  # a value head away from its zero start, so the value loss reaches the adapter too
        with torch.no_grad():
            update.value_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    params = list(update.params)
    before = [p.detach().clone() for p in params]
    seen = {}
    clip = torch.nn.utils.clip_grad_norm_

    def capture(clipped, *args, **kwargs):
        clipped = list(clipped)
        seen.update({str(i): p.grad.detach().clone() for i, p in enumerate(clipped)})
        return clip(clipped, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = capture
    try:
        metrics = update.update(rollout, update_index=0, step_in_iteration=0)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        with torch.no_grad():
            for param, value in zip(params, before, strict=True):
                param.copy_(value)
    return seen, metrics, counters


def one_update(pm, method, rollout, rows_per_chunk, monkeypatch, **settings):
    """(raw gradient, metrics, counters, rows of each forward under autograd) of one update of `method`
    with the kept-activation budget set to `rows_per_chunk` rows of this batch; the adapter is restored."""
    width = rollout.sequences.input_ids.shape[1]
    monkeypatch.setattr(accumulation, "KEPT_CHUNK_BYTES", pm.kept_bytes_per_token * width * rows_per_chunk)
    monkeypatch.setattr(accumulation, "MIN_CHUNK_TOKENS", 1)
    rows = []
    decoder = type(pm.decoder)
    forward = decoder.forward

    def counted(self, **kwargs):
        if torch.is_grad_enabled():
            rows.append(len(kwargs["input_ids"]))
        return forward(self, **kwargs)

    monkeypatch.setattr(decoder, "forward", counted)
    seen, metrics, counters = update_with_gradient(pm, method, rollout, **settings)
    monkeypatch.setattr(decoder, "forward", forward)
    return seen, metrics, counters, rows


def assert_same_update(whole, chunked, forward_passes=1):
    (grads, metrics, counters, _), (chunked_grads, chunked_metrics, chunked_counters, _) = whole, chunked
    assert grads.keys() == chunked_grads.keys() and any(float(g.abs().max()) > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(
            chunked_grads[name], grad, atol=1e-6 * float(grad.abs().max()) + 1e-9, rtol=1e-4
        )
    assert chunked_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert chunked_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert (chunked_counters.forward_passes, chunked_counters.backward_passes) == (forward_passes, 1)
    assert (counters.forward_passes, counters.backward_passes) == (forward_passes, 1)
    assert chunked_counters.tokens == counters.tokens


def test_rloo_in_chunks_of_rows_is_the_whole_batchs_update(pm, monkeypatch):
    rollout = rollout_of(pm, pm.prompts[:4], seed=1, kl_coef=0.1)  # 12 rows
    noise = torch.randn(rollout.old_logprobs.shape, generator=torch.Generator().manual_seed(0))
    rollout.old_logprobs += 0.2 * noise * rollout.sequences.response_mask  # ratios away from 1: some clipped
    whole = one_update(pm, "rloo", rollout, 1000, monkeypatch)
    chunked = one_update(pm, "rloo", rollout, 5, monkeypatch)
    assert whole[3] == [12] and chunked[3] == [4, 4, 4]  # the fewest even chunks of at most 5 rows
    assert whole[1]["policy/clipfrac"] > 0
    assert_same_update(whole, chunked)
    assert one_update(pm, "rloo", rollout, 0, monkeypatch)[3] == [1] * 12  # one row over the budget


def test_a_chunk_holds_at_least_min_chunk_tokens_and_a_gpu_batch_stays_whole(pm, monkeypatch):
    monkeypatch.setattr(accumulation, "KEPT_CHUNK_BYTES", 0)
    monkeypatch.setattr(accumulation, "MIN_CHUNK_TOKENS", 100)
    assert accumulation.rows_per_backward(pm, 30) == 4 and accumulation.rows_per_backward(pm, 200) == 1
    monkeypatch.setattr(accumulation, "KEPT_CHUNK_BYTES", pm.kept_bytes_per_token * 30 * 7)
    assert accumulation.rows_per_backward(pm, 30) == 7
    monkeypatch.setattr(pm, "device", torch.device("meta"))
    assert accumulation.rows_per_backward(pm, 30) >= 1 << 40


def ragged(rollout):
    """The rollout with answers of different lengths (row i loses its last i % 5 tokens), so that a chunk's
    share of the tokens differs from its share of the answers."""
    seqs, width = rollout.sequences, rollout.sequences.prompt_width
    for row in range(len(seqs.prompts)):
        cut = seqs.response_mask.shape[1] - row % 5
        seqs.response_mask[row, cut:] = 0
        seqs.attention_mask[row, width + cut :] = 0
    for name in ("old_logprobs", "ref_logprobs"):
        setattr(rollout, name, getattr(rollout, name) * seqs.response_mask)
    return rollout


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_each_loss_aggregation_in_chunks_is_the_whole_batchs_update(pm, monkeypatch, aggregation):
    rollout = ragged(rollout_of(pm, pm.prompts[:4], seed=2, kl_coef=0.1))
    settings = {"loss_aggregation": aggregation, "kl_penalty": "loss", "updates_per_rollout": 1}
    whole = one_update(pm, "grpo", rollout, 1000, monkeypatch, **settings)
    chunked = one_update(pm, "grpo", rollout, 7, monkeypatch, **settings)
    assert whole[3] == [12] and chunked[3] == [6, 6]
    assert whole[1]["kl"] > 0
    assert_same_update(whole, chunked)


def test_ppo_in_chunks_of_rows_is_the_whole_batchs_update(pm, monkeypatch):
    """Token means over the minibatch, a value head read from the same hidden states: the same gradient
    (the adapter's and the value head's) and statistics in chunks; the old values' pass is the second."""
    rollout = ragged(rollout_of(pm, pm.prompts[:4], seed=3, kl_coef=0.1))
    noise = torch.randn(rollout.old_logprobs.shape, generator=torch.Generator().manual_seed(1))
    rollout.old_logprobs += 0.2 * noise * rollout.sequences.response_mask
    whole = one_update(pm, "ppo", rollout, 1000, monkeypatch)
    chunked = one_update(pm, "ppo", rollout, 5, monkeypatch)
    assert whole[3] == [12] and chunked[3] == [4, 4, 4]
    assert whole[1]["policy/clipfrac"] > 0 and whole[1]["loss/value"] > 0
    assert_same_update(whole, chunked, forward_passes=2)


def test_online_dpo_keeps_each_pair_in_one_chunk(pm, monkeypatch):
    """A pair's chosen and rejected answers share a chunk (4 pairs at most 3 rows a chunk: 2 + 2 + 2 + 2
    rows); the loss, its gradient and the margins are the whole batch's."""
    rollout = ragged(rollout_of(pm, pm.prompts[:4], seed=4, kl_coef=0.1))
    rollout.scores = torch.arange(len(rollout.scores), dtype=torch.float32) % 5  # no ties: 4 pairs
    whole = one_update(pm, "online_dpo", rollout, 1000, monkeypatch)
    chunked = one_update(pm, "online_dpo", rollout, 3, monkeypatch)
    assert whole[3] == [8] and chunked[3] == [2, 2, 2, 2]
    assert whole[1]["dpo/pairs"] == 4
    assert_same_update(whole, chunked)
