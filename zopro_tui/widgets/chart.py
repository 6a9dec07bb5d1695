"""A braille line chart of several series, drawn from the min and max per pixel column, with a value cursor.

The chart knows nothing about runs: a panel gives it `ChartSeries` (x, y and optionally a smoothed y, as
numpy arrays at full resolution), the visible x window and the cursor, and it draws what fits. With
smoothing the raw data is drawn dim under the smoothed line, the way TensorBoard does it. A series with a
standard error per point gets error bars (dim, under the line: a band where the points are dense), and a
series with few points in the window gets a marker on each point, so three evaluations read as three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

from zopro_tui.series import Columns, minmax_columns
from zopro_tui.widgets.numbers import fmt_number, fmt_x  # noqa: F401 - fmt_number is imported from here too

PALETTE = ("#4aa8ff", "#ffb347", "#5fd35f", "#ff6b9a", "#b78cff", "#40e0d0", "#e8e85a", "#ff7f50")
NO_COLOR_MARKERS = ("⣿", "•", "+", "x", "o", "*", "#", "%")
POINT_MARKERS = ("●", "•", "+", "x", "o", "*", "#", "%")  # a sparse series' points (NO_COLOR: one per series)
SPARSE_COLUMNS_PER_POINT = 4  # a series gets point markers while it has at most one point per 4 columns
LABEL_WIDTH = 8
# bit of each braille dot, indexed [row within cell (0-3)][column within cell (0-1)]
BRAILLE_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.int64)


@dataclass
class ChartSeries:
    """One line: full-resolution points (x non-decreasing), when smoothing the smoothed values, and when
    known the standard error of each point (NaN where unknown), drawn as error bars around y."""

    label: str
    x: np.ndarray
    y: np.ndarray
    color: str = PALETTE[0]
    smoothed: np.ndarray | None = None
    se: np.ndarray | None = None


@dataclass
class ChartData:
    """What a chart draws: its series, the x window, the cursor and what to say while there is no data."""

    title: str
    series: list[ChartSeries] = field(default_factory=list)
    x_window: tuple[float, float] | None = None
    cursor: float | None = None
    x_kind: str = "step"  # step, time or compute: how x values are written
    waiting: str = "no data yet"
    xy: bool = False  # a trajectory: y against x, in the order logged, not a function of x
    title_first: bool = True  # kept for callers: the legend is cut, never the title


@dataclass
class Raster:
    """A chart's plot area per cell: braille bits of the lines and who drew them (2 * series + dim), braille
    bits of the error bars and their series, the series whose point marker sits there (-1: none), and the
    y range drawn."""

    line_bits: np.ndarray
    line_owners: np.ndarray
    band_bits: np.ndarray
    band_owners: np.ndarray
    markers: np.ndarray
    y_low: float
    y_high: float


def _cells(pixel_owner: np.ndarray, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (owner per pixel, -1 for none) to braille cells: the bits of each cell and its largest owner."""
    drawn = pixel_owner >= 0
    bits = np.zeros((rows, width), dtype=np.int64)
    owners = np.full((rows, width), -1, dtype=np.int64)
    for dy in range(4):
        for dx in range(2):
            sub = drawn[dy::4, dx::2]
            bits += sub * BRAILLE_BITS[dy, dx]
            owners = np.maximum(owners, np.where(sub, pixel_owner[dy::4, dx::2], -1))
    return bits, owners


def value_before(x: np.ndarray, values: np.ndarray, at: float) -> float | None:
    """The value of the last point at or before `at` (None before the first point)."""
    if not len(x):
        return None
    position = int(np.searchsorted(x, at, side="right")) - 1
    return float(values[position]) if position >= 0 else None


def data_signature(data: ChartData) -> tuple:
    """What decides a chart's look, cheaply: per series its length, last point and smoothing."""
    series = tuple(
        (
            s.label,
            s.color,
            len(s.x),
            float(s.x[-1]) if len(s.x) else None,
            float(s.y[-1]) if len(s.y) else None,
            s.smoothed is not None and len(s.smoothed),
            s.se is not None and len(s.se),
        )
        for s in data.series
    )
    return (
        data.title,
        series,
        data.x_window,
        data.cursor,
        data.x_kind,
        data.waiting,
        data.xy,
        data.title_first,
    )


class CurveChart(Widget):
    """Several series on shared axes in braille, with a legend that reads the values at the cursor."""

    DEFAULT_CSS = """
    CurveChart { height: 1fr; width: 1fr; }
    """

    def __init__(self, data: ChartData | None = None, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.data = data or ChartData(title="")
        self._strips: list[Strip] | None = None
        self._strips_width = 0
        self._signature: tuple | None = None

    def show(self, data: ChartData) -> None:
        """Draw new data; nothing happens when it draws the same as before (the same points, window, cursor)."""
        signature = data_signature(data)
        self.data = data
        if signature == self._signature:
            return
        self._signature = signature
        self._strips = None
        self.refresh()

    def on_resize(self) -> None:
        self._strips = None

    # -- drawing: the Line API, one Strip per row, built once per data or size change -------------------------
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if self._strips is None or self._strips_width != width:
            self._strips = self._build_strips()
            self._strips_width = width
        if y < len(self._strips):
            return self._strips[y]
        return Strip.blank(width, self.rich_style)

    def _text_strip(self, text: Text, width: int) -> Strip:
        segments = list(text.render(self.app.console, end=""))
        return Strip(segments).crop_extend(0, width, self.rich_style).apply_style(self.rich_style)

    def _build_strips(self) -> list[Strip]:
        width, height = self.size.width, self.size.height
        if width <= 0 or height <= 0:
            return []
        data = self.data
        no_color = bool(getattr(self.app, "no_color", False))
        strips = [self._text_strip(self._legend(width, no_color), width)]
        if height == 1:
            return strips
        drawable = [s for s in data.series if len(s.x)]
        plot_rows = height - 2
        plot_width = width - LABEL_WIDTH
        if not drawable or plot_rows < 1 or plot_width < 4:
            message = Text(data.waiting if not drawable else "", style="dim italic")
            blank = Strip.blank(width, self.rich_style)
            strips += [blank] * max(0, (height - 2) // 2) + [self._text_strip(message, width)]
            return strips
        window = self._window(drawable)
        raster = self._raster(drawable, window, plot_rows, plot_width)
        cursor_cell = None
        if data.cursor is not None and window[1] > window[0] and not data.xy:
            fraction = (data.cursor - window[0]) / (window[1] - window[0])
            if 0 <= fraction <= 1:
                cursor_cell = min(plot_width - 1, int(fraction * plot_width))
        base = self.rich_style
        styles = [base + Style(color=s.color) for s in drawable]
        dim_styles = [base + Style(color=s.color, dim=True) for s in drawable]
        cursor_style = Style(bgcolor="grey23")
        axis_style = base + Style(dim=True)
        blank_style = base
        for row in range(plot_rows):
            if row == 0:
                label = fmt_number(raster.y_high)
            elif row == plot_rows - 1:
                label = fmt_number(raster.y_low)
            elif row == plot_rows // 2 and plot_rows >= 5:
                label = fmt_number((raster.y_low + raster.y_high) / 2)
            else:
                label = ""
            segments = [
                Segment(label.rjust(LABEL_WIDTH - 1)[: LABEL_WIDTH - 1] + ("┤" if label else "│"), axis_style)
            ]
            run_text: list[str] = []
            run_style: Style | None = None
            line_bits, line_owners = raster.line_bits[row], raster.line_owners[row]
            band_bits, band_owners, markers = (
                raster.band_bits[row],
                raster.band_owners[row],
                raster.markers[row],
            )
            for column in range(plot_width):
                bits = int(line_bits[column])
                marker = int(markers[column])
                if bits:  # an error bar through a line's cell still shows, in the line's colour
                    bits |= int(band_bits[column])
                if marker >= 0:
                    char = POINT_MARKERS[marker % len(POINT_MARKERS)] if no_color else POINT_MARKERS[0]
                    style = styles[marker]
                elif bits:
                    series_index, dim = divmod(int(line_owners[column]), 2)
                    if no_color and series_index > 0:
                        char = NO_COLOR_MARKERS[series_index % len(NO_COLOR_MARKERS)]
                    else:
                        char = chr(0x2800 + bits)
                    style = dim_styles[series_index] if dim else styles[series_index]
                elif band_bits[column]:
                    bits = int(band_bits[column])
                    char, style = chr(0x2800 + bits), dim_styles[int(band_owners[column])]
                else:
                    char, style = " ", blank_style
                if column == cursor_cell:
                    if not bits and marker < 0:
                        char, style = "│", base + Style(color="grey50")
                    style = style + cursor_style
                if style is not run_style and run_text:
                    segments.append(Segment("".join(run_text), run_style))
                    run_text = []
                run_style = style
                run_text.append(char)
            if run_text:
                segments.append(Segment("".join(run_text), run_style))
            strips.append(Strip(segments, width))
        strips.append(self._text_strip(self._x_labels(window, width), width))
        return strips

    def _window(self, drawable: list[ChartSeries]) -> tuple[float, float]:
        if self.data.xy:
            xs = np.concatenate([s.x for s in drawable])
            xs = xs[np.isfinite(xs)]
            return (float(xs.min()), float(xs.max())) if len(xs) else (0.0, 1.0)
        if self.data.x_window is not None:
            return self.data.x_window
        low = min(float(s.x[0]) for s in drawable)
        high = max(float(s.x[-1]) for s in drawable)
        return (low, high) if high > low else (low - 0.5, high + 0.5)

    def _raster(
        self, drawable: list[ChartSeries], window: tuple[float, float], rows: int, width: int
    ) -> Raster:
        """Braille bits per cell of the lines and of the error bars, who drew them, and the point markers."""
        pixel_rows, pixel_columns = rows * 4, width * 2
        traces: list[tuple[int, bool, Columns | _PathColumns]] = []
        bars: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # series, column, low, high
        low, high = math.inf, -math.inf
        for index, series in enumerate(drawable):
            layers = (
                [(True, series.y), (False, series.smoothed)]
                if series.smoothed is not None
                else [(False, series.y)]
            )
            for dim, values in layers:
                if self.data.xy:
                    columns = self._xy_columns(series.x, values, window, pixel_columns)
                else:
                    columns = minmax_columns(series.x, values, window[0], window[1], pixel_columns)
                if not len(columns):
                    continue
                traces.append((index, dim, columns))
                low = min(low, float(columns.low.min()))
                high = max(high, float(columns.high.max()))
            if series.se is not None and not self.data.xy and len(series.se) == len(series.y):
                below = minmax_columns(series.x, series.y - series.se, window[0], window[1], pixel_columns)
                above = minmax_columns(series.x, series.y + series.se, window[0], window[1], pixel_columns)
                if len(below) and len(below) == len(above):  # NaN errors drop the same points from both
                    bars.append((index, below.column, below.low, above.high))
                    low = min(low, float(below.low.min()))
                    high = max(high, float(above.high.max()))
        if not traces or not math.isfinite(low):
            low, high = 0.0, 1.0
        if high - low < 1e-12:
            pad = abs(high) * 0.1 or 0.5
            low, high = low - pad, high + pad
        else:
            pad = (high - low) * 0.04
            low, high = low - pad, high + pad
        scale = (pixel_rows - 1) / (high - low)

        def pixel_row(values: np.ndarray) -> np.ndarray:
            return np.clip(((high - values) * scale).round().astype(np.int64), 0, pixel_rows - 1)

        bar_owner = np.full((pixel_rows, pixel_columns), -1, dtype=np.int64)
        for index, column, bar_low, bar_high in bars:
            tops, bottoms = pixel_row(bar_high), pixel_row(bar_low)
            for c, top, bottom in zip(column.tolist(), tops.tolist(), bottoms.tolist(), strict=True):
                bar_owner[top : bottom + 1, c] = index
                caps = slice(max(0, c - 1), c + 2)
                bar_owner[top, caps] = index
                bar_owner[bottom, caps] = index
        pixels_owner = np.full((pixel_rows, pixel_columns), -1, dtype=np.int64)
        for index, dim, columns in traces:
            owner = 2 * index + (1 if dim else 0)
            column = columns.column
            row_high, row_low = pixel_row(columns.high), pixel_row(columns.low)
            row_first, row_last = pixel_row(columns.first), pixel_row(columns.last)
            previous_column, previous_row = None, None
            for i in range(len(column)):
                c = int(column[i])
                top, bottom = int(row_high[i]), int(row_low[i])
                if previous_column is not None:
                    # join the previous column's last value to this column's first value
                    dc, dr = c - previous_column, int(row_first[i]) - previous_row
                    if dc == 1 or (dc == 0 and abs(dr) <= 1):
                        lo_row, hi_row = sorted((previous_row, int(row_first[i])))
                        pixels_owner[lo_row : hi_row + 1, c] = owner
                    else:
                        n = max(abs(dc), abs(dr))
                        t = np.arange(1, n + 1) / n
                        pixels_owner[
                            np.rint(previous_row + dr * t).astype(np.int64),
                            np.rint(previous_column + dc * t).astype(np.int64),
                        ] = owner
                pixels_owner[top : bottom + 1, c] = owner
                previous_column, previous_row = c, int(row_last[i])
        line_bits, line_owners = _cells(pixels_owner, rows, width)
        band_bits, band_owners = _cells(bar_owner, rows, width)
        markers = np.full((rows, width), -1, dtype=np.int64)
        if not self.data.xy:
            for index, series in enumerate(drawable):
                if series.smoothed is not None:
                    continue
                start = int(np.searchsorted(series.x, window[0], side="left"))
                stop = int(np.searchsorted(series.x, window[1], side="right"))
                x, y = series.x[start:stop], series.y[start:stop]
                finite = np.isfinite(y)
                x, y = x[finite], y[finite]
                if not 0 < len(x) <= width // SPARSE_COLUMNS_PER_POINT:
                    continue
                span = max(window[1] - window[0], 1e-300)
                column = np.minimum(
                    ((x - window[0]) / span * pixel_columns).astype(np.int64), pixel_columns - 1
                )
                markers[pixel_row(y) // 4, column // 2] = index
        return Raster(line_bits, line_owners, band_bits, band_owners, markers, low, high)

    @staticmethod
    def _xy_columns(x: np.ndarray, y: np.ndarray, window: tuple[float, float], columns: int):
        """A trajectory as per-point 'columns' in logged order (so the path joins point to point)."""
        finite = np.isfinite(x) & np.isfinite(y)
        x, y = x[finite], y[finite]
        span = window[1] - window[0]
        if not len(x):
            empty = np.empty(0)
            return Columns(np.empty(0, dtype=np.int64), empty, empty, empty, empty)
        if span <= 0:
            column = np.full(len(x), columns // 2, dtype=np.int64)
        else:
            column = np.minimum(((x - window[0]) / span * columns).astype(np.int64), columns - 1)
        return _PathColumns(column, y)

    def _legend(self, width: int, no_color: bool) -> Text:
        """The title, then each series' marker, label and value (at the cursor) with its standard error. When
        that does not fit, the legend shortens, never the title (a chart is known by its title): no standard
        errors, then the labels alone (which line is which), or, while the value cursor is out, the values
        alone (what the user asked for); then the other; else the first of those two, cut."""
        data = self.data
        title = Text(data.title, style="bold")
        if not data.series or title.cell_len >= width:
            title.truncate(width, overflow="ellipsis")
            return title
        room = width - title.cell_len - 2
        labels_only = self._series_legend(no_color, with_errors=False, values=False)
        values_only = self._series_legend(no_color, with_errors=False, labels=False)
        preferred, other = (
            (values_only, labels_only) if data.cursor is not None else (labels_only, values_only)
        )
        for legend in (
            self._series_legend(no_color, with_errors=True),
            self._series_legend(no_color, with_errors=False),
            preferred,
            other,
        ):
            if legend.cell_len <= room:
                break
        else:
            legend = preferred
        legend.truncate(room, overflow="ellipsis")
        return Text.assemble(title, "  ", legend)

    def _series_legend(
        self, no_color: bool, with_errors: bool, labels: bool = True, values: bool = True
    ) -> Text:
        data = self.data
        legend = Text(no_wrap=True, overflow="ellipsis")
        for index, series in enumerate(data.series):
            marker = NO_COLOR_MARKERS[index % len(NO_COLOR_MARKERS)] if no_color else "━"
            if index:
                legend.append("  ")
            legend.append(marker, style=Style(color=series.color))
            if not values:
                legend.append(f" {series.label}")
                continue
            legend.append(f" {series.label} " if labels else "")
            value = self._legend_value(series)
            legend.append(fmt_number(value, 8) if value is not None else "-", style="bold")
            if with_errors and series.se is not None and series.smoothed is None:
                error = self._legend_value(series, series.se)
                if error is not None and math.isfinite(error):
                    legend.append(f"±{error:.2g}", style="dim")
        return legend

    def _legend_value(self, series: ChartSeries, values: np.ndarray | None = None) -> float | None:
        """The value (or, given, another array's entry) of the last point at or before the cursor."""
        if not len(series.x):
            return None
        if values is None:
            values = series.smoothed if series.smoothed is not None else series.y
        if self.data.cursor is None or self.data.xy:
            return float(values[-1])
        return value_before(series.x, values, self.data.cursor)

    def _x_labels(self, window: tuple[float, float], width: int) -> Text:
        """Both ends of the x window, and the cursor's x under the cursor (or the middle, when wide)."""
        kind = "step" if self.data.xy else self.data.x_kind
        left, right = fmt_x(window[0], kind), fmt_x(window[1], kind)
        plot_width = width - LABEL_WIDTH
        cells = [" "] * width
        text = Text(no_wrap=True, style="dim")

        def put(start: int, label: str) -> bool:
            start = max(0, min(start, width - len(label)))
            if any(c != " " for c in cells[max(0, start - 1) : start + len(label) + 1]):
                return False
            cells[start : start + len(label)] = list(label)
            return True

        put(LABEL_WIDTH, left)
        if right != left:  # one point: one label, not the same number three times
            put(width - len(right), right)
        cursor = self.data.cursor
        if cursor is not None and not self.data.xy and window[1] > window[0]:
            column = LABEL_WIDTH + int((cursor - window[0]) / (window[1] - window[0]) * (plot_width - 1))
            value = fmt_x(cursor, kind)
            if cursor > window[1]:  # past this panel's axis (a stage that ended earlier): point beyond it
                label, column = f"{value}▶", width - len(value) - 1
            elif cursor < window[0]:
                label, column = f"◀{value}", LABEL_WIDTH
            else:
                label = f"▲{value}"
            if not put(column, label) and (label[0] != "▲" or not put(column - len(value), f"{value}▲")):
                start = max(0, min(column, width - len(label)))  # it matters more than the ends: write over
                cells[start : start + len(label)] = list(label)
        elif plot_width >= 30 and right != left:
            middle = fmt_x((window[0] + window[1]) / 2, kind)
            put(LABEL_WIDTH + plot_width // 2 - len(middle) // 2, middle)
        text.append("".join(cells)[:width])
        return text


class _PathColumns:
    """Columns-like view of a trajectory: one entry per point, joined in order."""

    def __init__(self, column: np.ndarray, y: np.ndarray):
        self.column, self.low, self.high, self.first, self.last = column, y, y, y, y

    def __len__(self) -> int:
        return len(self.column)
