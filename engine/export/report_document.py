"""A report as a list of blocks (headings, text, tables, figures, preformatted text) that
`engine.export.report_render` writes as one self-contained HTML page or Markdown file."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Block:
    kind: str  # h1, h2, p, table, figure, pre, warnings
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    image: bytes = b""  # a figure's PNG
    items: list[str] = field(default_factory=list)


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(Block("h2", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def table(self, headers: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append(Block("table", caption, headers=headers, rows=rows))

    def figure(self, image: bytes, caption: str) -> None:
        self.blocks.append(Block("figure", caption, image=image))

    def preformatted(self, text: str, caption: str = "") -> None:
        self.blocks.append(Block("pre", caption, items=[text]))

    def warnings(self, items: list[str]) -> None:
        self.blocks.append(Block("warnings", items=items))
