"""The hardware panel: the run's process (CPU, memory), GPUs when there are, throughput and recorded memory."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Sparkline, Static

from zopro_tui.view import CurveView
from zopro_tui.watched import WatchedRun
from zopro_tui.widgets.chart import fmt_number
from zopro_tui.widgets.panel import Panel


def gauge(fraction: float, width: int = 12) -> Text:
    """A bar of `width` cells, filled to `fraction`."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim")


def mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.1f} GiB" if value >= 10240 else f"{value:.0f} MiB"


class HardwarePanel(Panel):
    """Process CPU and memory (psutil), GPU memory and utilisation (nvidia-ml-py), steps/s, forward passes/s."""

    FEEDS = frozenset({"series", "status", "hardware"})

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__("hardware", id=id, classes=classes)
        self._rows = 0

    def compose(self) -> ComposeResult:
        yield Static(id="hardware-text")
        with Horizontal(classes="spark-row", id="cpu-row"):
            yield Label("CPU ", classes="spark-label")
            yield Sparkline([], id="cpu-spark", summary_function=max)
        with Horizontal(classes="spark-row", id="rss-row"):
            yield Label("RSS ", classes="spark-label")
            yield Sparkline([], id="rss-spark", summary_function=max)

    def show_run(self, run: WatchedRun, view: CurveView, data_range: tuple[float, float] | None) -> None:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True)
        reading = run.hardware
        info = run.info
        if reading is not None and reading.alive:
            cpu = reading.cpu_percent or 0.0
            grid.add_row("process", f"pid {reading.pid}, {reading.threads} threads")
            grid.add_row("CPU", gauge(cpu / 100) + Text(f" {cpu:.0f}% of a core"))
            grid.add_row("RSS", Text(mib(reading.rss_mib)))
        elif reading is not None and reading.note:
            grid.add_row("process", reading.note)
        elif run.live:
            grid.add_row("process", f"pid {info.pid if info else '?'} not readable")
        else:
            grid.add_row("process", "not running" if info else "waiting for the run to start")
        for gpu in reading.gpus if reading else []:
            used = gpu["used_mib"] / gpu["total_mib"] if gpu["total_mib"] else 0
            grid.add_row(f"GPU {gpu['index']}", Text(f"{gpu['name']}  util {gpu['util']}%"))
            grid.add_row(
                "  memory",
                gauge(used)
                + Text(
                    f" {mib(gpu['used_mib'])}/{mib(gpu['total_mib'])}"
                    + (f", run {mib(gpu['run_mib'])}" if gpu["run_mib"] else "")
                ),
            )
        latest = run.store.latest or (info.latest if info else {})
        rate = run.steps_per_second()
        grid.add_row("speed", f"{rate:.2f} steps/s" if rate else "-")
        update_s = latest.get("time/update_s")
        if update_s:
            grid.add_row("update", f"{update_s:.3f} s")
        forward = latest.get("compute/forward_passes")
        if forward is not None:
            grid.add_row("fwd passes", fmt_number(float(forward), 9))
        grid.add_row(
            "run RSS", f"{mib(latest.get('mem/rss_mib'))} (peak {mib(latest.get('mem/peak_rss_mib'))})"
        )
        if latest.get("mem/cuda_peak_mib") is not None:
            grid.add_row("CUDA peak", mib(latest.get("mem/cuda_peak_mib")))
        world = int(latest.get("dist/world_size") or 1)
        if world > 1:  # a torchrun run: every rank's own peak (rank 0's process is the one read above)
            grid.add_row("ranks", f"{world} (data parallel)")
            for rank in range(world):
                peak = latest.get(f"mem/rank{rank}/cuda_peak_mib") or latest.get(
                    f"mem/rank{rank}/peak_rss_mib"
                )
                grid.add_row(f"  rank {rank}", f"peak {mib(peak)}")
            sent = latest.get("dist/update_bytes")
            if sent is not None:
                grid.add_row("  sent/update", fmt_number(float(sent), 9) + " B")
        text = self.query_one("#hardware-text", Static)
        rows = grid.row_count
        text.update(grid, layout=rows != self._rows)  # a new layout only when the height changes
        self._rows = rows
        history = len(run.cpu_history) >= 2
        for row in self.query(".spark-row"):
            row.display = history
        if history:
            self.query_one("#cpu-spark", Sparkline).data = list(run.cpu_history)
            self.query_one("#rss-spark", Sparkline).data = list(run.rss_history)
