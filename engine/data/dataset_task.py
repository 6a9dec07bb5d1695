"""A task made from a preference dataset (hh-rlhf, summarize_from_feedback, WMT20 MLQE or your own
table): the same interface as the built-in tasks, without a gold scorer."""

from __future__ import annotations

from engine.data.examples import Example, PreferencePair
from engine.data.preference_data import (
    DataError,
    DropReport,
    PreferenceSource,
    load_preferences,
)


class DatasetTask:
    """Prompts, SFT examples and preference pairs from one preference source.

    The last `eval_prompts` distinct prompts are held out for evaluation; the others are the training
    prompts. Rows are read once without a tokenizer (to train a built-in tokenizer on their text) and
    again with the model's tokenizer (its chat template, and the too-long filter) by `bind`.
    """

    has_gold = False

    def __init__(self, source: PreferenceSource, eval_prompts: int, seed: int):
        self.source = source
        self.name = f"dataset:{source.format}"
        self.eval_count = eval_prompts
        self.seed = seed
        self.rows, self.report = load_preferences(source)
        self._split()

    def bind(self, tokenizer, max_tokens: int) -> DropReport:
        """Re-read the rows formatted for this tokenizer, dropping those longer than `max_tokens`."""
        self.rows, self.report = load_preferences(self.source, tokenizer=tokenizer, max_tokens=max_tokens)
        self._split()
        return self.report

    def _split(self) -> None:
        prompts = list(dict.fromkeys(row.prompt for row in self.rows))
        if len(prompts) < 2:
            raise DataError(f"{self.source.path} has fewer than two distinct prompts; nothing to hold out")
        held = min(self.eval_count, max(1, len(prompts) // 5))
        self.eval_set = prompts[-held:]
        held_set = set(self.eval_set)
        self.train_rows: list[PreferencePair] = [row for row in self.rows if row.prompt not in held_set]
        self.train_set = list(dict.fromkeys(row.prompt for row in self.train_rows))

    # -- the task interface ------------------------------------------------------------------------------
    def prompts(self, count: int, split: str) -> list[str]:
        pool = self.eval_set if split == "eval" else self.train_set
        return [pool[i % len(pool)] for i in range(count)] if split != "eval" else pool[:count]

    def sft_examples(self, count: int) -> list[Example]:
        rows = self.train_rows
        return [
            Example(rows[i % len(rows)].prompt, rows[i % len(rows)].chosen)
            for i in range(min(count, len(rows)))
        ]

    def preference_pairs(self, count: int) -> list[PreferencePair]:
        rows = [row for row in self.train_rows if row.rejected]
        return rows[:count]

    def held_out_pairs(self, count: int) -> list[PreferencePair]:
        held = set(self.eval_set)
        rows = [row for row in self.rows if row.prompt in held and row.rejected]
        return rows[:count]

    def corpus(self) -> list[str]:
        return [text for row in self.rows for text in (row.prompt, row.chosen, row.rejected) if text]

    def pretraining_text(self) -> list[str]:
        return [f"{row.prompt} {row.chosen}" for row in self.rows]

    def gold(self, prompt: str, response: str, finished: bool = True) -> float:
        raise TypeError(f"{self.name} has no gold scorer")
