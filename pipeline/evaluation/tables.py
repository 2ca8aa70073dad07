"""Markdown tables for the reports of `sinkstream eval`, `anomaly` and `bench` (tabulate, GitHub format).

tabulate belongs to the `eval`/`bench` extras: it is imported when a table is written, so that importing the
command line works in the service image, which does not install it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MISSING = "—"


def cell(value: Any, digits: int = 2) -> str:
    """A table cell: floats with `digits` decimals, None/NaN as an em dash, anything else as str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub Markdown table, columns padded to equal width; cells written by `cell` (no number re-parsing,
    so 0.500 stays 0.500). Raises ValueError when a row has more or fewer cells than the header."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"expected {len(header)} cells per row, got {len(row)}: {list(row)}")
    from tabulate import tabulate

    return tabulate([[cell(v, digits) for v in row] for row in rows], headers=list(header), tablefmt="github",
                    disable_numparse=True)
