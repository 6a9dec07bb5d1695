"""The held-out answers a run logged at each evaluation (samples files of kind "eval"), by checkpoint: the
evaluation draws on the same prompts and the same noise every time, so two evaluations' answers pair up
prompt by prompt and can be read side by side (the TUI's answers screen, the report)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.rundir.reader import MAX_LINE_BYTES
from engine.rundir.safe_io import read_inside
from engine.rundir.wording import short_iteration


def evaluation_answers(run_dir: Path) -> dict[str, list[dict]]:
    """{"SFT": rows, "it 0": rows, ...} in the run's order; each row a samples-file row (prompt, response,
    score, gold). A later file for the same evaluation (a resumed run) replaces an earlier one."""
    found: dict[str, list[dict]] = {}
    for path in sorted((Path(run_dir) / "samples").glob("samples-*.jsonl")):
        try:
            text = read_inside(run_dir, path, MAX_LINE_BYTES).decode("utf-8", errors="replace")
        except OSError:
            continue
        rows: dict[str, list[dict]] = {}
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(row, dict) or row.get("kind") != "eval":
                continue
            iteration = row.get("iteration")
            label = "SFT" if iteration is None else short_iteration(iteration)
            rows.setdefault(label, []).append(row)
        found.update(rows)
    return dict(sorted(found.items(), key=lambda item: _order(item[0])))


def _order(label: str) -> int:
    return -1 if label == "SFT" else int(label.split()[-1]) if label.split()[-1].isdigit() else 10**9


def side_by_side(left: list[dict], right: list[dict]) -> list[tuple[str, dict | None, dict | None]]:
    """(prompt, left row, right row) for every prompt of either list, paired in order by prompt."""
    pending = {}
    for row in right:
        pending.setdefault(row.get("prompt"), []).append(row)
    pairs: list[tuple[str, dict | None, dict | None]] = []
    for row in left:
        match = pending.get(row.get("prompt"))
        pairs.append((str(row.get("prompt", "")), row, match.pop(0) if match else None))
    for prompt, rows in pending.items():
        pairs.extend((str(prompt), None, row) for row in rows)
    return pairs
