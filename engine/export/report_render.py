"""Writing a report document as one self-contained HTML page (figures inline as base64 PNG, no outside
resource) or as Markdown (figures as data-URI images)."""

from __future__ import annotations

import base64
import re
from html import escape

from engine.export.report_document import Document

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; max-width: 1100px;
  margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
  border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top;
  max-width: 28em; }
th { border-bottom: 1px solid #999; } .num { text-align: right; white-space: nowrap; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 13px; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 12px; }
ul.warnings li { color: #8a4b00; }
details summary { cursor: pointer; color: #0a58ca; }
"""


NUMERIC = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?( ± [-+]?\d*\.?\d+)?( MiB|%)?|\d+:\d\d(:\d\d)?")


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def _numeric(text: str) -> bool:
    """A number, a score with its standard error, a size or a time: right-aligned."""
    return bool(NUMERIC.fullmatch(text.strip())) or text.strip() in ("-", "")


def _column_classes(headers: list[str], rows: list[list[str]]) -> list[str]:
    """' class="num"' for a column whose every cell is numeric (the first column is a label)."""
    classes = []
    for index in range(len(headers)):
        cells = [row[index] for row in rows if index < len(row)]
        numeric = index > 0 and all(_numeric(cell) for cell in cells)
        classes.append(' class="num"' if numeric else "")
    return classes


def render_html(document: Document) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(document.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(document.title)}</h1>",
    ]
    for block in document.blocks:
        if block.kind == "h2":
            parts.append(f"<h2>{escape(block.text)}</h2>")
        elif block.kind == "p":
            parts.append(f"<p>{escape(block.text)}</p>")
        elif block.kind == "table":
            caption = f"<caption>{escape(block.text)}</caption>" if block.text else ""
            css = _column_classes(block.headers, block.rows)
            head = "".join(f"<th{c}>{escape(h)}</th>" for h, c in zip(block.headers, css, strict=True))
            body = "".join(
                "<tr>"
                + "".join(f"<td{c}>{escape(cell)}</td>" for cell, c in zip(row, css, strict=False))
                + "</tr>"
                for row in block.rows
            )
            parts.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block.kind == "figure":
            parts.append(
                f'<figure><img src="{data_uri(block.image)}" alt="{escape(block.text)}">'
                f"<figcaption>{escape(block.text)}</figcaption></figure>"
            )
        elif block.kind == "pre":
            summary = escape(block.text or "show")
            parts.append(
                f"<details><summary>{summary}</summary><pre>{escape(block.items[0])}</pre></details>"
            )
        elif block.kind == "warnings":
            items = "".join(f"<li>{escape(item)}</li>" for item in block.items)
            parts.append(f'<ul class="warnings">{items}</ul>' if block.items else "<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(document: Document) -> str:
    parts = [f"# {document.title}", ""]
    for block in document.blocks:
        if block.kind == "h2":
            parts += [f"## {block.text}", ""]
        elif block.kind == "p":
            parts += [block.text, ""]
        elif block.kind == "table":
            if block.text:
                parts += [f"*{block.text}*", ""]
            parts.append("| " + " | ".join(_md(h) or " " for h in block.headers) + " |")
            parts.append("|" + "---|" * len(block.headers))
            parts += ["| " + " | ".join(_md(c) for c in row) + " |" for row in block.rows]
            parts.append("")
        elif block.kind == "figure":
            parts += [f"![{_md(block.text)}]({data_uri(block.image)})", "", f"*{block.text}*", ""]
        elif block.kind == "pre":
            parts += [f"{block.text}:", "", "```", block.items[0].rstrip(), "```", ""]
        elif block.kind == "warnings":
            parts += [f"- {item}" for item in block.items] or ["None."]
            parts.append("")
    return "\n".join(parts)
