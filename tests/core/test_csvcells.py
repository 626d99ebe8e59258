"""Cells that a spreadsheet would run as formulas are written inert, and read back as they were."""

from __future__ import annotations

import csv

import numpy as np

from glomeruli.evaluation.burden import biopsy_burden, write_burden_csv
from glomeruli.core.csvcells import original_cell, spreadsheet_safe
from glomeruli.commands.predict import Prediction, write_predictions

# OWASP's list: = + - @ tab and carriage return start a formula; a leading ' (the escape) is escaped too,
# so that reading back is exact.
WRITTEN = {
    "=HYPERLINK(\"http://evil\",\"x\").png": "'=HYPERLINK(\"http://evil\",\"x\").png",
    "+1.png": "'+1.png",
    "-2.png": "'-2.png",
    "@SUM(A1).png": "'@SUM(A1).png",
    "\tx.png": "'\tx.png",
    "\rx.png": "'\rx.png",
    "'quoted.png": "''quoted.png",
    "S-2024-0001_PAS_1of3_abc.png": "S-2024-0001_PAS_1of3_abc.png",
    "glom =1.png": "glom =1.png",
    "": "",
}


def test_formula_cells_are_escaped_and_read_back_exactly():
    assert {name: spreadsheet_safe(name) for name in WRITTEN} == WRITTEN
    assert {cell: original_cell(cell) for cell in WRITTEN.values()} == {cell: name for name, cell in WRITTEN.items()}


def _cells(path, column: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row[column] for row in list(csv.reader(f))[1:]]


def test_predictions_csv_names_are_inert(tmp_path):
    names = [name for name in WRITTEN if name and "\r" not in name]  # csv cannot carry a bare \r (sources refuses it)
    write_predictions(tmp_path / "evaluation.csv", [Prediction(n, 1, 0.5) for n in names])
    assert _cells(tmp_path / "evaluation.csv", 0) == [WRITTEN[n] for n in names]


def test_burden_csv_biopsies_are_inert(tmp_path):
    biopsies = np.array(["=cmd|' /C calc'!A0", "-B", "B"], dtype=object)
    rows = biopsy_burden(biopsies, np.array([0.9, 0.2, 0.6]), np.array([1, 0, 1]), None)
    write_burden_csv(tmp_path / "burden.csv", rows)
    assert sorted(_cells(tmp_path / "burden.csv", 0)) == sorted(["'=cmd|' /C calc'!A0", "'-B", "B"])
