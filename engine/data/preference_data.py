"""Load preference pairs (prompt, chosen, rejected, score) from upstream datasets or local tables.

Every source goes through the `datasets` library: a local file is read with the packaged
``json`` / ``parquet`` / ``csv`` builder picked by its extension, a local folder with
``load_dataset(folder)``, anything else is taken as a Hugging Face hub id. The same code thus
reads the hand-written test fixtures and, on a machine with a network, the real datasets.

Formats (``PreferenceSource.format``) and the choices made for each:

``hh_rlhf`` (``Anthropic/hh-rlhf``)
    Rows ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``. Both
    dialogues are split into turns at the ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` markers. The
    answers are the final Assistant turns (stripped); the prompt is every turn before them.
    **Divergence rule:** the two dialogues must agree on every turn before the final Assistant
    turn (compared after stripping whitespace). A pair whose dialogues diverge earlier is
    dropped as ``malformed``: taking the longest common turn prefix instead would turn whole
    Human/Assistant exchanges into "answers", which a policy must never learn to emit and which
    a reward model would score as different conversations. A dialogue that does not end in an
    Assistant turn, or has text before its first marker, is also ``malformed``; one with no
    non-blank Human turn in the prompt is ``empty_prompt``. Without a chat template the prompt
    is the raw text of the chosen dialogue up to and including its last ``\\n\\nAssistant:``
    marker (the DPO-paper convention); with one, the prompt turns become ``user`` /
    ``assistant`` messages (consecutive turns of one role are joined by a blank line).

``summarize_from_feedback`` (``openai/summarize_from_feedback``, config ``comparisons``)
    Rows ``{"info": {id, post, title, subreddit, site, article}, "summaries": [{text, policy,
    note}, {...}], "choice": 0|1, "worker", "batch", "split", "extra": {"confidence"}}``.
    chosen = ``summaries[choice].text``, rejected = the other one (both stripped of the leading
    space upstream texts carry). The task text uses OpenAI's TL;DR query format,
    :data:`TLDR_TEMPLATE` for Reddit posts and :data:`CNNDM_TEMPLATE` for CNN/DM rows (which
    carry ``article`` instead of ``post``); a missing subreddit or title line is left out.
    ``choice`` outside {0, 1}, not exactly two summaries, or neither post nor article is
    ``malformed``; a blank post/article is ``empty_prompt``. No score (``None``).

``wmt20_mlqe`` (``wmt/wmt20_mlqe_task1``, config ``en-de`` etc.)
    Rows ``{"segid", "translation": {src: source, tgt: MT output}, "scores", "mean",
    "z_scores", "z_mean", "model_score", "doc_id", "nmt_output", "word_probas"}``. The
    language pair comes from ``config`` (``"src-tgt"``), else from the local file or folder
    name when it has that shape, else ``en-de``. The task text is :data:`WMT_TEMPLATE`;
    chosen = the MT output ``translation[tgt]``; score = ``z_mean`` (mean z-standardised
    direct-assessment score, an extra regression target for the reward model; the upstream
    ``-10000`` placeholder of unscored test rows and missing values become ``None``).
    ``wmt_rejected`` says what the rejected answer is:

    * ``"source_copy"`` (default): a verbatim copy of the source sentence, the paper's trick -
      an untranslated copy is a response that is fluent yet certainly wrong, so every MT output
      yields a pair. A row whose MT output equals its source is dropped as ``identical``.
    * ``"none"``: no pair is formed; ``rejected`` is ``""`` and the row only carries prompt,
      chosen and score (for SFT or score regression). Consumers needing a pair must not use it.

``preference_table``
    A local (or hub) JSONL/JSON/Parquet/CSV/TSV table with ``prompt``, ``chosen``,
    ``rejected`` and optional ``score`` columns; ``PreferenceSource.columns`` renames them,
    e.g. ``{"prompt": "question", "chosen": "good", "rejected": "bad"}``. The prompt is user
    text and goes through :func:`format_prompt`.

Prompt formatting: when the tokenizer has a chat template, task texts become one ``user``
message rendered with ``add_generation_prompt=True``. Without one, plain user text (the
``preference_table`` prompts) uses :data:`PLAIN_PROMPT_TEMPLATE`, while the TL;DR and
translation task texts stay as they are, since they already end in a completion cue
(``TL;DR:`` / ``German:``). Answers are plain stripped text without EOS; join prompt and
answer with :func:`join_prompt_response` (one space after a prompt not ending in whitespace).

Bad rows are dropped and counted in a :class:`DropReport`, never raised, in this order:
``malformed`` (missing or ill-typed fields, ``choice`` not in {0, 1}, an empty answer,
diverging hh-rlhf dialogues), ``empty_prompt``, ``identical`` (chosen == rejected after
stripping), ``too_long`` (with a tokenizer and ``max_tokens``: prompt tokens + the longer
answer's tokens + 1 for the EOS the pipeline appends > ``max_tokens``; counted with
``add_special_tokens=False``). ``limit`` caps the rows *kept*; reading stops once it is met.
Configuration and loading problems raise :class:`DataError` with one sentence.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.data.examples import (
    DROP_REASONS,
    FORMATS,
    TABLE_KEYS,
    WMT_REJECTED,
    DataError,
    DropReport,
    PreferencePair,
    PreferenceSource,
)
from engine.data.files import load_dataset
from engine.data.prompts import (
    CNNDM_TEMPLATE,
    PLAIN_PROMPT_TEMPLATE,
    TLDR_TEMPLATE,
    WMT_TEMPLATE,
    apply_chat_template,
    format_prompt,
    format_task_prompt,
    has_chat_template,
    join_prompt_response,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CNNDM_TEMPLATE",
    "DROP_REASONS",
    "FORMATS",
    "PLAIN_PROMPT_TEMPLATE",
    "TLDR_TEMPLATE",
    "WMT_REJECTED",
    "WMT_TEMPLATE",
    "DataError",
    "DropReport",
    "PreferencePair",
    "PreferenceSource",
    "format_prompt",
    "join_prompt_response",
    "load_preferences",
]

_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "hh_rlhf": ("chosen", "rejected"),
    "summarize_from_feedback": ("info", "summaries", "choice"),
    "wmt20_mlqe": ("translation",),
}
_LANGUAGE_NAMES = {
    "de": "German",
    "en": "English",
    "et": "Estonian",
    "ne": "Nepali",
    "ro": "Romanian",
    "ru": "Russian",
    "si": "Sinhala",
    "zh": "Chinese",
}
_LANG_PAIR = re.compile(r"^([a-z]{2,3})-([a-z]{2,3})$")
_WMT_MISSING_SCORE = -10_000.0
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_CHUNK = 256


# ---------------------------------------------------------------------------------------------
# Row extraction: each returns a PreferencePair or the name of the drop reason


def _text(value: Any) -> str | None:
    """A string field, or None when missing (None, NaN from CSV) or not text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a number: {value!r}") from None
    return None if math.isnan(number) else number


def _hh_turns(dialogue: str) -> list[tuple[str, str, int]] | None:
    """Split an hh-rlhf dialogue into (role, stripped text, marker end offset); None if it has no shape."""
    matches = list(_HH_MARKER.finditer(dialogue))
    if not matches or dialogue[: matches[0].start()].strip():
        return None
    turns = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(dialogue)
        turns.append((match.group(1), dialogue[match.end() : end].strip(), match.end()))
    return turns


def _extract_hh(example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context) -> PreferencePair | str:
    chosen_text, rejected_text = _text(example.get("chosen")), _text(example.get("rejected"))
    if chosen_text is None or rejected_text is None:
        return "malformed"
    chosen_turns, rejected_turns = _hh_turns(chosen_text), _hh_turns(rejected_text)
    if not chosen_turns or not rejected_turns:
        return "malformed"
    if chosen_turns[-1][0] != "Assistant" or rejected_turns[-1][0] != "Assistant":
        return "malformed"
    prompt_turns = [(role, text) for role, text, _ in chosen_turns[:-1]]
    if prompt_turns != [(role, text) for role, text, _ in rejected_turns[:-1]]:
        return "malformed"  # the dialogues diverge before the final answer
    chosen, rejected = chosen_turns[-1][1], rejected_turns[-1][1]
    if not chosen or not rejected:
        return "malformed"
    if not any(role == "Human" and text for role, text in prompt_turns):
        return "empty_prompt"
    if has_chat_template(ctx.tokenizer):
        messages: list[dict[str, str]] = []
        for role, text in prompt_turns:
            chat_role = _HH_ROLES[role]
            if messages and messages[-1]["role"] == chat_role:
                messages[-1]["content"] = f"{messages[-1]['content']}\n\n{text}"
            else:
                messages.append({"role": chat_role, "content": text})
        prompt = apply_chat_template(ctx.tokenizer, messages)
    else:
        prompt = chosen_text[: chosen_turns[-1][2]]
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def _extract_summarize(
    example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context
) -> PreferencePair | str:
    info, summaries, choice = example.get("info"), example.get("summaries"), example.get("choice")
    if not isinstance(info, Mapping) or not isinstance(summaries, Sequence) or isinstance(summaries, str):
        return "malformed"
    if isinstance(choice, bool) or choice not in (0, 1) or len(summaries) != 2:
        return "malformed"
    texts = [_text(s.get("text")) if isinstance(s, Mapping) else None for s in summaries]
    if texts[0] is None or texts[1] is None:
        return "malformed"
    chosen, rejected = texts[int(choice)].strip(), texts[1 - int(choice)].strip()
    if not chosen or not rejected:
        return "malformed"
    post, article = _text(info.get("post")), _text(info.get("article"))
    if post is not None:
        if not post.strip():
            return "empty_prompt"
        subreddit, title = _text(info.get("subreddit")), _text(info.get("title"))
        parts = [f"SUBREDDIT: r/{subreddit.strip()}"] if subreddit and subreddit.strip() else []
        parts += [f"TITLE: {title.strip()}"] if title and title.strip() else []
        task_text = "\n\n".join([*parts, f"POST: {post.strip()}", "TL;DR:"])  # == TLDR_TEMPLATE when complete
    elif article is not None:
        if not article.strip():
            return "empty_prompt"
        task_text = CNNDM_TEMPLATE.format(article=article.strip())
    else:
        return "malformed"
    return PreferencePair(
        prompt=format_task_prompt(ctx.tokenizer, task_text), chosen=chosen, rejected=rejected
    )


def _extract_wmt(example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context) -> PreferencePair | str:
    translation = example.get("translation")
    if not isinstance(translation, Mapping):
        return "malformed"
    src, tgt = ctx.language_pair
    source, target = _text(translation.get(src)), _text(translation.get(tgt))
    if source is None or target is None or not target.strip():
        return "malformed"
    if not source.strip():
        return "empty_prompt"
    try:
        score = _float(example.get("z_mean"))
    except ValueError:
        return "malformed"
    if score is not None and score <= _WMT_MISSING_SCORE:
        score = None
    src_name, tgt_name = _LANGUAGE_NAMES.get(src, src), _LANGUAGE_NAMES.get(tgt, tgt)
    task_text = WMT_TEMPLATE.format(src_name=src_name, tgt_name=tgt_name, source=source.strip())
    rejected = source.strip() if spec.wmt_rejected == "source_copy" else ""
    return PreferencePair(
        prompt=format_task_prompt(ctx.tokenizer, task_text),
        chosen=target.strip(),
        rejected=rejected,
        score=score,
    )


def _extract_table(example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context) -> PreferencePair | str:
    names = ctx.table_columns
    chosen, rejected = _text(example.get(names["chosen"])), _text(example.get(names["rejected"]))
    if chosen is None or rejected is None or not chosen.strip() or not rejected.strip():
        return "malformed"
    score = None
    if "score" in names:
        try:
            score = _float(example.get(names["score"]))
        except ValueError:
            return "malformed"
    prompt = _text(example.get(names["prompt"]))
    if prompt is None or not prompt.strip():
        return "empty_prompt"
    return PreferencePair(
        prompt=format_prompt(ctx.tokenizer, prompt.strip()),
        chosen=chosen.strip(),
        rejected=rejected.strip(),
        score=score,
    )


_EXTRACTORS = {
    "hh_rlhf": _extract_hh,
    "summarize_from_feedback": _extract_summarize,
    "wmt20_mlqe": _extract_wmt,
    "preference_table": _extract_table,
}


@dataclass
class _Context:
    tokenizer: PreTrainedTokenizerBase | None
    language_pair: tuple[str, str] = ("en", "de")
    table_columns: dict[str, str] = field(default_factory=dict)


def _language_pair(spec: PreferenceSource) -> tuple[str, str]:
    candidates = [spec.config, Path(spec.path).name.split(".")[0], Path(spec.path).parent.name]
    for candidate in candidates:
        match = _LANG_PAIR.match(candidate or "")
        if match:
            return match.group(1), match.group(2)
    if spec.config:
        raise DataError(f"The wmt20_mlqe config {spec.config!r} is not a language pair such as 'en-de'.")
    return ("en", "de")


def _context(
    spec: PreferenceSource, tokenizer: PreTrainedTokenizerBase | None, columns: Sequence[str]
) -> _Context:
    ctx = _Context(tokenizer=tokenizer)
    if spec.format == "wmt20_mlqe":
        ctx.language_pair = _language_pair(spec)
    if spec.format == "preference_table":
        mapping = {key: key for key in TABLE_KEYS}
        mapping.update(spec.columns or {})
        keys = [key for key in ("prompt", "chosen", "rejected") if mapping[key] not in columns]
        if "score" in (spec.columns or {}) and mapping["score"] not in columns:
            keys.append("score")
        if keys:
            raise DataError(
                f"{spec.path} has no column {', '.join(repr(mapping[key]) for key in keys)}; columns found: "
                f"{', '.join(columns) or 'none'} (choose the right one with "
                f"{', '.join(f'data.{key}_column' for key in keys)} in the recipe)."
            )
        if mapping["score"] not in columns:
            del mapping["score"]
        ctx.table_columns = mapping
    else:
        missing = [name for name in _REQUIRED_COLUMNS[spec.format] if name not in columns]
        if missing:
            raise DataError(
                f"{spec.path} does not look like {spec.format} data: column {', '.join(map(repr, missing))} is missing "
                f"(columns found: {', '.join(columns) or 'none'})."
            )
    return ctx


def _iter_examples(dataset: Dataset, where: str = "the data") -> Iterator[dict[str, Any]]:
    batches = iter(dataset.iter(batch_size=_CHUNK))
    first_row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise DataError(
                f"{where} is not valid UTF-8 text (a cell in rows {first_row + 1}-{first_row + _CHUNK}); "
                "save it as UTF-8."
            ) from None
        keys = list(batch)
        first_row += _CHUNK
        for values in zip(*(batch[key] for key in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def _token_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _too_long(rows: list[PreferencePair], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[bool]:
    eos = 1 if getattr(tokenizer, "eos_token_id", None) is not None else 0
    prompts = _token_lengths(tokenizer, [row.prompt for row in rows])
    chosen = _token_lengths(
        tokenizer, [join_prompt_response(row.prompt, row.chosen)[len(row.prompt) :] for row in rows]
    )
    rejected = _token_lengths(
        tokenizer, [join_prompt_response(row.prompt, row.rejected)[len(row.prompt) :] for row in rows]
    )
    return [p + max(c, r) + eos > max_tokens for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def load_preferences(
    spec: PreferenceSource,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_tokens: int | None = None,
) -> tuple[list[PreferencePair], DropReport]:
    """Read ``spec`` through `datasets` and return its usable preference rows and a drop report.

    Raises :class:`DataError` when the source cannot be read or yields no usable row.
    """
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise DataError(f"max_tokens must be a positive integer, not {max_tokens!r}.")
        if tokenizer is None:
            raise DataError(
                "max_tokens needs a tokenizer to count tokens; pass one or leave max_tokens unset."
            )
    dataset = load_dataset(spec)
    ctx = _context(spec, tokenizer, list(dataset.column_names))
    extract = _EXTRACTORS[spec.format]
    report = DropReport()
    rows: list[PreferencePair] = []
    pending: list[PreferencePair] = []

    def flush() -> None:
        flags = (
            _too_long(pending, tokenizer, max_tokens) if max_tokens is not None else [False] * len(pending)
        )
        for row, too_long in zip(pending, flags, strict=True):
            if spec.limit is not None and len(rows) >= spec.limit:
                break
            if too_long:
                report._drop("too_long")
            else:
                rows.append(row)
        pending.clear()

    for example in _iter_examples(dataset, spec.path):
        if spec.limit is not None and len(rows) + len(pending) >= spec.limit:
            flush()
            if len(rows) >= spec.limit:
                break
        result = extract(example, spec, ctx)
        if isinstance(result, str):
            report._drop(result)
        elif result.chosen == result.rejected:
            report._drop("identical")
        else:
            pending.append(result)
            if len(pending) >= _CHUNK:
                flush()
    flush()
    report.kept = len(rows)
    if not rows:
        if report.seen == 0:
            raise DataError(f"{spec.path} (split {spec.split!r}) has no rows.")
        raise DataError(f"{spec.path} has no usable {spec.format} rows: {report.summary()}.")
    return rows, report
