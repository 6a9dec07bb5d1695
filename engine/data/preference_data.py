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

import glob
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    "PreferenceRow",
    "PreferenceSource",
    "format_prompt",
    "join_prompt_response",
    "load_preferences",
]

FORMATS: tuple[str, ...] = ("hh_rlhf", "summarize_from_feedback", "wmt20_mlqe", "preference_table")
DROP_REASONS: tuple[str, ...] = ("empty_prompt", "identical", "too_long", "malformed")
WMT_REJECTED: tuple[str, ...] = ("source_copy", "none")

#: Plain prompt for user text when the tokenizer has no chat template.
PLAIN_PROMPT_TEMPLATE = "User: {text}\nAssistant:"
#: OpenAI's TL;DR query format for Reddit posts (summarize_from_feedback).
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
#: OpenAI's CNN/DM query format (trailing newline dropped so both end in ``TL;DR:``).
CNNDM_TEMPLATE = "Article:\n{article}\n\nTL;DR:"
#: Translation task text for wmt20_mlqe rows; language names from the config's ISO codes.
WMT_TEMPLATE = "Translate the following {src_name} text into {tgt_name}.\n\n{src_name}: {source}\n{tgt_name}:"

_HUB_DEFAULT_CONFIG: dict[str, str | None] = {
    "hh_rlhf": None,
    "summarize_from_feedback": "comparisons",
    "wmt20_mlqe": "en-de",
    "preference_table": None,
}
_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "hh_rlhf": ("chosen", "rejected"),
    "summarize_from_feedback": ("info", "summaries", "choice"),
    "wmt20_mlqe": ("translation",),
}
_TABLE_KEYS = ("prompt", "chosen", "rejected", "score")
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
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_ACCEPTED_FILES = ".jsonl, .json, .parquet, .csv or .tsv (optionally .gz/.bz2/.xz/.zst)"
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_CHUNK = 256


class DataError(ValueError):
    """A preference source cannot be read; the message is one sentence for the user."""


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair: the formatted prompt, the two plain-text answers and an optional score."""

    prompt: str
    chosen: str
    rejected: str
    score: float | None = None


@dataclass
class DropReport:
    """How many rows were kept and how many were dropped for each reason."""

    empty_prompt: int = 0
    identical: int = 0
    too_long: int = 0
    malformed: int = 0
    kept: int = 0

    @property
    def dropped(self) -> int:
        return self.empty_prompt + self.identical + self.too_long + self.malformed

    @property
    def seen(self) -> int:
        return self.kept + self.dropped

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> str:
        drops = ", ".join(f"{reason} {getattr(self, reason)}" for reason in DROP_REASONS)
        return f"kept {self.kept} of {self.seen} rows (dropped: {drops})"

    def _drop(self, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)


@dataclass(frozen=True)
class PreferenceSource:
    """Where preference data comes from and how to read it.

    ``path`` is a local file or folder, or a hub id such as ``"Anthropic/hh-rlhf"``.
    ``config`` is the hub config name (``None`` picks ``comparisons`` for
    summarize_from_feedback and ``en-de`` for wmt20_mlqe); for a local folder, a sub-folder or
    file named after it is used when present. ``data_dir`` selects a sub-folder (hh-rlhf
    subsets such as ``"harmless-base"``). ``limit`` caps the number of rows kept.
    ``columns`` renames the ``preference_table`` columns. ``wmt_rejected`` is one of
    :data:`WMT_REJECTED`.
    """

    format: str
    path: str | os.PathLike[str]
    split: str = "train"
    config: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    columns: Mapping[str, str] | None = field(default=None, hash=False)
    wmt_rejected: str = "source_copy"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(
                f"Unknown preference format {self.format!r}; accepted formats are {', '.join(FORMATS)}."
            )
        object.__setattr__(self, "path", os.fspath(self.path))
        if not self.path.strip():
            raise DataError("The preference source path is empty; give a local file, a folder or a hub id.")
        if self.wmt_rejected not in WMT_REJECTED:
            raise DataError(
                f"Unknown wmt_rejected value {self.wmt_rejected!r}; accepted values are {', '.join(WMT_REJECTED)}."
            )
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise DataError(f"The row limit must be a positive integer, not {self.limit!r}.")
        unknown = sorted(set(self.columns or {}) - set(_TABLE_KEYS))
        if unknown:
            raise DataError(
                f"Unknown column key(s) {', '.join(map(repr, unknown))}; accepted keys are {', '.join(_TABLE_KEYS)}."
            )


# ---------------------------------------------------------------------------------------------
# Prompt formatting


def _has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a broken template is a tokenizer problem, not a data problem
        raise DataError(
            f"The tokenizer's chat template failed to render a prompt ({_first_line(exc)})."
        ) from exc
    if not isinstance(rendered, str):
        raise DataError("The tokenizer's chat template did not return text for tokenize=False.")
    return rendered


def format_prompt(tokenizer: PreTrainedTokenizerBase | None, user_text: str) -> str:
    """Render user text as a generation prompt: the chat template if any, else :data:`PLAIN_PROMPT_TEMPLATE`."""
    if _has_chat_template(tokenizer):
        return _apply_chat_template(tokenizer, [{"role": "user", "content": user_text}])
    return PLAIN_PROMPT_TEMPLATE.format(text=user_text)


def _format_task_prompt(tokenizer: PreTrainedTokenizerBase | None, task_text: str) -> str:
    """Task texts that end in a completion cue stay raw without a chat template."""
    if _has_chat_template(tokenizer):
        return _apply_chat_template(tokenizer, [{"role": "user", "content": task_text}])
    return task_text


def join_prompt_response(prompt: str, response: str) -> str:
    """Join a prompt and a plain answer: one space after a prompt that does not end in whitespace."""
    if not prompt or prompt[-1].isspace():
        return prompt + response
    return f"{prompt} {response}"


# ---------------------------------------------------------------------------------------------
# Row extraction: each returns a PreferenceRow or the name of the drop reason


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


def _extract_hh(example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context) -> PreferenceRow | str:
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
    if _has_chat_template(ctx.tokenizer):
        messages: list[dict[str, str]] = []
        for role, text in prompt_turns:
            chat_role = _HH_ROLES[role]
            if messages and messages[-1]["role"] == chat_role:
                messages[-1]["content"] = f"{messages[-1]['content']}\n\n{text}"
            else:
                messages.append({"role": chat_role, "content": text})
        prompt = _apply_chat_template(ctx.tokenizer, messages)
    else:
        prompt = chosen_text[: chosen_turns[-1][2]]
    return PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected)


def _extract_summarize(
    example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context
) -> PreferenceRow | str:
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
    return PreferenceRow(
        prompt=_format_task_prompt(ctx.tokenizer, task_text), chosen=chosen, rejected=rejected
    )


def _extract_wmt(example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context) -> PreferenceRow | str:
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
    return PreferenceRow(
        prompt=_format_task_prompt(ctx.tokenizer, task_text),
        chosen=target.strip(),
        rejected=rejected,
        score=score,
    )


def _extract_table(example: Mapping[str, Any], spec: PreferenceSource, ctx: _Context) -> PreferenceRow | str:
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
    return PreferenceRow(
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


# ---------------------------------------------------------------------------------------------
# Loading through `datasets`


def _first_line(exc: BaseException) -> str:
    """The first line of the innermost cause of an exception, short enough for one sentence."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    line = lines[0].strip().rstrip(".") if lines else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_local(path: str) -> bool:
    """Whether a path that does not exist was meant as a local file rather than a hub id."""
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        return True
    return _builder_for(Path(path)) is not None


def _load_file(file: Path, split: str) -> Dataset:
    import datasets

    builder = _builder_for(file)
    if builder is None:
        raise DataError(f"Cannot read {file}: unsupported file type; accepted files are {_ACCEPTED_FILES}.")
    if file.stat().st_size == 0:
        raise DataError(f"{file} is empty.")
    kwargs: dict[str, Any] = {"delimiter": "\t"} if ".tsv" in [s.lower() for s in file.suffixes] else {}
    try:
        return datasets.load_dataset(builder, data_files={split: str(file)}, split=split, **kwargs)
    except Exception as exc:
        if "corresponds to no data" in str(exc):
            raise DataError(f"{file} has no rows.") from exc
        raise DataError(f"Cannot read {file} as {builder} data ({_first_line(exc)}).") from exc


def _load_folder(folder: Path, spec: PreferenceSource) -> Dataset:
    import datasets

    if spec.config:
        if (folder / spec.config).is_dir():
            folder = folder / spec.config
        else:
            for candidate in sorted(folder.glob(f"{glob.escape(spec.config)}.*")):
                if candidate.is_file() and _builder_for(candidate) is not None:
                    return _load_file(candidate, spec.split)
    try:
        return datasets.load_dataset(str(folder), data_dir=spec.data_dir, split=spec.split)
    except Exception as exc:
        raise DataError(
            f"Cannot read split {spec.split!r} from folder {folder} ({_first_line(exc)}); "
            f"it should hold {_ACCEPTED_FILES} files named after their split."
        ) from exc


def _load_hub(spec: PreferenceSource) -> Dataset:
    import datasets

    config = spec.config or _HUB_DEFAULT_CONFIG[spec.format]
    try:
        try:
            return datasets.load_dataset(spec.path, config, split=spec.split, data_dir=spec.data_dir)
        except RuntimeError as exc:
            if "scripts are no longer supported" not in str(exc):
                raise
            # Script-only hub datasets: read the hub's automatic Parquet export instead.
            return datasets.load_dataset(
                spec.path, split=spec.split, data_dir=config or "default", revision="refs/convert/parquet"
            )
    except Exception as exc:
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        hint = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so point to a local file or folder instead"
            if offline
            else "check the dataset id, config and split and your network, or point to a local file or folder"
        )
        where = f"{spec.path!r}" + (
            f" (config {config!r}, split {spec.split!r})" if config else f" (split {spec.split!r})"
        )
        raise DataError(
            f"Cannot load {where} from the Hugging Face hub ({_first_line(exc)}); {hint}."
        ) from exc


def _load_dataset(spec: PreferenceSource) -> Dataset:
    local = Path(spec.path).expanduser()
    if local.is_file():
        return _load_file(local, spec.split)
    if local.is_dir():
        return _load_folder(local, spec)
    if _looks_local(spec.path):
        raise DataError(
            f"No such file or folder: {spec.path}; give an existing {_ACCEPTED_FILES} file, a folder of them, "
            "or a hub id such as 'Anthropic/hh-rlhf'."
        )
    return _load_hub(spec)


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
        mapping = {key: key for key in _TABLE_KEYS}
        mapping.update(spec.columns or {})
        missing = [
            f"{mapping[key]!r}" for key in ("prompt", "chosen", "rejected") if mapping[key] not in columns
        ]
        if "score" in (spec.columns or {}) and mapping["score"] not in columns:
            missing.append(f"{mapping['score']!r}")
        if missing:
            raise DataError(
                f"{spec.path} has no column {', '.join(missing)}; columns found: {', '.join(columns) or 'none'} "
                "(rename them with PreferenceSource.columns)."
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


def _iter_examples(dataset: Dataset) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter(batch_size=_CHUNK):
        keys = list(batch)
        for values in zip(*(batch[key] for key in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def _token_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _too_long(rows: list[PreferenceRow], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[bool]:
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
) -> tuple[list[PreferenceRow], DropReport]:
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
    dataset = _load_dataset(spec)
    ctx = _context(spec, tokenizer, list(dataset.column_names))
    extract = _EXTRACTORS[spec.format]
    report = DropReport()
    rows: list[PreferenceRow] = []
    pending: list[PreferenceRow] = []

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

    for example in _iter_examples(dataset):
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
