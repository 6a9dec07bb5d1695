"""The shapes of training data: an SFT example, a preference pair, a preference source (where a
dataset comes from and how to read it) and the report of the rows a load dropped; DataError for a
source that cannot be read."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

FORMATS: tuple[str, ...] = ("hh_rlhf", "summarize_from_feedback", "wmt20_mlqe", "preference_table")
DROP_REASONS: tuple[str, ...] = ("empty_prompt", "identical", "too_long", "malformed")
WMT_REJECTED: tuple[str, ...] = ("source_copy", "none")
TABLE_KEYS = ("prompt", "chosen", "rejected", "score")


@dataclass(frozen=True)
class Example:
    """One supervised fine-tuning example."""

    prompt: str
    response: str


class DataError(ValueError):
    """A preference source cannot be read; the message is one sentence for the user."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: the formatted prompt, the two plain-text answers and an optional score."""

    prompt: str
    chosen: str
    rejected: str
    score: float | None = None


def gold_ranked_pairs(task, prompts: list[str], rng, count: int) -> list[PreferencePair]:
    """A built-in task's preference pairs: on each prompt a reference answer against a degenerate one (30%)
    or a second reference one, the task's gold scorer picking the chosen one; ties are skipped, and it stops
    at `count` pairs. `task` has reference_response, degenerate_response and gold; `rng` a random.Random."""
    pairs: list[PreferencePair] = []
    for prompt in prompts:
        a = task.reference_response(prompt, rng)
        degenerate = rng.random() < 0.3
        b = task.degenerate_response(prompt, rng) if degenerate else task.reference_response(prompt, rng)
        ga, gb = task.gold(prompt, a), task.gold(prompt, b)
        if abs(ga - gb) < 1e-9:
            continue
        pairs.append(PreferencePair(prompt, a if ga > gb else b, b if ga > gb else a))
        if len(pairs) == count:
            break
    return pairs


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
        unknown = sorted(set(self.columns or {}) - set(TABLE_KEYS))
        if unknown:
            raise DataError(
                f"Unknown column key(s) {', '.join(map(repr, unknown))}; accepted keys are {', '.join(TABLE_KEYS)}."
            )


def first_line(exc: BaseException) -> str:
    """The first line of the innermost cause of an exception, short enough for one sentence."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    line = lines[0].strip().rstrip(".") if lines else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
