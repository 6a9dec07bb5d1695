"""The braille chart on its own: error bars from standard errors, point markers on sparse series, the legend."""

from __future__ import annotations

import numpy as np
from textual.app import App, ComposeResult

from zopro_tui.catalogue import wanted_metric
from zopro_tui.widgets.chart import LABEL_WIDTH, ChartData, ChartSeries, CurveChart, fmt_number

X = np.array([0.0, 50.0, 100.0])
FLAT = np.array([0.5, 0.5, 0.5])


class OneChart(App):
    def compose(self) -> ComposeResult:
        yield CurveChart(ChartData("held-out gold"))


async def drawn(*series: ChartSeries, size: tuple[int, int] = (48, 14)) -> list[str]:
    """The chart's lines as text: legend, plot rows (y labels, then the plot area), x labels."""
    app = OneChart()
    async with app.run_test(size=size) as pilot:
        chart = app.query_one(CurveChart)
        chart.show(ChartData("held-out gold", list(series)))
        await pilot.pause()
        return [chart.render_line(y).text for y in range(chart.size.height)]


def plot_rows(lines: list[str]) -> list[str]:
    return [line[LABEL_WIDTH:] for line in lines[1:-1]]


def drawn_rows(lines: list[str]) -> list[int]:
    return [row for row, text in enumerate(plot_rows(lines)) if text.strip()]


async def test_standard_errors_draw_bars_around_the_points_and_widen_the_y_range():
    plain = await drawn(ChartSeries("held-out", X, FLAT))
    assert len(drawn_rows(plain)) == 1, "a flat line without standard errors: one row"
    assert plain[1].startswith("   0.55"), "the y range is the line's, padded"

    lines = await drawn(ChartSeries("held-out", X, FLAT, se=np.array([0.2, 0.2, 0.2])))
    rows = drawn_rows(lines)
    assert rows[0] == 0 and rows[-1] == len(plot_rows(lines)) - 1, "the bars reach 0.3 and 0.7: the y range"
    assert float(lines[1][: LABEL_WIDTH - 1]) > 0.7 and float(lines[-2][: LABEL_WIDTH - 1]) < 0.3
    line_row = next(row for row, text in enumerate(plot_rows(lines)) if text.count("●") == 3)
    markers = marker_columns(plot_rows(lines)[line_row])
    for row, text in enumerate(plot_rows(lines)):
        if row != line_row:
            bar_columns = [column for column, char in enumerate(text) if char.strip()]
            assert bar_columns, f"row {row}: every row between the bars' ends has them"
            assert all(min(abs(column - marker) for marker in markers) <= 1 for column in bar_columns), (
                f"row {row}: bars only at the points, not between them"
            )
    assert "±0.2" in lines[0], "the legend reads the standard error at the cursor (the last point)"


def marker_columns(text: str) -> list[int]:
    return [column for column, char in enumerate(text) if char == "●"]


async def test_a_point_without_standard_error_gets_no_bar():
    lines = await drawn(ChartSeries("held-out", X, FLAT, se=np.array([np.nan, 0.2, np.nan])))
    line_row = next(row for row, text in enumerate(plot_rows(lines)) if text.count("●") == 3)
    first, middle, last = marker_columns(plot_rows(lines)[line_row])
    for row, text in enumerate(plot_rows(lines)):
        if row != line_row and text.strip():
            assert all(abs(column - middle) <= 1 for column, char in enumerate(text) if char.strip())
    assert "±" not in lines[0], "no standard error at the last point: none in the legend"


async def test_sparse_series_get_markers_and_dense_ones_do_not():
    sparse = await drawn(ChartSeries("premise", X, np.array([0.1, 0.4, 0.2])))
    assert sum(text.count("●") for text in plot_rows(sparse)) == 3
    x = np.arange(200.0)
    dense = await drawn(ChartSeries("rollouts", x, np.sin(x / 10)))
    assert not any("●" in text for text in plot_rows(dense))


async def test_the_legend_shortens_and_the_title_stays():
    series = ChartSeries("held-out", X, FLAT, se=np.array([0.2, 0.2, 0.2]))
    wide = await drawn(series, size=(48, 10))
    assert wide[0].startswith("held-out gold") and "±0.2" in wide[0]
    narrower = await drawn(series, size=(30, 10))
    assert narrower[0].startswith("held-out gold") and "±" not in narrower[0]
    narrowest = await drawn(series, size=(22, 10))
    assert narrowest[0].strip() == "held-out gold  ━0.5", "no room for labels: the title, markers and values"
    tiny = await drawn(series, size=(14, 10))
    assert tiny[0].strip() == "held-out gold", "the title before any of the legend"


async def test_axis_labels_fit_their_cells_whole():
    """A small value keeps its exponent (-5.9e-5, never the cut -5.9e-0), a short one its digits."""
    assert fmt_number(-5.9e-05) == "-5.9e-5" and fmt_number(-0.011748) == "-0.0117"
    for value in (-5.9e-05, 1.234e-12, -0.011748, 0.14931, -1234.5, 123456.0, -3.2e-7):
        assert len(fmt_number(value)) <= 7, value


def test_screens_keep_the_premise_check_and_the_standard_errors_they_draw():
    for name in ("premise/gold_minus", "premise/gold_gain", "premise/cos_descent_mu", "eval/gold_se"):
        assert wanted_metric(name), name
    assert wanted_metric("eval/win_rate_vs_sft_se") and wanted_metric("zo/step_norm")
    assert not wanted_metric("eval/response_length") and not wanted_metric("eval/response_length_se")


async def test_the_value_cursor_past_a_panels_axis_points_beyond_it_instead_of_sitting_on_its_end():
    """The SFT loss ends at step 100 while the cursor reads step 300 elsewhere: the x labels say that the
    cursor is past this axis, not that step 300 is at its right end."""
    app = OneChart()
    async with app.run_test(size=(48, 14)) as pilot:
        chart = app.query_one(CurveChart)
        series = ChartSeries("loss", X, FLAT)
        labels = {}
        for cursor in (50.0, 300.0, -20.0):
            chart.show(ChartData("SFT loss", [series], cursor=cursor))
            await pilot.pause()
            labels[cursor] = chart.render_line(chart.size.height - 1).text
    assert "▲50" in labels[50.0]
    assert labels[300.0].rstrip().endswith("300▶") and "▲" not in labels[300.0]
    assert labels[-20.0][LABEL_WIDTH:].startswith("◀-20") and "▲" not in labels[-20.0]


async def test_a_narrow_legend_keeps_the_names_and_shows_values_while_the_cursor_is_out():
    app = OneChart()
    values = np.array([0.1234567, 0.2345678, 0.3456789])
    series = [ChartSeries("rollouts", X, values), ChartSeries("held-out", X, values[::-1].copy())]
    async with app.run_test(size=(40, 10)) as pilot:
        chart = app.query_one(CurveChart)
        chart.show(ChartData("held-out gold", series))
        await pilot.pause()
        plain = chart.render_line(0).text
        chart.show(ChartData("held-out gold", series, cursor=50.0))
        await pilot.pause()
        reading = chart.render_line(0).text
    assert "rollouts" in plain and "held-out" in plain.split("gold", 1)[1], "which line is which"
    assert "0.2346" in reading and "rollouts" not in reading, "the values at the cursor"
