"""A first-order update's forward and backward a chunk of rows at a time (gradient accumulation), so that
the activations kept for the backward are those of a chunk, not of the whole batch.

Kept activations grow with the tokens of a pass (builtin:base10m, 64 x 56 tokens: about 760 MiB estimated).
On the CPU a chunk of rows whose estimate fits KEPT_CHUNK_BYTES keeps them bounded without recomputing
anything, where activation checkpointing pays one more forward of the body per backward; a chunk that
still exceeds "auto" checkpointing's budget (a row or MIN_CHUNK_TOKENS too many for it) is checkpointed as
before. The gradient is the batch's to float32 rounding: each chunk's loss is scaled by its share
of the batch before its backward, and the gradients add up in `.grad`. docs/architecture.md, "Memory"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.training.rollout import Sequences, token_logprobs
from engine.training.row_chunks import ALL_ROWS, row_chunks
from engine.training.telemetry import Counters

KEPT_CHUNK_BYTES = 128 * 2**20  # activations a chunk of rows keeps for its backward, estimated
MIN_CHUNK_TOKENS = 128  # fewer are slow on the CPU (SmolLM2: one 64-token row a chunk 6.4 s, two 4.6 s)
# loss_of(rows, the forward's outputs for those rows: by default their new per-token log-probs) -> (the
# chunk's part of the batch's loss, its part of each statistic): the parts add up over the chunks to the
# batch's values
ChunkLoss = Callable[[slice, Any], tuple[torch.Tensor, dict[str, float]]]


def rows_per_backward(pm: Any, width: int) -> int:  # a models.PreferenceModel
    """Rows of `width` tokens whose kept activations (every layer's, estimated as "auto" checkpointing
    estimates them) fit KEPT_CHUNK_BYTES, but at least MIN_CHUNK_TOKENS tokens' worth (and one row). On a
    GPU the batch stays whole (splitting costs a GPU throughput; there "auto" checkpointing bounds the
    kept activations as before)."""
    per_token = pm.kept_bytes_per_token
    if per_token <= 0 or pm.device.type != "cpu":
        return ALL_ROWS
    width = max(1, width)
    return max(1, KEPT_CHUNK_BYTES // (per_token * width), -(-MIN_CHUNK_TOKENS // width))


def backward_in_chunks(
    pm: Any,
    seqs: Sequences,
    counters: Counters,
    loss_of: ChunkLoss,
    *,
    forward: Callable[[Sequences], Any] | None = None,
    group: int = 1,
    after_group: Callable[[], None] | None = None,
) -> tuple[float, dict[str, float]]:
    """Forward and backward the active adapter on even chunks of rows (`rows_per_backward`), adding their
    gradients; returns the batch's loss and statistics (sums of the parts `loss_of` returns). Counted as one
    forward and one backward pass of the batch.

    `forward(chunk)`: what `loss_of` receives for a chunk's rows (default: the active adapter's per-token
    log-probs; PPO's adds its values). `group`: rows that must share a chunk, stored next to each other
    (online DPO's chosen and rejected answer of a pair: group 2). `after_group()`: each chunk is then exactly
    one group, and this is called after its backward (zopro's per-prompt gradient snapshots)."""
    rows, width = seqs.input_ids.shape
    if rows % group:
        raise ValueError(f"{rows} rows do not make groups of {group}")
    forward = forward or (lambda chunk: token_logprobs(pm, chunk, None))
    loss_total, stats_total = 0.0, {}
    per_chunk = 1 if after_group is not None else max(1, rows_per_backward(pm, width) // group)
    for groups in row_chunks(rows // group, per_chunk):
        part = slice(groups.start * group, groups.stop * group)
        loss, stats = loss_of(part, forward(seqs.select(torch.arange(part.start, part.stop))))
        loss.backward()
        if after_group is not None:
            after_group()
        loss_total += float(loss.detach())
        for key, value in stats.items():
            stats_total[key] = stats_total.get(key, 0.0) + value
    counters.add(forward_passes=1, tokens=int(seqs.attention_mask.sum()), backward_passes=1)
    return loss_total, stats_total


def gradient_of(param: torch.Tensor) -> torch.Tensor:
    """A float32 copy of `param.grad` (zeros where it has none)."""
    if param.grad is None:
        return torch.zeros_like(param, dtype=torch.float32)
    return param.grad.detach().float().clone()


class GroupGradients:
    """Each group's own gradient out of a backward done a group at a time (`after_group`): the change of
    the parameters' `.grad` since the previous group, in float32 on their device."""

    def __init__(self, named_params: dict[str, torch.Tensor]):
        self.named_params = named_params
        self.gradients: list[dict[str, torch.Tensor]] = []
        self.total: dict[str, torch.Tensor] | None = None

    def __call__(self) -> None:
        now = {name: gradient_of(p) for name, p in self.named_params.items()}
        last = self.total
        self.gradients.append(now if last is None else {name: now[name] - last[name] for name in now})
        self.total = now


def backward_for_update(
    pm: Any,
    seqs: Sequences,
    counters: Counters,
    loss_of: ChunkLoss,
    *,
    dist: Any,
    named_params: dict[str, torch.Tensor],
    weight: float,
    on_gradient: Callable[[dict[str, torch.Tensor]], None] | None = None,
    per_prompt: int = 0,
) -> tuple[float, dict[str, float]]:
    """A first-order method's backward on the active adapter (`backward_in_chunks`), its gradients then the
    mean over every rank's `weight` items (`dist.sync_gradients`). `on_gradient({name: raw gradient})`
    sees, before the clip, the batch's gradient; or, with `per_prompt = k`, each prompt's (its k answers'
    part of the loss, the backward a prompt at a time), gathered over the ranks in rank order before the
    sync: zopro's subspace snapshots (`zopro.subspace_gradients`, docs/method.md section 3)."""
    prompts = GroupGradients(named_params) if on_gradient is not None and per_prompt else None
    loss, stats = backward_in_chunks(
        pm, seqs, counters, loss_of, group=per_prompt if prompts else 1, after_group=prompts
    )
    if prompts is not None:
        local = [{name: t.cpu() for name, t in gradient.items()} for gradient in prompts.gradients]
        for gradient in dist.gather(local, "the per-prompt gradient snapshots"):
            on_gradient({name: t.to(named_params[name].device) for name, t in gradient.items()})
    dist.sync_gradients(named_params.values(), weight)
    if on_gradient is not None and prompts is None:
        on_gradient({name: p.grad for name, p in named_params.items()})
    return loss, stats
