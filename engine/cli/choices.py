"""The fixed choices of `zopro`'s options as typer Enums (--help shows them: <csv|json>), and `one_of`, the
parser that refuses anything else in one sentence, as every other error a user can fix."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from engine.cli.output import fail
from engine.recipe import DEVICES, DTYPES


class ExportFormat(StrEnum):
    csv = "csv"
    json = "json"


DType = StrEnum("DType", {name: name for name in DTYPES})
Device = StrEnum("Device", {name: name for name in DEVICES})
Choice = TypeVar("Choice", bound=StrEnum)


def one_of(choices: type[Choice], option: str) -> Callable[[str], Choice]:
    """The parser of an option with fixed choices: the chosen member, or `error: --format 'xml' is not
    accepted; choose csv or json`."""

    def parse(value: str) -> Choice:
        try:
            return choices(value)
        except ValueError:
            names = [member.value for member in choices]
            fail(f"{option} {value!r} is not accepted; choose {', '.join(names[:-1])} or {names[-1]}")

    return parse
