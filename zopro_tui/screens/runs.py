"""The runs screen (home): every run under the root folder with its status, position, scores and timing."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static
from textual.worker import get_current_worker

from engine.rundir.columns import middle_ellipsis
from engine.rundir.reader import RunInfo
from engine.rundir.report import RUN_COLUMNS, STATUS_STYLE, run_cells
from zopro_tui.messages import RunsListed
from zopro_tui.polling import poll
from zopro_tui.reading import read_runs
from zopro_tui.screens.modals import NewRunModal
from zopro_tui.widgets.chart import fmt_number
from zopro_tui.widgets.header import run_position
from zopro_tui.widgets.tables import Fit, fit_table

SWEEP_KEY = "sweep:"  # the row key of a sweep's own row: SWEEP_KEY + its folder
PREFIX = 2  # "● " (marked) or "  " before a run's name; a sweep's points "└ " more


def sweep_row(sweep) -> dict:
    """A sweep's own row by column key: its name, what it sweeps, its state and how far it is, its best
    final gold."""
    from engine.rundir.report import STATUS_STYLE as styles

    golds = [info.latest.get("eval/gold") for info in sweep.runs if info.latest.get("eval/gold") is not None]
    keys = ", ".join(key.rsplit(".", 1)[-1] for key in sweep.grid)
    return {
        "run": "▾ " + sweep.name,
        "method": Text(f"sweep {keys}", style="cyan", overflow="ellipsis", no_wrap=True),
        "status": Text(sweep.status, style=styles.get(sweep.status, "")),
        "position": sweep.counts(),
        "gold": f"best {max(golds):.3f}" if golds else "-",
    }


class RunsTable(DataTable):
    """The runs, one row each; enter opens, j/k move like the arrows."""

    BINDINGS = [
        Binding("enter", "select_cursor", "Open"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("g", "scroll_top", "First", show=False),
        Binding("G", "scroll_bottom", "Last", show=False),
    ]

    def _update_dimensions(self, new_rows) -> None:
        # DataTable widens its columns lazily (on Idle) but may keep rows it drew at the labels' widths
        # ("f" for "fast-seed0"); drop those drawings so every row is drawn at the new widths.
        super()._update_dimensions(new_rows)
        self._clear_caches()
        self.refresh()


DETAIL_METRICS = (
    ("objective/scores", "RM score"),
    ("objective/gold", "gold (rollouts)"),
    ("objective/kl", "KL"),
    ("eval/gold", "gold (held-out)"),
    ("eval/win_rate_vs_sft", "win vs SFT"),
    ("eval/kl", "KL (held-out)"),
    ("eval/reward_initial", "fixed RM (held-out)"),
    ("compute/forward_passes", "forward passes"),
    ("mem/peak_rss_mib", "peak RSS MiB"),
    ("mem/cuda_peak_mib", "CUDA peak MiB"),
    ("zo/g", "zo g"),
    ("zo/decay", "zo decay"),
)


def run_detail(info: RunInfo) -> Table:
    """The highlighted run in a few lines: where it is, since when, its error, its latest key metrics."""
    head = Text.assemble((info.name, "bold"), "  ", (info.status, STATUS_STYLE.get(info.status, "")))
    head.append(f"  {info.method}  {run_position(info)}")
    if info.started:
        head.append(f"  started {time.strftime('%Y-%m-%d %H:%M', time.localtime(info.started))}", style="dim")
    head.append(f"  {info.path}", style="dim")
    grid = Table.grid(padding=(0, 1), expand=False)
    grid.add_row(head)
    if info.error:
        grid.add_row(Text(f"error: {info.error}", style="red"))
    if info.warnings:
        last = info.warnings[-1]
        grid.add_row(
            Text(
                f"{info.warning_count} warning{'s' if info.warning_count > 1 else ''}, the last "
                f"[{last.get('code', '?')}]: {last.get('message', '')}",
                style="yellow",
            )
        )
    metrics = Table.grid(padding=(0, 1))
    shown = [
        (label, info.latest[name]) for name, label in DETAIL_METRICS if info.latest.get(name) is not None
    ]
    for _ in range(3):
        metrics.add_column(style="dim", justify="right")
        metrics.add_column(min_width=8)
    for start in range(0, len(shown), 3):
        cells: list = []
        for label, value in shown[start : start + 3]:
            cells += [label, fmt_number(float(value))]
        metrics.add_row(*cells)
    if shown:
        grid.add_row(metrics)
    return grid


def run_matches(info: RunInfo, text: str) -> bool:
    text = text.lower()
    return not text or any(
        text in field.lower() for field in (info.name, info.method, info.status, info.stage)
    )


class RunsScreen(Screen):
    """Runs under the root folder, refreshed every second by a background worker."""

    BINDINGS = [
        Binding("n", "new_run", "New run"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("E", "export_metrics", "Export", show=False),
        Binding("Q", "queue", "Queue"),
    ]

    filter_text: reactive[str] = reactive("", init=False)

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)
        self.runs: list[RunInfo] = []
        self.sweeps: list = []  # engine.jobs.sweep.SweepInfo: a header row, then a row per point that started
        self.marked: set[Path] = set()
        self._fit: Fit | None = None  # the columns shown, fitted to the width, and their widths

    def compose(self) -> ComposeResult:
        yield Static(id="runs-title")
        yield RunsTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static(id="runs-empty")
        yield Static(id="run-detail")
        yield Input(
            placeholder="filter runs by name, method, status or stage; enter keeps it, esc clears it",
            id="runs-filter",
        )
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(RunsTable)
        self.query_one("#runs-filter", Input).display = False
        self.show_title()
        table.focus()

    @work(thread=True, exclusive=True, group="runs-list", exit_on_error=False)
    def list_runs(self) -> None:
        worker = get_current_worker()
        poll(lambda: self.post_message(read_runs(self.root)), 1.0, lambda: worker.is_cancelled, nap=0.05)

    @on(RunsListed)
    def on_runs_listed(self, message: RunsListed) -> None:
        changed = [info.to_json() for info in message.runs] != [info.to_json() for info in self.runs]
        sweeps = [(s.to_json(), [r.to_json() for r in s.runs]) for s in message.sweeps]
        changed = changed or sweeps != [(s.to_json(), [r.to_json() for r in s.runs]) for s in self.sweeps]
        self.runs, self.sweeps = message.runs, message.sweeps
        if changed or not self.query_one(RunsTable).row_count:
            self.show_runs()

    def on_screen_resume(self) -> None:
        self.list_runs()  # exclusive: replaces a worker still running

    def on_screen_suspend(self) -> None:
        self.workers.cancel_group(self, "runs-list")  # under a dashboard: no listing, no repaints

    def visible_runs(self) -> list[RunInfo]:
        return [info for info in self.runs if run_matches(info, self.filter_text)]

    def show_title(self) -> None:
        title = Text.assemble(("runs", "bold"), f" in {self.root}/  ")
        title.append(f"{len(self.runs)} run{'s' if len(self.runs) != 1 else ''}", style="dim")
        if self.marked:
            title.append(f"  ·  {len(self.marked)} marked for compare", style="yellow")
        if self.filter_text:
            title.append(f"  ·  filter: {self.filter_text}", style="cyan")
        self.query_one("#runs-title", Static).update(title)

    def on_resize(self) -> None:
        if self.is_mounted and self.query(RunsTable):
            self.show_runs()

    def table_rows(self) -> list[tuple[str, dict, int]]:
        """(row key, cells by column key, the name's indent) of every row: runs, then each sweep and its points."""
        visible = self.visible_runs()
        rows = [(str(info.path), run_cells(info), 0) for info in visible]
        for sweep in self.sweeps:  # each sweep as a group: its row, then its points' rows
            points = [info for info in sweep.runs if run_matches(info, self.filter_text)]
            if self.filter_text and not points and self.filter_text.lower() not in sweep.name.lower():
                continue
            rows.append((SWEEP_KEY + str(sweep.path), sweep_row(sweep), -PREFIX))
            rows += [(str(info.path), run_cells(info), 2) for info in points]
        return rows

    def show_runs(self) -> None:
        """The rows, fitted to the screen's width: long names shortened in the middle (two runs that differ
        at the end stay apart), then the columns that matter least dropped (`zopro ls` fits alike)."""
        table = self.query_one(RunsTable)
        selected = self.selected_path()
        rows = self.table_rows()
        natural = {column.key: 0 for column in RUN_COLUMNS}
        for _, cells, indent in rows:
            for key, cell in cells.items():
                extra = PREFIX + indent if key == "run" else 0
                natural[key] = max(natural[key], len(str(cell)) + extra)
        self._fit = fit_table(table, RUN_COLUMNS, natural, self.size.width or self.app.size.width, self._fit)
        shown, widths = self._fit
        for key, cells, indent in rows:
            row = []
            for column in shown:
                cell = cells.get(column.key, "")
                if column.key == "run":
                    cell = self.name_cell(Path(key), str(cell), indent, widths["run"])
                elif column.key in ("gold", "win", "fixed_rm"):
                    cell = Text(str(cell), justify="right")
                row.append(cell)
            table.add_row(*row, key=key)
        keys = [Path(key) for key, _, _ in rows]
        for index, path in enumerate(keys):
            if path == selected:
                table.move_cursor(row=index, animate=False)
                break
        empty = self.query_one("#runs-empty", Static)
        visible = self.visible_runs() or self.sweeps
        if not self.runs and not self.sweeps:
            empty.update(
                Text(f"no runs under {self.root}/ yet: press n to start one from a recipe", style="dim")
            )
        elif not visible:
            empty.update(Text(f"no run matches '{self.filter_text}' (esc clears the filter)", style="dim"))
        empty.display = not visible
        self.show_title()
        self.show_detail()

    def show_detail(self) -> None:
        selected = self.selected_path()
        info = next((info for info in self.all_runs() if info.path == selected), None)
        detail = self.query_one("#run-detail", Static)
        detail.display = info is not None
        if info is not None:
            detail.update(run_detail(info))

    @on(RunsTable.RowHighlighted)
    def highlighted(self) -> None:
        self.show_detail()

    def name_cell(self, path: Path, name: str, indent: int, width: int) -> Text:
        """A row's name: marked or not, a sweep's point under its sweep, shortened in the middle to fit."""
        if indent < 0:  # a sweep's own row
            return Text(middle_ellipsis(name, width), style="bold")
        mark = ("● ", "yellow") if path in self.marked else "  "
        tree = ("└ ", "dim") if indent else ""
        return Text.assemble(mark, tree, middle_ellipsis(name, width - PREFIX - indent))

    def selected_path(self) -> Path | None:
        table = self.query_one(RunsTable)
        if not table.row_count:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:  # noqa: BLE001 - no row under the cursor
            return None
        return Path(key.value) if key.value else None

    # -- actions -----------------------------------------------------------------------------------------
    def all_runs(self) -> list[RunInfo]:
        return [*self.runs, *(info for sweep in self.sweeps for info in sweep.runs)]

    @on(RunsTable.RowSelected)
    def open_run(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key and key.startswith(SWEEP_KEY):
            self.app.open_sweep(Path(key[len(SWEEP_KEY) :]))
        elif key:
            self.app.open_run(Path(key))

    def action_new_run(self) -> None:
        if self.app.readonly:
            self.notify("read-only: starting runs is off", severity="warning")
            return
        self.app.push_screen(NewRunModal(self.root), self.app.start_run)

    def action_mark(self) -> None:
        path = self.selected_path()
        if path is None or str(path).startswith(SWEEP_KEY):
            return
        self.marked.symmetric_difference_update({path})
        self.show_runs()

    def action_compare(self) -> None:
        selected = self.selected_path()
        if selected is not None and str(selected).startswith(SWEEP_KEY) and not self.marked:
            self.app.open_sweep(Path(str(selected)[len(SWEEP_KEY) :]))  # c on a sweep: the whole sweep
            return
        marked = [info.path for info in self.all_runs() if info.path in self.marked]
        if len(marked) < 2:
            self.notify(
                f"mark two or more runs with space to compare them ({len(marked)} marked)", severity="warning"
            )
            return
        self.app.open_compare(marked)

    def action_queue(self) -> None:
        from zopro_tui.screens.queue import QueueScreen

        self.app.push_screen(QueueScreen(self.root))

    def action_filter(self) -> None:
        box = self.query_one("#runs-filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#runs-filter", Input)
        box.value = ""
        box.display = False
        self.query_one(RunsTable).focus()

    @on(Input.Changed, "#runs-filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()

    @on(Input.Submitted, "#runs-filter")
    def filter_kept(self) -> None:
        box = self.query_one("#runs-filter", Input)
        box.display = bool(box.value)
        self.query_one(RunsTable).focus()

    def watch_filter_text(self) -> None:
        self.show_runs()

    def action_export_metrics(self) -> None:
        path = self.selected_path()
        if path is not None and not str(path).startswith(SWEEP_KEY):
            self.app.export_metrics(path)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "new_run" and self.app.readonly:
            return False
        if action == "clear_filter":
            return bool(self.filter_text) or self.query_one("#runs-filter", Input).display
        return True
