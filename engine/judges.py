"""Judges: which of two answers to a prompt is better (gold scorer, the current reward model; llm later)."""

from __future__ import annotations

from typing import Protocol

import torch

from engine.models import PreferenceModel
from engine.rollout import encode_responses, reward_scores
from engine.telemetry import Counters


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

    def __init__(self, pm: PreferenceModel, counters: Counters, max_prompt_tokens: int, max_new_tokens: int):
        self.pm, self.counters = pm, counters
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens

    @torch.no_grad()
    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[int | None]:
        scores = []
        for answers in (first, second):
            seqs = encode_responses(
                self.pm,
                prompts,
                answers,
                max_prompt_tokens=self.max_prompt_tokens,
                max_new_tokens=self.max_new_tokens,
            )
            scores.append(reward_scores(self.pm, seqs.input_ids, seqs.attention_mask, self.counters))
        return [
            None if a == b else (0 if a > b else 1)
            for a, b in zip(scores[0].tolist(), scores[1].tolist(), strict=True)
        ]
