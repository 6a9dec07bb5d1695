"""Setting up the workbench's DataTables: columns declared as (key, label) pairs, added in one call; the
padding each cell takes, for tables fitted to the width (`engine.rundir.columns.fit_columns`)."""

from __future__ import annotations

from collections.abc import Iterable

from textual.widgets import DataTable

CELL_PADDING = 2  # a DataTable cell's padding, one each side


def add_columns(table: DataTable, columns: Iterable[tuple[str, str]]) -> DataTable:
    """Add each (key, label) column, in order; the key is what rows and cell updates name it by."""
    for key, label in columns:
        table.add_column(label, key=key)
    return table
