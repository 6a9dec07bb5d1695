"""`zopro status --samples N`: the newest samples of a run as a person reads them: the whole answer,
wrapped, its lines kept, unicode as it is, anything that would move the terminal's cursor made visible."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from engine.rundir.report import fmt_value
from engine.rundir.wording import iteration_text

KEPT_CONTROLS = "\n\t"


def visible(text: object) -> str:
    """Model text made safe for a terminal: line breaks and tabs kept, other control characters (escape
    sequences, carriage returns, bells) shown as their Unicode control pictures."""
    value = "" if text is None else str(text)
    return "".join(
        ch if ch.isprintable() or ch in KEPT_CONTROLS else chr(0x2400 + ord(ch)) if ord(ch) < 32 else "·"
        for ch in value
    )


def samples_view(rows: list[dict], count: int) -> Group:
    """The first `count` rows of a samples file, one panel each: prompt, answer, reward score and gold."""
    panels = []
    for row in rows[:count]:
        body = Text()
        body.append("prompt  ", style="bold")
        body.append(visible(row.get("prompt")).strip() or "(empty)")
        body.append("\nanswer  ", style="bold")
        answer = visible(row.get("response"))
        body.append(answer if answer.strip() else "(empty)", style="" if answer.strip() else "dim italic")
        iteration = row.get("iteration")
        title = f"{row.get('kind', 'train')} sample" + (
            f", {iteration_text(iteration)}" if isinstance(iteration, int) else ""
        )
        subtitle = f"RM {fmt_value(row.get('score'))}" + (
            f"  gold {fmt_value(row.get('gold'), 2)}" if row.get("gold") is not None else ""
        )
        panels.append(Panel(body, title=title, subtitle=subtitle, title_align="left", subtitle_align="right"))
    if not panels:
        return Group(Text("no samples yet: they are written after the first evaluation", style="dim"))
    return Group(*panels)
