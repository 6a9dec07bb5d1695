"""Rich renderings and exports shared by the headless commands: runs table, status, summary, CSV/JSON,
and the outcome of one run as a row of the compare and sweep tables."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from engine.rundir.columns import Column, fit_columns, middle_ellipsis, printable
from engine.rundir.reader import RunInfo, read_events, run_info
from engine.rundir.wording import FIXED_RM_METRIC, RM_NOTE, iteration_text, short_iteration

STATUS_STYLE = {
    "running": "green",
    "paused": "yellow",
    "finished": "blue",
    "failed": "red",
    "stale": "magenta",
    "stopped": "yellow",
    "created": "dim",
    "unreadable": "bold red",
}


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_value(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_with_se(value: float | None, se: float | None, digits: int = 3, compact: bool = False) -> str:
    """A score with its standard error when there is one: `0.468 ± 0.012` (compact: `0.468±0.012`), else
    as `fmt_value`."""
    if value is None or se is None or not isinstance(se, (int, float)) or se != se:
        return fmt_value(value, digits)
    return f"{fmt_value(value, digits)}{'±' if compact else ' ± '}{se:.{digits}f}"


def status_text(info: RunInfo) -> Text:
    """The run's state, with `!N` in yellow when it raised N warnings (runaway training and the like)."""
    text = Text(info.status, style=STATUS_STYLE.get(info.status, ""))
    if info.warning_count:
        text.append(f" !{info.warning_count}", style="bold yellow")
    return text


def warning_codes(warnings: list[dict], iteration: int | None) -> str:
    """The distinct codes of the warnings raised in `iteration` (in order), comma-separated."""
    codes: list[str] = []
    for warning in warnings:
        if warning.get("iteration") == iteration and warning.get("code") not in codes:
            codes.append(warning.get("code", "?"))
    return ", ".join(codes)


def position(info: RunInfo) -> str:
    """Where a run is: the stage before the iterations, `it 2/4 policy 7` during them (iterations counted
    from 1, as everywhere a person reads them), `done` after."""
    if info.status == "finished" or info.stage == "done":
        return f"done, {info.iterations} it" if info.iterations else "done"
    if info.iteration is None:
        return f"{info.stage or '-'} {info.step}".strip()
    return f"{short_iteration(info.iteration, info.iterations)} {info.stage} {info.step}"


def stage_end_text(event: dict) -> str:
    """`policy done in 0:02, 0:12 paused besides`: a stage's working time, and the pauses apart."""
    wall, paused = event.get("wall_s"), event.get("paused_s") or 0.0
    working = None if wall is None else max(0.0, wall - paused)
    text = f"{event.get('stage')} done in {fmt_duration(working)}"
    if paused >= 1:
        text += f" (and {fmt_duration(paused)} paused)"
    peak = event.get("peak_rss_mib")
    return text + (f", peak {peak:.0f} MiB" if isinstance(peak, (int, float)) else "")


def time_text(info: RunInfo) -> str:
    """`1:18` elapsed on the run's clock (pauses included: `zopro status` and the TUI say how long), and
    `+0:40` to go while it runs."""
    text = fmt_duration(info.elapsed)
    if info.eta is not None:
        text += f" +{fmt_duration(info.eta)}"
    return text


RUN_COLUMNS = [  # rank: 1 matters most; the highest rank is dropped first when the width is short
    Column("run", "run", 1, shrink_to=20),
    Column("method", "method", 7),  # default names end in NAME-METHOD-TIME: the first to go
    Column("status", "status", 2),
    Column("position", "position", 4),
    Column("gold", "gold", 3),
    Column("win", "win", 5),
    Column("fixed_rm", "fixed RM", 8),
    Column("time", "time +left", 6),  # `1:18 +0:40`: elapsed, and the ETA while it runs
]


def run_cells(info: RunInfo) -> dict[str, str | Text]:
    """A run's cells for the runs tables (`zopro ls` and the TUI), by column key."""
    latest = info.latest
    return {
        "run": info.name,
        "method": Text(printable(info.method)),  # status.json's words: never rich markup
        "status": status_text(info),
        "position": position(info),
        "gold": fmt_value(latest.get("eval/gold")),
        "win": fmt_value(latest.get("eval/win_rate_vs_sft")),
        "fixed_rm": fmt_value(latest.get(FIXED_RM_METRIC)),
        "time": time_text(info),
    }


def runs_table(runs: list[RunInfo], width: int = 80) -> Table:
    """name, method, status, position, latest held-out scores, and time (elapsed, "+ETA" while running),
    fitted to `width`: long names shortened in the middle, then the least important columns dropped."""
    rows = [run_cells(info) for info in runs]
    natural = {key: max(len(str(row[key])) for row in rows) for key in rows[0]} if rows else {}
    shown, widths = fit_columns(RUN_COLUMNS, natural, width, gap=1)
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0), collapse_padding=True)
    for column in shown:
        numeric = column.key in ("gold", "win", "fixed_rm")
        table.add_column(
            column.header, no_wrap=True, justify="right" if numeric else "left", width=widths[column.key]
        )
    for row in rows:
        cells = []
        for column in shown:
            cell = row[column.key]
            if column.key == "run":
                cell = Text(middle_ellipsis(str(cell), widths["run"]))  # a folder name: never rich markup
            cells.append(cell)
        table.add_row(*cells)
    return table


def evaluations_table(
    evals: list[dict], title: str | None = None, warnings: list[dict] | None = None
) -> Table:
    """One row per held-out evaluation: the SFT baseline, then each iteration (`it 1`, `it 2`, ... as
    everywhere); with `warnings` (events or status entries with code and iteration) a last column names
    those raised in each iteration. `fixed RM` is comparable across rows, `RM score` is not (RM_NOTE)."""
    table = Table(title=title, header_style="bold", title_justify="left")
    columns = ["", "gold", "win vs SFT", "fixed RM", "RM score", "KL", "wall"]
    if warnings:
        columns.append("warnings")
    for column in columns:  # a score with its standard error stays on one line; warnings may wrap
        table.add_column(
            column,
            justify="left" if column in ("", "warnings") else "right",
            no_wrap=column != "warnings",
            min_width=5 if column == "" else None,
        )
    previous = 0.0
    for row in evals:
        metrics = row.get("metrics", row)
        label = "SFT" if row.get("iteration") is None else short_iteration(row["iteration"])
        elapsed = row.get("elapsed", metrics.get("time/elapsed_s"))
        wall = None if elapsed is None else elapsed - previous
        previous = elapsed or previous
        cells = [
            label,
            fmt_with_se(metrics.get("eval/gold"), metrics.get("eval/gold_se"), compact=True),
            fmt_with_se(
                metrics.get("eval/win_rate_vs_sft"), metrics.get("eval/win_rate_vs_sft_se"), compact=True
            ),
            fmt_value(metrics.get(FIXED_RM_METRIC)),
            fmt_value(metrics.get("eval/reward")),
            fmt_value(metrics.get("eval/kl")),
            fmt_duration(wall),
        ]
        if warnings:
            codes = warning_codes(warnings, row.get("iteration")) if row.get("iteration") is not None else ""
            cells.append(Text(codes, style="bold yellow"))
        table.add_row(*cells)
    return table


def status_panel(info: RunInfo, evals: list[dict]) -> Group:
    head = Text.assemble(
        (info.name, "bold"),
        "  ",
        (info.status, STATUS_STYLE.get(info.status, "")),
        f"  {info.method}  ",
        position(info),
        f"  elapsed {fmt_duration(info.elapsed)}",
        f" ({fmt_duration(info.paused)} paused)" if info.paused >= 1 else "",
        f"  ETA {fmt_duration(info.eta)}",
    )
    parts: list = [head]
    if info.error:
        parts.append(Text(f"error: {info.error}", style="red"))
    if info.warning_count:
        shown = info.warnings[-5:]
        parts.append(
            Text(
                f"{info.warning_count} warning{'s' if info.warning_count > 1 else ''}"
                + (f" (the last {len(shown)}):" if info.warning_count > len(shown) else ":"),
                style="bold yellow",
            )
        )
        for warning in shown:
            where = iteration_text(warning.get("iteration")) or "-"
            parts.append(
                Text(f"  [{warning.get('code', '?')}] {where}: {warning.get('message', '')}", style="yellow")
            )
    latest = {
        k: v
        for k, v in info.latest.items()
        if k.split("/")[0] in ("objective", "eval", "loss", "zo", "reward")
    }
    if latest:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column(justify="right")
        for key in sorted(latest):
            grid.add_row(key, fmt_value(latest[key], 4))
        parts.append(grid)
    if evals:
        parts.append(evaluations_table(evals, "held-out evaluation", warnings=info.warnings))
        parts.append(Text(RM_NOTE, style="dim"))
    return Group(*parts)


def metric_rows(run_dir: Path, problems: list[str] | None = None) -> list[dict]:
    rows = []
    for event in read_events(run_dir, problems):
        if event.get("type") not in ("metrics", "eval"):
            continue
        row = {
            k: event.get(k)
            for k in ("seq", "type", "time", "elapsed", "stage", "iteration", "step", "global_step")
        }
        row.update(event.get("metrics", {}))
        rows.append(row)
    return rows


def export_metrics(run_dir: Path, format: str, problems: list[str] | None = None) -> str:
    rows = metric_rows(run_dir, problems)
    if format == "json":
        return json.dumps({"run": Path(run_dir).name, "rows": rows}, indent=None) + "\n"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- one run's outcome: a row of the compare and sweep tables ----------------------------------------------
def comparison_row(run_dir: Path, label: str | None = None) -> dict:
    """Final held-out scores (with their standard errors where the run logged them: None otherwise) and the
    cost of one run: what the compare table and screen show. `label` names the method (or variant)."""
    events = read_events(run_dir)
    evals = [e["metrics"] for e in events if e.get("type") == "eval"]
    metrics = [e for e in events if e.get("type") == "metrics"]
    policy = [e["metrics"] for e in metrics if e.get("stage") == "policy"]
    last = evals[-1] if evals else {}
    update_peaks = [m["mem/update_peak_mib"] for m in policy if m.get("mem/update_peak_mib") is not None]
    update_times = sorted(
        m["time/policy_update_s"] for m in policy if m.get("time/policy_update_s") is not None
    )
    info = run_info(run_dir)
    return {
        "run": run_dir.name,
        "method": label or info.method,
        "status": info.status,
        "sft_gold": evals[0].get("eval/gold") if evals else None,
        "final_gold": last.get("eval/gold"),
        "final_gold_se": last.get("eval/gold_se"),
        "win_rate_vs_sft": last.get("eval/win_rate_vs_sft"),
        "win_rate_vs_sft_se": last.get("eval/win_rate_vs_sft_se"),
        "reward_score": last.get("eval/reward"),  # under this run's own refined reward model
        "reward_score_se": last.get("eval/reward_se"),
        "fixed_rm_score": last.get(FIXED_RM_METRIC),  # comparable across methods of one seed
        "fixed_rm_score_se": last.get(f"{FIXED_RM_METRIC}_se"),
        "kl": last.get("eval/kl"),
        "kl_se": last.get("eval/kl_se"),
        "wall_time_s": events[-1].get("elapsed") if events else None,
        "forward_passes": (metrics[-1]["metrics"].get("compute/forward_passes") if metrics else None),
        "policy_forward_passes": _policy_forward_passes(events),
        "peak_update_mem_mib": max(update_peaks) if update_peaks else None,
        "median_update_s": update_times[len(update_times) // 2] if update_times else None,
        "warnings": [e.get("code", "?") for e in events if e.get("type") == "warning"],
    }


def _policy_forward_passes(events: list[dict]) -> int | None:
    """Forward passes spent in the policy stages (the compute axis on which methods differ)."""
    total = 0
    found = False
    for event in events:
        if event.get("type") == "stage_end" and event.get("stage") == "policy":
            total += event.get("counters", {}).get("forward_passes", 0)
            found = True
    return total if found else None


def warnings_cell(codes: list[str]) -> str:
    """`2: kl_jump, gold_drop` (how many, and which), or `-`."""
    if not codes:
        return "-"
    return f"{len(codes)}: " + ", ".join(dict.fromkeys(codes))
