"""The rollout shared by every online method: sample answers, log-probs, reference log-probs, reward
scores, sequence KL, rlhf reward and RLOO advantages (docs/method.md section 2). Written once, used by all."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.training.models import PreferenceModel
from engine.training.telemetry import Counters, release_free_memory


@dataclass
class Sequences:
    """Prompts (left padded) followed by responses (right padded); one row per sampled answer."""

    prompts: list[str]
    responses: list[str]
    input_ids: torch.Tensor  # (N, P + R)
    attention_mask: torch.Tensor  # (N, P + R)
    response_mask: torch.Tensor  # (N, R) 1 for response tokens (EOS included)
    prompt_width: int
    finished: torch.Tensor  # (N,) bool: the answer ended with EOS

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    def select(self, rows: torch.Tensor) -> Sequences:
        """The rows `rows` of this batch, in the same layout."""
        picked = rows.tolist()
        return dataclasses.replace(
            self,
            prompts=[self.prompts[i] for i in picked],
            responses=[self.responses[i] for i in picked],
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            finished=self.finished[rows],
        )


@dataclass
class Rollout:
    """One update's batch with everything the surrogate losses need."""

    sequences: Sequences
    old_logprobs: torch.Tensor  # (N, R) per-token, sampling policy
    ref_logprobs: torch.Tensor  # (N, R) per-token, sft adapter
    scores: torch.Tensor  # (N,) reward model (clipped to [-reward_clip, reward_clip]), missing-EOS penalty
    kl: torch.Tensor  # (N,) sequence KL estimate sum_t (logp - logp_ref)
    rlhf_reward: torch.Tensor  # (N,) score - beta * kl
    advantages: torch.Tensor  # (N,) RLOO: R_j - mean of the other k - 1 (whitened over the batch if asked)
    samples_per_prompt: int
    kl_coef: float = 0.0  # the beta of this rollout (fixed, or the adaptive controller's value)
    raw_scores: torch.Tensor | None = None  # (N,) the reward model's scores before clipping and penalty
    first_row: int = 0  # where these rows start in the whole batch (a rank's share; 0 with one process)
    total_rows: int | None = None  # rows in the whole batch over all ranks (None: these N)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so recomputed log-probs match sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(
    pm: PreferenceModel, prompts: list[str], max_prompt_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    tok = pm.tokenizer
    batch = tok(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        add_special_tokens=False,
    )
    return batch["input_ids"].to(pm.device), batch["attention_mask"].to(pm.device)


# float32 logits held at once by the chunked log-probs (one chunk of rows x vocabulary)
LOGITS_CHUNK_BYTES = 32 * 2**20


def chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, without the full log-softmax."""
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return chosen_logprobs(head(hidden).float(), targets)


def selective_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> torch.Tensor:
    """log softmax(head(hidden))[target] for each position, float32, shape of `targets`; zero where `mask`
    is 0. Only the masked-in rows are computed, a chunk of rows at a time, so at most one chunk of float32
    logits exists at once. Under autograd, when there are several chunks, each is recomputed in the backward
    (activation checkpointing) instead of being kept, so the backward holds one chunk's logits and their
    gradient; a single chunk keeps its logits for the backward, which holds them either way (recomputing
    them cost SmolLM2's rloo update, 16 x 42 tokens in chunks of 4 rows, 2.8-2.9 s against 2.4-2.5 s)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    rows = None
    if mask is not None:
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        flat_hidden, flat_targets = flat_hidden.index_select(0, rows), flat_targets.index_select(0, rows)
    vocab = head.weight.shape[0]
    step = max(1, chunk_bytes // (4 * vocab))
    grad = torch.is_grad_enabled()
    several = flat_hidden.shape[0] > step  # then each chunk's freed logits go back to the OS, or glibc
    parts = []  # keeps them resident chunk after chunk (SmolLM2, 49k vocabulary: +1.0 GB in one pass)
    for start in range(0, flat_hidden.shape[0], step):
        h, t = flat_hidden[start : start + step], flat_targets[start : start + step]
        if grad and several:
            parts.append(checkpoint(_chunk_logprobs, h, t, head, use_reentrant=False))
            parts[-1].register_hook(_release_in_backward)
        else:
            parts.append(_chunk_logprobs(h, t, head))
        if several:
            release_free_memory()
    values = torch.cat(parts) if parts else flat_hidden.new_zeros(0, dtype=torch.float32)
    if rows is not None:
        values = torch.zeros(targets.numel(), dtype=torch.float32, device=values.device).index_copy(
            0, rows, values
        )
    return values.view(targets.shape)


def _release_in_backward(grad: torch.Tensor) -> None:
    release_free_memory()


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator itself when it lives on `device`; else a generator on `device` seeded by one draw
    from it, so the same generator state gives the same samples and the draws stay on the device."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def sample(
    pm: PreferenceModel,
    prompts: list[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float,
    generator: torch.Generator,
    counters: Counters,
    rows: slice | None = None,
) -> Sequences:
    """Sample one answer per prompt with the active adapter (KV cache, explicit generator).

    `rows`: sample only these rows of the batch (this rank's share), padded to the whole batch's width and
    on the noise the whole batch would draw, so that an answer does not depend on the number of ranks.
    Each token is the exponential race argmax(p / E) with E = -log U, U ~ uniform from the generator: a
    draw from p, as multinomial sampling is, on noise that can be sliced by row."""
    return sample_with_logprobs(
        pm,
        prompts,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        generator=generator,
        counters=counters,
        rows=rows,
    )[0]


@torch.no_grad()
def sample_with_logprobs(
    pm: PreferenceModel,
    prompts: list[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float,
    generator: torch.Generator,
    counters: Counters,
    logprobs: bool = False,
    rows: slice | None = None,
) -> tuple[Sequences, torch.Tensor | None]:
    """`sample`, and with `logprobs` the per-token log-probs (temperature 1) of the sampled tokens under
    the sampling adapter, read from the sampler's own logits, (N, R) and zero on padding.

    Everything stays on the device: a DynamicCache, draws from a device generator, the prompt's logits
    only at its last position; the host learns whether every answer has ended only every few tokens on
    an accelerator (every token on the CPU, where that costs nothing). The uniform noise comes from
    `device_generator(generator)`: on the CPU the generator itself, so the same draws as before."""
    from transformers import DynamicCache

    tok, device = pm.tokenizer, pm.device
    input_ids, prompt_mask = encode_prompts(pm, prompts, max_prompt_tokens)
    total = input_ids.shape[0]
    if rows is not None:
        prompts = prompts[rows]
        input_ids, prompt_mask = input_ids[rows], prompt_mask[rows]
    else:
        rows = slice(0, total)
    if input_ids.shape[0] == 0:  # a rank whose share of a small batch is empty
        empty = input_ids.new_zeros((0, 0))
        seqs = Sequences(
            [], [], input_ids, prompt_mask, empty, input_ids.shape[1], torch.zeros(0, dtype=torch.bool)
        )
        return seqs, (empty.float() if logprobs else None)
    gen = device_generator(generator, device)
    cache = DynamicCache(config=pm.model.config)
    lm = pm.model.get_base_model()  # the injected adapters apply; no peft wrapper per decode step
    with pm.merged_lora(keep=True):  # a float32 base decodes with merged weights, made once
        mask = prompt_mask
        n, width = input_ids.shape
        eos, pad = tok.eos_token_id, tok.pad_token_id
        out = lm(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :]
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        next_pos = mask.long().sum(-1)
        check_every = 1 if device.type == "cpu" else 8
        new_tokens, new_mask, new_logprobs = [], [], []
        broken = torch.zeros((), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = logits.float()
            probs = torch.softmax(logits / temperature, dim=-1)
            broken = broken | ~torch.isfinite(probs).all()
            # argmax p_i / E_i with E_i = -log U_i ~ Exp(1) draws i with probability p_i (the exponential
            # race), on the device and without host synchronisation; the whole batch's noise, sliced by row
            noise = torch.rand((total, probs.shape[-1]), generator=gen, device=device)[rows]
            token = (probs / -torch.log(noise)).argmax(-1)
            alive = ~finished
            if logprobs:
                new_logprobs.append(chosen_logprobs(logits, token) * alive)
            token = torch.where(alive, token, torch.full_like(token, pad))
            new_tokens.append(token)
            new_mask.append(alive.long())
            finished = finished | (token == eos)
            if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
                break
            mask = torch.cat([mask, alive.long()[:, None]], dim=-1)
            out = lm(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                cache=cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :]
    if bool(broken):  # the loop's NaN/inf check, read once (the message the run's guard recognises)
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    response_ids = torch.stack(new_tokens, dim=1)
    response_mask = torch.stack(new_mask, dim=1)
    used = int(response_mask.any(0).nonzero().max()) + 1  # drop the steps taken after every answer ended
    response_ids, response_mask = response_ids[:, :used], response_mask[:, :used]
    counters.add(forward_passes=1, tokens=int(prompt_mask.sum() + response_mask.sum()))
    responses = [
        _decode(tok, ids, m, eos)
        for ids, m in zip(response_ids.tolist(), response_mask.tolist(), strict=True)
    ]
    full_ids = torch.cat([input_ids, response_ids], dim=1)
    full_mask = torch.cat([prompt_mask, response_mask], dim=1)
    seqs = Sequences(
        prompts=list(prompts),
        responses=responses,
        input_ids=full_ids,
        attention_mask=full_mask,
        response_mask=response_mask,
        prompt_width=width,
        finished=finished,
    )
    return seqs, (torch.stack(new_logprobs, dim=1)[:, :used] if logprobs else None)


def _decode(tok, ids: list[int], mask: list[int], eos: int) -> str:
    kept = [t for t, m in zip(ids, mask, strict=True) if m and t != eos]
    return tok.decode(kept, skip_special_tokens=True).strip()


def token_logprobs(pm: PreferenceModel, seqs: Sequences, counters: Counters | None) -> torch.Tensor:
    """Per-token log-probs of the response tokens under the active adapter, (N, R); zero on padding.
    The lm_head is applied to the response positions only, in chunks (`selective_logprobs`): the full
    float32 logits of the batch never exist, with or without autograd. `counters` None: not counted (a
    part of a pass that its caller counts)."""
    mask = seqs.attention_mask
    hidden = pm.hidden_states(seqs.input_ids, mask, position_ids(mask))
    if counters is not None:
        counters.add(forward_passes=1, tokens=int(mask.sum()))
    hidden = hidden[:, seqs.prompt_width - 1 : -1, :]  # position t predicts response token t
    return selective_logprobs(hidden, pm.lm_head, seqs.response_ids, seqs.response_mask)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    return mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)


def reward_scores(
    pm: PreferenceModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, counters: Counters
) -> torch.Tensor:
    """Score each sequence with the reward adapter and head, read at the last non-padding token."""
    with pm.adapter("reward"):
        hidden = pm.hidden_states(input_ids, attention_mask, position_ids(attention_mask))
    counters.add(forward_passes=1, tokens=int(attention_mask.sum()))
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return pm.score_head(last.float()).squeeze(-1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_j = R_j - mean of the other k - 1 rewards of the same prompt (rows grouped prompt-major)."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


Sums = Callable[[list], list[float]]  # several ranks: the sum over the ranks of each of a list of numbers


def whiten(values: torch.Tensor, eps: float = 1e-8, sums: Sums | None = None) -> torch.Tensor:
    """(x - mean) / std over the batch (TRL's normalize_advantages); a batch with no spread stays at 0.
    With `sums` the batch is every rank's: the moments are summed over the ranks."""
    if sums is None:
        centred = values - values.mean()
        if values.numel() < 2:
            return centred
        return centred / (centred.std() + eps)
    v = values.double()
    total, squares, count = sums([v.sum(), (v**2).sum(), v.numel()])
    mean = total / count
    std = math.sqrt(max(squares - count * mean**2, 0.0) / max(count - 1, 1))
    return ((v - mean) / (std + eps)).to(values.dtype)


def normal_tensors(value):
    """A dataclass (Rollout, Sequences) with each tensor field, nested ones included, copied outside
    inference mode (a cheap copy: token ids, masks and per-row numbers)."""
    changes = {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if isinstance(item, torch.Tensor):
            changes[field.name] = item.clone()
        elif dataclasses.is_dataclass(item):
            changes[field.name] = normal_tensors(item)
    return dataclasses.replace(value, **changes)


def in_inference_mode(function):
    """Run `function` under `torch.inference_mode`, which skips autograd's bookkeeping that `no_grad` still
    does (version counters, view tracking: SmolLM2, 16 x 32 tokens, generation 3-5 % and a scoring pass
    3-8 % faster), and copy the tensors of the dataclass it returns out as normal ones: an update's autograd
    may not save inference tensors (the token ids an embedding saves, for one)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            result = function(*args, **kwargs)
        return normal_tensors(result)

    return wrapper


@in_inference_mode
def collect_rollout(
    pm: PreferenceModel,
    prompts: list[str],
    *,
    k: int,
    kl_coef: float,
    missing_eos_penalty: float,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float,
    generator: torch.Generator,
    counters: Counters,
    reward_clip: float = 0.0,
    whiten_advantages: bool = False,
    prompt_rows: slice | None = None,
    sums: Sums | None = None,
) -> Rollout:
    """B prompts -> k answers each from the policy, with old and reference log-probs, scores and advantages.

    `reward_clip > 0` clips the reward model's scores to [-reward_clip, reward_clip] before the missing-EOS
    penalty and the KL term (TRL's reward_clip_range); `whiten_advantages` rescales the RLOO advantages to
    mean 0 and standard deviation 1 over the batch (TRL's normalize_advantages). `prompt_rows`: only these
    prompts' answers (a rank's share; the k answers of a prompt stay together for the RLOO baseline), with
    `sums` (the sum over ranks) to whiten over every rank's answers."""
    repeated = [p for p in prompts for _ in range(k)]
    rows = slice(prompt_rows.start * k, prompt_rows.stop * k) if prompt_rows is not None else None
    # In float32 the sampler's own log-probs equal a recomputation to ~1e-6 and save a forward pass; a
    # low-precision base recomputes them, as the update will, so the first ratio starts at exactly 1.
    from_sampler = pm.base_dtype == torch.float32
    with pm.adapter("policy"):
        seqs, old_logprobs = sample_with_logprobs(
            pm,
            repeated,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            temperature=temperature,
            generator=generator,
            counters=counters,
            logprobs=from_sampler,
            rows=rows,
        )
        if old_logprobs is None:
            old_logprobs = token_logprobs(pm, seqs, counters)
    with pm.adapter("sft"):
        ref_logprobs = token_logprobs(pm, seqs, counters)
    raw_scores = reward_scores(pm, seqs.input_ids, seqs.attention_mask, counters)
    scores = raw_scores.clamp(-reward_clip, reward_clip) if reward_clip > 0 else raw_scores
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~seqs.finished).float()
    kl = (old_logprobs - ref_logprobs).sum(-1)
    rlhf_reward = scores - kl_coef * kl
    advantages = rloo_advantages(rlhf_reward, k)
    if whiten_advantages:
        advantages = whiten(advantages, sums=sums)
    return Rollout(
        sequences=seqs,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        scores=scores,
        kl=kl,
        rlhf_reward=rlhf_reward,
        advantages=advantages,
        samples_per_prompt=k,
        kl_coef=kl_coef,
        raw_scores=raw_scores,
        first_row=rows.start if rows is not None else 0,
        total_rows=len(repeated),
    )


def encode_responses(
    pm: PreferenceModel,
    prompts: list[str],
    responses: list[str],
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
) -> Sequences:
    """Given (prompt, response) text pairs -> the same layout that sampling produces (prompt left padded,
    response right padded, EOS appended), so log-probs and scores treat data and samples alike."""
    tok = pm.tokenizer
    input_ids, prompt_mask = encode_prompts(pm, prompts, max_prompt_tokens)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        text = response if (not prompt or prompt[-1].isspace()) else " " + response
        ids = tok(text, add_special_tokens=False)["input_ids"][: max_new_tokens - 1] + [eos]
        rows.append(ids)
    width = max(len(r) for r in rows)
    response_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        response_ids[i, : len(ids)] = torch.tensor(ids)
        response_mask[i, : len(ids)] = 1
    response_ids, response_mask = response_ids.to(pm.device), response_mask.to(pm.device)
    return Sequences(
        prompts=list(prompts),
        responses=list(responses),
        input_ids=torch.cat([input_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=response_mask,
        prompt_width=input_ids.shape[1],
        finished=torch.ones(len(rows), dtype=torch.bool, device=pm.device),
    )
