"""The queue screen: what runs next on this machine, what runs now, what ran. `a` queues a recipe (validated
first), `K`/`J` move a pending entry up or down, `d` cancels (a running entry stops after a checkpoint).
The queue's worker is its own detached process: quitting the TUI leaves it working."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from engine.jobs.queue import (
    QueueError,
    QueueItem,
    add,
    cancel,
    load_items,
    move,
    start_worker,
    worker_running,
)
from engine.rundir.report import fmt_duration
from zopro_tui.launch import RunPlan
from zopro_tui.messages import QueueRead
from zopro_tui.polling import poll
from zopro_tui.screens.modals import ConfirmModal, NewRunModal
from zopro_tui.widgets.tables import add_columns

STATE_STYLE = {
    "pending": "dim",
    "running": "green",
    "finished": "blue",
    "failed": "red",
    "cancelled": "yellow",
}


class QueueScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("a", "add", "Queue a run"),
        Binding("K,shift+up", "move('up')", "Move up"),
        Binding("J,shift+down", "move('down')", "Move down"),
        Binding("d,delete", "cancel", "Cancel"),
        Binding("enter", "open", "Open", show=False),
    ]

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)
        self.items: list[QueueItem] = []
        self.worker_alive = False

    def compose(self) -> ComposeResult:
        yield Static(id="queue-title")
        yield DataTable(id="queue-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="queue-empty")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one("#queue-table", DataTable)
        add_columns(
            table,
            (("id", "id"), ("state", "state"), ("what", "what"), ("time", "time"), ("target", "writes to")),
        )
        self.run_worker(self.read_queue, thread=True, group="queue-reader", exit_on_error=False)
        self.show()
        table.focus()

    def read_queue(self) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        poll(
            lambda: self.post_message(QueueRead(load_items(self.root), worker_running(self.root))),
            1.0,
            lambda: worker.is_cancelled,
        )

    @on(QueueRead)
    def on_queue_read(self, message: QueueRead) -> None:
        changed = [i.to_json() for i in message.items] != [i.to_json() for i in self.items]
        changed = changed or message.worker != self.worker_alive
        self.items, self.worker_alive = message.items, message.worker
        if changed:
            self.show()

    def show(self) -> None:
        pending = sum(1 for item in self.items if item.state == "pending")
        title = Text.assemble(("queue", "bold"), f" in {self.root}/  {pending} pending  ·  worker ")
        title.append(
            "working" if self.worker_alive else "idle", style="green" if self.worker_alive else "dim"
        )
        self.query_one("#queue-title", Static).update(title)
        table = self.query_one("#queue-table", DataTable)
        selected = self.selected_id()
        table.clear()
        for item in self.items:
            if item.started and item.state == "running":
                when = fmt_duration(time.time() - item.started)
            elif item.started and item.ended:
                when = fmt_duration(item.ended - item.started)
            else:
                when = "-"
            table.add_row(
                item.id,
                Text(item.state, style=STATE_STYLE.get(item.state, "")),
                item.label,
                when,
                Path(item.target).name,
                key=item.id,
            )
        for index, item in enumerate(self.items):
            if item.id == selected:
                table.move_cursor(row=index, animate=False)
        empty = self.query_one("#queue-empty", Static)
        empty.update(Text("the queue is empty: press a to queue a recipe", style="dim"))
        empty.display = not self.items

    def selected_id(self) -> str | None:
        table = self.query_one("#queue-table", DataTable)
        if not table.row_count:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - no row under the cursor
            return None

    def refresh_now(self) -> None:
        self.items = load_items(self.root)
        self.worker_alive = worker_running(self.root)
        self.show()

    # -- actions ---------------------------------------------------------------------------------------------
    def action_add(self) -> None:
        if self.app.readonly:
            self.notify("read-only: queueing runs is off", severity="warning")
            return

        def queued(plan: RunPlan | None) -> None:
            if plan is None:
                return
            try:
                item = add(self.root, plan.recipe, plan.overrides, plan.grid)
                pid = start_worker(self.root)
            except (QueueError, OSError) as error:
                self.notify(f"could not queue {plan.recipe}: {error}", severity="error")
                return
            self.notify(
                f"queued {item.id}: {item.label}" + (f" (worker started, pid {pid})" if pid else ""),
                timeout=4,
            )
            self.refresh_now()

        self.app.push_screen(NewRunModal(self.root, queue=True), queued)

    def action_move(self, where: str) -> None:
        item_id = self.selected_id()
        if item_id is None or self.app.readonly:
            return
        try:
            move(self.root, item_id, where)
        except QueueError as error:
            self.notify(str(error), severity="warning")
            return
        self.refresh_now()

    def action_cancel(self) -> None:
        item_id = self.selected_id()
        if item_id is None or self.app.readonly:
            return
        item = next((i for i in self.items if i.id == item_id), None)
        if item is None or item.state not in ("pending", "running"):
            self.notify(
                f"entry {item_id} is {item.state if item else 'gone'}; nothing to cancel", severity="warning"
            )
            return

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                cancel(self.root, item_id)
            except QueueError as error:
                self.notify(str(error), severity="warning")
            self.refresh_now()

        detail = (
            "It writes a checkpoint and stops; continue later with --resume."
            if item.state == "running"
            else "It has not started; it is dropped from the queue."
        )
        self.app.push_screen(ConfirmModal(f"Cancel {item.id} ({item.label})?", detail), confirmed)

    def action_open(self) -> None:
        item_id = self.selected_id()
        item = next((i for i in self.items if i.id == item_id), None)
        if item is None or not Path(item.target).exists():
            return
        from engine.jobs.sweep import is_sweep_dir

        target = Path(item.target)
        if is_sweep_dir(target):
            self.app.open_sweep(target)
        else:
            self.app.open_run(target)

    def action_back(self) -> None:
        self.app.pop_screen()
