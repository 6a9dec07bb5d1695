"""Setting up the workbench's DataTables: columns declared as (key, label) pairs, added in one call, or
fitted to the screen's width (`fit_table`, as `zopro ls` fits its table)."""

from __future__ import annotations

from collections.abc import Iterable

from textual.widgets import DataTable

from engine.rundir.columns import Column, fit_columns

CELL_PADDING = 2  # a DataTable cell's padding, one each side

Fit = tuple[list[Column], dict[str, int]]  # the columns shown and their widths


def add_columns(table: DataTable, columns: Iterable[tuple[str, str]]) -> DataTable:
    """Add each (key, label) column, in order; the key is what rows and cell updates name it by."""
    for key, label in columns:
        table.add_column(label, key=key)
    return table


def fit_table(
    table: DataTable, columns: list[Column], natural: dict[str, int], width: int, before: Fit | None
) -> Fit:
    """Empty `table` for its next rows, its columns fitted to a screen `width` cells wide (the scrollbar's
    room kept) by `fit_columns` from each column's `natural` width; the columns are made anew only when the
    fit differs from `before` (what the previous call returned)."""
    fit = fit_columns(columns, natural, max(20, width - 2) - CELL_PADDING, gap=CELL_PADDING)
    if fit == before:
        table.clear()
        return fit
    table.clear(columns=True)
    shown, widths = fit
    for column in shown:
        table.add_column(column.header, key=column.key, width=widths[column.key])
    return fit
