"""What the curves show: x axis, smoothing, zoom window and value cursor, shared by every chart on a screen."""

from __future__ import annotations

from dataclasses import dataclass, replace

from textual.binding import Binding

from zopro_tui.series import X_AXES, X_AXIS_LABELS

SMOOTHING_LEVELS = (0.0, 0.6, 0.9, 0.99)
MIN_WINDOW_FRACTION = 1e-4


@dataclass(frozen=True)
class CurveView:
    """The x axis (step, time, compute), EMA weight, visible x window (None: everything) and cursor
    (None: the latest point)."""

    axis: str = "step"
    smoothing: float = 0.0
    window: tuple[float, float] | None = None
    cursor: float | None = None

    @property
    def axis_label(self) -> str:
        return X_AXIS_LABELS[self.axis]

    def next_axis(self) -> CurveView:
        axis = X_AXES[(X_AXES.index(self.axis) + 1) % len(X_AXES)]
        return replace(self, axis=axis, window=None, cursor=None)

    def next_smoothing(self) -> CurveView:
        index = SMOOTHING_LEVELS.index(self.smoothing) if self.smoothing in SMOOTHING_LEVELS else 0
        return replace(self, smoothing=SMOOTHING_LEVELS[(index + 1) % len(SMOOTHING_LEVELS)])

    def visible(self, data_range: tuple[float, float] | None) -> tuple[float, float] | None:
        """The x window to draw: the zoom window, or all the data."""
        if self.window is not None:
            return self.window
        return data_range

    def zoomed(self, factor: float, data_range: tuple[float, float] | None) -> CurveView:
        """Zoom in (factor < 1) or out (factor > 1) around the cursor, or the right edge without one."""
        if data_range is None or data_range[1] <= data_range[0]:
            return self
        low, high = self.window or data_range
        full = data_range[1] - data_range[0]
        span = min(full, max(full * MIN_WINDOW_FRACTION, (high - low) * factor))
        if span >= full:
            return replace(self, window=None)
        centre = self.cursor if self.cursor is not None else high
        fraction = (centre - low) / (high - low) if high > low else 1.0
        new_low = centre - span * fraction
        new_low = min(max(new_low, data_range[0]), data_range[1] - span)
        return replace(self, window=(new_low, new_low + span))

    def cursor_moved(
        self, columns: int, plot_columns: int, data_range: tuple[float, float] | None
    ) -> CurveView:
        """Move the cursor by a number of screen columns, panning the window when it leaves it."""
        if data_range is None:
            return self
        low, high = self.window or data_range
        step = (high - low) / max(plot_columns, 1) or 1.0
        start = self.cursor if self.cursor is not None else data_range[1]
        cursor = min(max(start + columns * step, data_range[0]), data_range[1])
        window = self.window
        if window is not None:
            span = window[1] - window[0]
            if cursor < window[0]:
                window = (cursor, cursor + span)
            elif cursor > window[1]:
                window = (cursor - span, cursor)
        return replace(self, cursor=cursor, window=window)

    def cursor_to_end(self) -> CurveView:
        return replace(self, cursor=None)

    def reset(self) -> CurveView:
        return replace(self, window=None, cursor=None)

    def describe(self) -> str:
        parts = [
            f"x: {self.axis_label}",
            f"smoothing {self.smoothing:g}" if self.smoothing else "no smoothing",
        ]
        if self.window is not None:
            parts.append("zoomed")
        return " · ".join(parts)


# The value cursor and the x zoom out: the same keys on every screen with curves (each screen shows its own
# x axis, smoothing and zoom-in keys in its footer)
CURSOR_BINDINGS = [
    Binding("h,left", "move_cursor(-1)", "Cursor left", show=False),
    Binding("l,right", "move_cursor(1)", "Cursor right", show=False),
    Binding("H,shift+left", "move_cursor(-10)", "Cursor left x10", show=False),
    Binding("L,shift+right", "move_cursor(10)", "Cursor right x10", show=False),
    Binding("G,end", "cursor_to_end", "Cursor to latest", show=False),
    Binding("minus", "zoom_x(2.0)", "Zoom out", show=False),
    Binding("0", "reset_x", "Reset zoom", show=False),
]


class CurveViewActions:
    """The keyboard actions on a screen's CurveView (x axis, smoothing, value cursor, zoom), shared by the
    dashboard and the compare screen; the screen provides `view`, `plot_columns()` and `data_range()`."""

    view: CurveView

    def action_next_axis(self) -> None:
        self.view = self.view.next_axis()
        self.notify(f"x axis: {self.view.axis_label}", timeout=2)

    def action_smoothing(self) -> None:
        self.view = self.view.next_smoothing()
        self.notify(
            f"EMA smoothing {self.view.smoothing:g}" if self.view.smoothing else "no smoothing", timeout=2
        )

    def action_move_cursor(self, columns: int) -> None:
        self.view = self.view.cursor_moved(columns, self.plot_columns(), self.data_range())

    def action_cursor_to_end(self) -> None:
        self.view = self.view.cursor_to_end()

    def action_zoom_x(self, factor: float) -> None:
        self.view = self.view.zoomed(factor, self.data_range())

    def action_reset_x(self) -> None:
        self.view = self.view.reset()
