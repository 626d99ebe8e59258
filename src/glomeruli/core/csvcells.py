"""Text cells of our CSVs (image names, biopsy ids) that a spreadsheet would run as formulas are written inert.

A cell starting with `=`, `+`, `-`, `@`, tab or carriage return (OWASP's list) is a formula to Excel,
LibreOffice and Google Sheets; a leading `'` makes it text there. The escape is reversible: a cell that
already starts with `'` gets one more, so `original_cell` gives back exactly the name that was written and
names keep their identity across stages (the manifest, the test predictions that cv-summary pools).
Only text cells go through it: numbers keep their sign. Every CSV we write (the manifest, test predictions,
per-biopsy burden, predict's output) escapes its text cells with `spreadsheet_safe`; readers undo it. `write_csv` writes
the evaluate stage's tables.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"


def spreadsheet_safe(text: str) -> str:
    """`text` as a cell no spreadsheet runs: a leading `'` when it starts a formula (or with `'` itself)."""
    return ESCAPE + text if text.startswith((*FORMULA_STARTS, ESCAPE)) else text


def original_cell(cell: str) -> str:
    """The text `spreadsheet_safe` was given."""
    return cell[len(ESCAPE):] if cell.startswith(ESCAPE) else cell


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable]) -> None:
    """A CSV with `header` and `rows` (text cells already `spreadsheet_safe`), "\\n" line ends, UTF-8."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
