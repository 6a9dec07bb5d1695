"""Prompts for preference data: the plain and task templates, and rendering user text through the
tokenizer's chat template when it has one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.data.examples import DataError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Plain prompt for user text when the tokenizer has no chat template.
PLAIN_PROMPT_TEMPLATE = "User: {text}\nAssistant:"
#: OpenAI's TL;DR query format for Reddit posts (summarize_from_feedback).
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
#: OpenAI's CNN/DM query format (trailing newline dropped so both end in ``TL;DR:``).
CNNDM_TEMPLATE = "Article:\n{article}\n\nTL;DR:"
#: Translation task text for wmt20_mlqe rows; language names from the config's ISO codes.
WMT_TEMPLATE = "Translate the following {src_name} text into {tgt_name}.\n\n{src_name}: {source}\n{tgt_name}:"


# ---------------------------------------------------------------------------------------------
# Prompt formatting


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a broken template is a tokenizer problem, not a data problem
        raise DataError(
            f"The tokenizer's chat template failed to render a prompt ({first_line(exc)})."
        ) from exc
    if not isinstance(rendered, str):
        raise DataError("The tokenizer's chat template did not return text for tokenize=False.")
    return rendered


def format_prompt(tokenizer: PreTrainedTokenizerBase | None, user_text: str) -> str:
    """Render user text as a generation prompt: the chat template if any, else :data:`PLAIN_PROMPT_TEMPLATE`."""
    if has_chat_template(tokenizer):
        return apply_chat_template(tokenizer, [{"role": "user", "content": user_text}])
    return PLAIN_PROMPT_TEMPLATE.format(text=user_text)


def format_task_prompt(tokenizer: PreTrainedTokenizerBase | None, task_text: str) -> str:
    """Task texts that end in a completion cue stay raw without a chat template."""
    if has_chat_template(tokenizer):
        return apply_chat_template(tokenizer, [{"role": "user", "content": task_text}])
    return task_text


def join_prompt_response(prompt: str, response: str) -> str:
    """Join a prompt and a plain answer: one space after a prompt that does not end in whitespace."""
    if not prompt or prompt[-1].isspace():
        return prompt + response
    return f"{prompt} {response}"
