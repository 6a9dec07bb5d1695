"""Judges: which of two answers to a prompt is better (gold scorer, the current reward model; llm later)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from engine.training.models import PreferenceModel
from engine.training.rollout import encode_responses, reward_scores
from engine.training.telemetry import Counters


class Judge(Protocol):
    name: str

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[int | None]:
        """For each prompt, 0 when the first answer is better, 1 when the second is, None when no verdict."""


class GoldJudge:
    """The task's programmatic scorer: the true preference of a built-in task. Ties give no verdict."""

    name = "gold"

    def __init__(self, task):
        self.task = task

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[int | None]:
        verdicts: list[int | None] = []
        for prompt, a, b in zip(prompts, first, second, strict=True):
            ga, gb = self.task.gold(prompt, a), self.task.gold(prompt, b)
            verdicts.append(None if abs(ga - gb) < 1e-9 else (0 if ga > gb else 1))
        return verdicts


class RewardJudge:
    """The current reward model: no new information, the self-training baseline."""

    name = "reward"

    def __init__(
        self, models: PreferenceModel, counters: Counters, max_prompt_tokens: int, max_new_tokens: int
    ):
        self.models, self.counters = models, counters
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens

    @torch.no_grad()
    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[int | None]:
        scores = []
        for answers in (first, second):
            seqs = encode_responses(
                self.models,
                prompts,
                answers,
                max_prompt_tokens=self.max_prompt_tokens,
                max_new_tokens=self.max_new_tokens,
            )
            scores.append(reward_scores(self.models, seqs.input_ids, seqs.attention_mask, self.counters))
        return [
            None if a == b else (0 if a > b else 1)
            for a, b in zip(scores[0].tolist(), scores[1].tolist(), strict=True)
        ]


VERDICT_PROMPT = (
    "Which answer to the question is better? Reply with one letter, A or B.\n\n"
    "Question: {prompt}\n\nAnswer A: {first}\n\nAnswer B: {second}\n\nThe better answer is"
)


def parse_verdict(text: str) -> int | None:
    """'A' -> 0, 'B' -> 1, anything else -> None (unparseable, dropped and counted)."""
    token = text.strip().strip(".:()*\"'").upper()
    if token in ("A", "B"):
        return 0 if token == "A" else 1
    return None


class LLMJudge:
    """A local instruction model through transformers, shown the prompt and the two answers (the pipeline
    randomises their order), asked for a one-token verdict, read greedily."""

    name = "llm"

    def __init__(
        self,
        model_path: str,
        *,
        device: torch.device,
        dtype: str,
        counters: Counters,
        max_input_tokens: int = 1024,
        user_text: Callable[[str], str] | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engine.training.models import ModelError

        torch_dtype = getattr(torch, dtype)  # refine.judge_dtype: one of the recipe's DTYPES, torch's names
        if device.type == "cpu" and torch_dtype != torch.float32:
            torch_dtype = torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
        except (OSError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelError(f"cannot load refine.judge_model = {model_path!r}: {first[:200]}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.device, self.counters, self.max_input_tokens = device, counters, max_input_tokens
        self.user_text = user_text or (lambda prompt: prompt)  # the words of a chat-rendered prompt

    def render(self, prompt: str, first: str, second: str) -> str:
        text = VERDICT_PROMPT.format(
            prompt=self.user_text(prompt).strip(), first=first.strip(), second=second.strip()
        )
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    @torch.no_grad()
    def verdict_texts(
        self, prompts: list[str], first: list[str], second: list[str], batch: int = 8
    ) -> list[str]:
        texts = [self.render(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)]
        out: list[str] = []
        for start in range(0, len(texts), batch):
            enc = self.tokenizer(
                texts[start : start + batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_input_tokens,
                add_special_tokens=False,
            ).to(self.device)
            mask = enc["attention_mask"]
            logits = self.model(**enc, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1, :]
            self.counters.add(forward_passes=1, tokens=int(mask.sum()))
            out.extend(self.tokenizer.decode([t]) for t in logits.argmax(-1).tolist())
        return out

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[int | None]:
        return [parse_verdict(text) for text in self.verdict_texts(prompts, first, second)]
