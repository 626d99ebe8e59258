"""Per-biopsy burden: the percentage of globally sclerotic glomeruli in each biopsy, the number
pathologists report (above about 20 % it changes decisions, e.g. on donor kidneys).

One implementation for the evaluate stage (test biopsies, true and predicted) and for
`glomeruli predict --by-biopsy` (new folders, predicted only); its picture is `plots.plot_burden`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glomeruli.core.atomic import atomic_path
from glomeruli.core.csvcells import spreadsheet_safe
from glomeruli.evaluation.outputs import Burden

CSV_COLUMNS = ("biopsy", "glomeruli", "true_pct", "predicted_pct", "mean_probability_pct", "error_pct_points")


@dataclass(frozen=True)
class BiopsyBurden:
    biopsy: str
    glomeruli: int
    true_pct: float | None  # from the labels; None for unlabelled folders
    predicted_pct: float  # share of glomeruli with probability >= threshold
    mean_probability_pct: float  # mean probability: the expected share if probabilities are calibrated

    @property
    def error_pct_points(self) -> float | None:
        return None if self.true_pct is None else self.predicted_pct - self.true_pct


def biopsy_burden(biopsies: np.ndarray, prob: np.ndarray, predicted: np.ndarray,
                  labels: np.ndarray | None = None) -> list[BiopsyBurden]:
    """One row per biopsy, sorted by biopsy id. `predicted`: each image's label (probability >= threshold)."""
    biopsies, prob = np.asarray(biopsies), np.asarray(prob, dtype=np.float64)
    predicted = np.asarray(predicted).astype(bool)
    rows = []
    for biopsy in sorted(set(biopsies.tolist())):
        members = biopsies == biopsy
        rows.append(BiopsyBurden(
            biopsy=str(biopsy), glomeruli=int(members.sum()),
            true_pct=None if labels is None else float(100 * np.mean(np.asarray(labels)[members] == 1)),
            predicted_pct=float(100 * np.mean(predicted[members])),
            mean_probability_pct=float(100 * np.mean(prob[members]))))
    return rows


def _wrong_side(true_pct: np.ndarray, predicted_pct: np.ndarray, cutoff_pct: float) -> int:
    return int(np.sum((true_pct >= cutoff_pct) != (predicted_pct >= cutoff_pct)))


def burden_summary(rows: list[BiopsyBurden], cutoff: float) -> dict:
    """Mean absolute error in percentage points and biopsies on the wrong side of the cutoff
    ("at or above cutoff" on one side), for both predicted percentages."""
    true = np.array([r.true_pct for r in rows], dtype=np.float64)
    by_count = np.array([r.predicted_pct for r in rows])
    by_probability = np.array([r.mean_probability_pct for r in rows])
    cutoff_pct = 100 * cutoff
    return {
        Burden.CUTOFF_PCT: cutoff_pct,
        Burden.N_BIOPSIES: len(rows),
        Burden.N_GLOMERULI: int(sum(r.glomeruli for r in rows)),
        Burden.MAE_PCT_POINTS: float(np.mean(np.abs(by_count - true))),
        Burden.MAE_PCT_POINTS_MEAN_PROBABILITY: float(np.mean(np.abs(by_probability - true))),
        Burden.WRONG_SIDE_OF_CUTOFF: _wrong_side(true, by_count, cutoff_pct),
        Burden.WRONG_SIDE_OF_CUTOFF_MEAN_PROBABILITY: _wrong_side(true, by_probability, cutoff_pct),
    }


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_burden_csv(path: Path, rows: list[BiopsyBurden]) -> None:
    """`biopsy,glomeruli,true_pct,predicted_pct,mean_probability_pct,error_pct_points` (true_pct and the
    error are empty for unlabelled folders)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows((spreadsheet_safe(r.biopsy), r.glomeruli, _fmt(r.true_pct), _fmt(r.predicted_pct),
                          _fmt(r.mean_probability_pct), _fmt(r.error_pct_points)) for r in rows)

