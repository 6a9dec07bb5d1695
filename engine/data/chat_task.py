"""A built-in task spoken through a real model's chat template (docs/real-model.md).

The built-in tasks write their prompts as plain user text ("describe the soup ."). A pretrained instruct
model expects them inside its chat template (system turn, `<|im_start|>user ... <|im_end|>`, the
assistant cue), exactly as it was tuned on, so every place text meets the model (SFT, the reward model's
pairs, rollouts, the evaluation, the samples) gets the rendered prompt, while the gold scorer and the
judges read the user's words: `gold(rendered, answer)` scores `gold(user_text, answer)`.

Built-in models have no chat template and their tasks are used as they are (nothing changes for them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.data.examples import Example, PreferencePair
from engine.data.prompts import format_prompt, has_chat_template


class PromptTooLong(ValueError):
    """The rendered prompts do not fit model.max_prompt_tokens; the message is one sentence."""


class ChatTask:
    """`task` with every prompt rendered through `tokenizer`'s chat template."""

    def __init__(self, task: Any, tokenizer: Any):
        self.task = task
        self.tokenizer = tokenizer
        self.name = task.name
        self.has_gold = task.has_gold
        self._user_text: dict[str, str] = {}

    def render(self, user_text: str) -> str:
        rendered = format_prompt(self.tokenizer, user_text)
        self._user_text[rendered] = user_text
        return rendered

    def user_text(self, prompt: str) -> str:
        """The user's words of a rendered prompt (a prompt this task did not render is its own text)."""
        return self._user_text.get(prompt, prompt)

    # -- data, rendered ----------------------------------------------------------------------------------
    def prompts(self, count: int, split: str) -> list[str]:
        return [self.render(p) for p in self.task.prompts(count, split)]

    def sft_examples(self, count: int) -> list[Example]:
        return [dataclasses.replace(e, prompt=self.render(e.prompt)) for e in self.task.sft_examples(count)]

    def preference_pairs(self, count: int) -> list[PreferencePair]:
        return [
            dataclasses.replace(p, prompt=self.render(p.prompt)) for p in self.task.preference_pairs(count)
        ]

    def held_out_pairs(self, count: int) -> list[PreferencePair]:
        return [dataclasses.replace(p, prompt=self.render(p.prompt)) for p in self.task.held_out_pairs(count)]

    # -- unchanged ---------------------------------------------------------------------------------------
    def corpus(self) -> list[str]:
        return self.task.corpus()

    def pretraining_text(self) -> list[str]:
        return self.task.pretraining_text()

    def gold(self, prompt: str, response: str, finished: bool = True) -> float:
        return self.task.gold(self.user_text(prompt), response, finished)


def speak_through_chat_template(task: Any, tokenizer: Any, max_prompt_tokens: int) -> Any:
    """The task as the model should see it: a built-in task behind the tokenizer's chat template when it
    has one (datasets render their own prompts in `bind`); refuses prompts the template makes longer
    than model.max_prompt_tokens, since truncating them would cut the assistant cue."""
    if hasattr(task, "bind") or not has_chat_template(tokenizer):
        return task
    chat = ChatTask(task, tokenizer)
    sample = chat.prompts(64, "train") + chat.prompts(64, "eval")
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in sample)
    if longest > max_prompt_tokens:
        raise PromptTooLong(
            f"model.max_prompt_tokens = {max_prompt_tokens} is shorter than this task's prompts in the "
            f"model's chat template (up to {longest} tokens); set it to at least {longest}"
        )
    return chat
