"""Row probes: every answer of a batch probes its own direction (docs/method.md section 3.2).

A zeroth-order update of q directions probes the whole batch along each: q forward passes (one-sided) or
2q (two-sided) for q numbers. The clipped surrogate is a mean over rows, and row j's term l_j depends on
the policy only through row j's log-probs, so row j can be scored at theta + eps z_j, with a z_j of its
own, in the same pass as every other row: one pass gives N directional derivatives (EGGROLL, arXiv
2511.16652, batches low-rank perturbations the same way). With the subspace sampler z_j = Q c_j, and a
LoRA layer computes row j through A + dA_j and B + dB_j, dA_j and dB_j being the basis rows of A and B
times c_j (`lora_forward._row_probed`); the parameters themselves are never moved.

    g_j = (l_j(theta + eps z_j) - l_j(theta)) / eps                 one_sided, one pass for N rows
    g_j = (l_j(theta + eps z_j) - l_j(theta - eps z_j)) / (2 eps)   two_sided, two passes
    theta <- theta - lr * ((1/q) sum_j f_j z_j + wd * theta)         q = N x rounds, f: fitness, RMS, clip

l_j(theta) at the rollout's policy is known without a pass (every ratio is 1: l_j = -A_j / N). Since
E[z z'] = (R^2 / r) Q Q', sum_j g_j z_j estimates the batch gradient projected on the basis, as q
batch-wide directions do, but from per-answer gradients: noisier per direction, N of them per pass.
`directions` counts rounds: each round draws a fresh direction for every row (seeded by the update, the
round and the row's index in the whole batch, so ranks and resumed runs agree); the step is one r-vector
w = sum_j f_j c_j applied as Q w. Pure library: no file I/O, no global RNG.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.training.methods.zeroth_order.samplers import SubspaceSampler
from engine.training.methods.zeroth_order.spsa import (
    RunningRMS,
    ZOStepResult,
    decays,
    direction_seed,
    mean_or_nan,
    step_coefficients,
)
from engine.training.objectives import surrogate_per_row
from engine.training.rollout import (
    LOGITS_CHUNK_BYTES,
    Rollout,
    Sequences,
    chosen_logprobs,
    position_ids,
    token_logprobs,
)
from engine.training.row_chunks import inference_rows, row_chunks


@dataclass(frozen=True)
class ProbedLayer:
    """One LoRA layer and the rows of the subspace basis that belong to its A and B."""

    module: nn.Module
    basis_a: Tensor  # (numel(A), r)
    basis_b: Tensor  # (numel(B), r)


def probed_layers(
    model: nn.Module, params: Mapping[str, Tensor], sampler: SubspaceSampler, adapter: str
) -> list[ProbedLayer]:
    """Every LoRA layer of `model` whose A and B of `adapter` are in `params` (by full peft name)."""
    slices = {name: rows for name, _, rows in sampler.slices(params)}
    layers = []
    for name, module in model.named_modules():
        a, b = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
        if a in slices and b in slices:
            layers.append(ProbedLayer(module, slices.pop(a), slices.pop(b)))
    if slices:
        raise ValueError(f"row probes need each adapter tensor in a LoRA layer; left over: {sorted(slices)}")
    return layers


@contextlib.contextmanager
def probing(layers: list[ProbedLayer], coefficients: Tensor) -> Iterator[None]:
    """Inside, without autograd, row j of a batch runs through every layer at theta + Q coefficients[j]."""
    try:
        for layer in layers:
            layer.module.zopro_row_probe = (layer.basis_a, layer.basis_b, coefficients)
        yield
    finally:
        for layer in layers:
            layer.module.zopro_row_probe = None


def row_terms(
    pm,
    layers: list[ProbedLayer],
    rollout: Rollout,
    coefficients: Tensor | None,
    clip_range: float,
    copies: int = 1,
):
    """Each local row's surrogate term (divided by the whole batch's rows), row j at theta + Q c_j (theta
    itself with `coefficients` None), a chunk of rows at a time (`inference_rows`). `copies` > 1: the
    batch `copies` times over in one pass, copy k's rows with coefficients[k * rows : (k + 1) * rows]
    (several rounds of probes together); the terms come in the same order."""
    seqs = rollout.sequences
    rows = seqs.input_ids.shape[0]
    source = torch.arange(rows).repeat(copies)  # the batch row each row of the pass copies
    terms = []
    for part in row_chunks(rows * copies, inference_rows(pm, seqs.input_ids.shape[1])):
        which = source[part]
        chunk = seqs.select(which)
        if coefficients is None:
            logprobs = token_logprobs(pm, chunk, None)
        else:
            logprobs = _probed_logprobs(pm, layers, chunk, coefficients[part])
        which = which.to(rollout.advantages.device)
        terms.append(
            surrogate_per_row(logprobs, rollout.old_logprobs[which], rollout.advantages[which], clip_range)
        )
    return torch.cat(terms).double() / (rollout.total_rows or rows)


def _probed_logprobs(pm, layers: list[ProbedLayer], seqs: Sequences, coefficients: Tensor) -> Tensor:
    """`token_logprobs` with row j at theta + Q c_j. The body runs the rows together; the lm_head (an
    adapted layer in some models) too, up to the longest answer's last token, as many rows at a time as keep
    their float32 logits under `LOGITS_CHUNK_BYTES` (at least one: a real vocabulary, 49k x 16 tokens, is
    3 MiB a row); each row's logits are its own."""
    mask = seqs.attention_mask
    with probing(layers, coefficients):
        hidden = pm.hidden_states(seqs.input_ids, mask, position_ids(mask))
    hidden = hidden[:, seqs.prompt_width - 1 : -1, :]  # position t predicts response token t
    rows = seqs.response_ids.shape[0]
    logprobs = torch.zeros(seqs.response_ids.shape, dtype=torch.float32, device=hidden.device)
    kept = seqs.response_mask.bool()
    used = kept.any(0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 0  # padding after the longest answer: no logits
    vocab = pm.lm_head.weight.shape[0]
    for part in row_chunks(rows, LOGITS_CHUNK_BYTES // max(1, 4 * vocab * width)):
        with probing(layers, coefficients[part]):
            logits = pm.lm_head(hidden[part, :width]).float()
        chosen = chosen_logprobs(logits.reshape(-1, vocab), seqs.response_ids[part, :width].reshape(-1))
        logprobs[part, :width] = chosen.view(-1, width).masked_fill(~kept[part, :width], 0.0)
    return logprobs


def row_probe_update(
    pm,
    params: Mapping[str, Tensor],
    rollout: Rollout,
    sampler: SubspaceSampler,
    *,
    adapter: str,
    run_seed: int,
    update_index: int,
    eps: float,
    lr: float,
    clip_range: float,
    rounds: int = 1,
    rounds_per_pass: int = 1,
    estimator: str = "one_sided",
    fitness: str = "raw",
    weight_decay: float = 0.0,
    g_clip: float | None = None,
    normalizer: RunningRMS | None = None,
    at_rollout_policy: bool = True,
    direction_offset: int = 0,
    sums: Callable[[list[float]], list[float]] | None = None,
    count_pass: Callable[[int], None] | None = None,
) -> ZOStepResult:
    """One update of `params` in place from row probes (module docstring). `at_rollout_policy`: the
    policy is the one that sampled the rollout, so l_j(theta) needs no pass (a one-sided estimate after an
    earlier update on the same rollout costs one more). `sums`: the sum over ranks of a list of numbers;
    `count_pass(copies)`: called once per forward pass, over `copies` times the local rows.
    `rounds_per_pass`: that many rounds' probes run together, the batch repeated in one pass (0: every
    round in one); the estimate is the same to float rounding, in fewer passes of more rows each."""
    sampler.check(params)
    layers = probed_layers(pm.model, params, sampler, adapter)
    rows = rollout.sequences.input_ids.shape[0]
    total = rollout.total_rows or rows
    first = rollout.first_row
    local = slice(first, first + rows)

    def passed(terms: Tensor, copies: int = 1) -> Tensor:
        if count_pass is not None:
            count_pass(copies)
        return terms

    two_sided = estimator == "two_sided"
    with torch.no_grad():
        base = None
        if estimator == "one_sided":
            if at_rollout_policy:
                old = rollout.old_logprobs
                base = surrogate_per_row(old, old, rollout.advantages, clip_range).double() / total
            else:
                base = passed(row_terms(pm, layers, rollout, None, clip_range))
        coefficients, g_raw, plus_sum, minus_sum = [], [], 0.0, 0.0
        together = rounds if rounds_per_pass < 1 else min(rounds, rounds_per_pass)
        starts = range(0, rounds, together)  # one pass each (two two-sided)
        for first_round in starts:
            group = range(first_round, min(rounds, first_round + together))
            every = [  # (total, r) per round
                torch.stack(
                    [
                        sampler.coefficients(
                            direction_seed(run_seed, update_index, direction_offset + k * total + j)
                        )
                        for j in range(total)
                    ]
                )
                for k in group
            ]
            probe = torch.cat([each[local] for each in every])
            copies = len(group)
            plus_all = passed(row_terms(pm, layers, rollout, eps * probe, clip_range, copies), copies)
            if two_sided:
                minus_all = passed(row_terms(pm, layers, rollout, -eps * probe, clip_range, copies), copies)
            else:
                minus_all = base.repeat(copies)
            g_all = (plus_all - minus_all) / (2.0 * eps if two_sided else eps)
            for plus, minus, g_local, each in zip(
                plus_all.split(rows), minus_all.split(rows), g_all.split(rows), every, strict=True
            ):
                whole = [0.0] * total
                whole[local] = g_local.tolist()
                g_raw.extend(sums(whole) if sums is not None else whole)
                coefficients.append(each)
                plus_sum, minus_sum = plus_sum + float(plus.sum()), minus_sum + float(minus.sum())

        g_used, skipped, clipped = step_coefficients(g_raw, fitness, normalizer, g_clip)
        step_norm = 0.0
        if not skipped and lr > 0:
            c = torch.cat(coefficients)
            weights = torch.tensor(g_used, dtype=c.dtype, device=c.device) * (-lr / len(g_used))
            step_norm = _apply(params, sampler, weights @ c, lr * weight_decay)

    return ZOStepResult(
        g=mean_or_nan(g_used),
        g_raw=mean_or_nan(g_raw),
        abs_g=mean_or_nan([abs(g) for g in g_raw]),
        skipped=skipped,
        loss_plus=plus_sum / rounds,
        loss_minus=minus_sum / rounds,
        forward_passes=len(starts) * (2 if two_sided else 1)
        + (estimator == "one_sided" and not at_rollout_policy),
        cos_z_mu=0.0,
        cos_z_v=0.0,
        decay=0.0,
        directions=len(g_raw),
        clipped=clipped,
        z_norm=sampler.norm,
        step_norm=step_norm,
        g_rms=normalizer.rms if normalizer is not None else 0.0,
    )


def _apply(params: Mapping[str, Tensor], sampler: SubspaceSampler, w: Tensor, decay: float) -> float:
    """theta_k <- theta_k + Q_k w - decay theta_k [k decays]; returns the step's norm."""
    square = 0.0
    for name, param, rows in sampler.slices(params):
        step = (rows @ w).view(param.shape).to(param.device)
        if decay > 0 and decays(name):
            step = step.add_(param, alpha=-decay)
        param.add_(step)
        square += float((step.double() ** 2).sum())
    return math.sqrt(square)
