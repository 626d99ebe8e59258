"""Per-biopsy burden: the percentage of globally sclerotic glomeruli in each biopsy, the number
pathologists report (above about 20 % it changes decisions, e.g. on donor kidneys).

One implementation for the evaluate stage (test biopsies, true and predicted) and for
`glomeruli predict --by-biopsy` (new folders, predicted only).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glomeruli.core.atomic import atomic_path
from glomeruli.core.csvcells import spreadsheet_safe

MAX_LISTED = 20  # biopsies named beside the scatter plot; beyond that burden.csv lists them
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
        "cutoff_pct": cutoff_pct,
        "n_biopsies": len(rows),
        "n_glomeruli": int(sum(r.glomeruli for r in rows)),
        "mae_pct_points": float(np.mean(np.abs(by_count - true))),
        "mae_pct_points_mean_probability": float(np.mean(np.abs(by_probability - true))),
        "wrong_side_of_cutoff": _wrong_side(true, by_count, cutoff_pct),
        "wrong_side_of_cutoff_mean_probability": _wrong_side(true, by_probability, cutoff_pct),
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


def plot_burden(rows: list[BiopsyBurden], cutoff: float, out_png: Path, title: str) -> None:
    """Predicted vs true % per biopsy (point area = glomeruli), the diagonal and the cutoff lines; points
    in the shaded quadrants fall on the wrong side of the cutoff."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training boxes and CI; imported here so `predict` starts fast
    import matplotlib.pyplot as plt

    true = np.array([r.true_pct for r in rows])
    count = np.array([r.predicted_pct for r in rows])
    mean_prob = np.array([r.mean_probability_pct for r in rows])
    sizes = np.array([r.glomeruli for r in rows], dtype=np.float64)
    area = 30 + 400 * sizes / max(sizes.max(), 1)
    cutoff_pct = 100 * cutoff
    listed = len(rows) <= MAX_LISTED
    fig = plt.figure(figsize=(9.0 if listed else 6.0, 5.6))
    ax = fig.add_axes([0.08, 0.1, 0.52 if listed else 0.84, 0.78], anchor="W")
    ax.fill_between([0, cutoff_pct], cutoff_pct, 100, color="tab:red", alpha=0.07, lw=0)
    ax.fill_between([cutoff_pct, 100], 0, cutoff_pct, color="tab:red", alpha=0.07, lw=0)
    ax.plot([0, 100], [0, 100], color="grey", lw=1, ls=":", label="perfect")
    ax.axvline(cutoff_pct, color="tab:red", lw=1, ls="--")
    ax.axhline(cutoff_pct, color="tab:red", lw=1, ls="--", label=f"cutoff {cutoff_pct:g} %")
    ax.scatter(true, count, s=area, alpha=0.6, color="tab:blue", edgecolor="k", lw=0.5,
               label="count above threshold")
    ax.scatter(true, mean_prob, s=area, facecolor="none", edgecolor="tab:orange", lw=1.2, label="mean probability")
    if listed:  # numbers by the points (one label for points that coincide), the ids in a list beside the plot
        at: dict[tuple[float, float], list[int]] = {}
        for number, r in enumerate(rows, 1):
            at.setdefault((round(r.true_pct), round(r.predicted_pct)), []).append(number)
        width = max(len(r.biopsy) for r in rows)
        for (x, y), numbers in at.items():  # labels lean inwards near the right and top edges
            ax.annotate(",".join(map(str, numbers)), (x, y), xytext=(-7 if x > 85 else 7, -11 if y > 90 else 5),
                        textcoords="offset points", fontsize=8, color="0.15", ha="right" if x > 85 else "left")
        lines = [f"{'':>2} {'biopsy':<{width}} {'glom.':>5}  true \u2192 predicted %"]
        lines += [f"{n:>2} {r.biopsy:<{width}} {r.glomeruli:>5}  {r.true_pct:>4.0f} \u2192 {r.predicted_pct:>4.0f}"
                  for n, r in enumerate(rows, 1)]
        fig.text(0.6, 0.88, "\n".join(lines), fontsize=7.5, va="top", family="monospace")
    ax.set(xlim=(-3, 103), ylim=(-3, 103), xlabel="true % globally sclerotic (labels)",
           ylabel="predicted % globally sclerotic", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", markerscale=0.5)
    fig.savefig(out_png, dpi=120, metadata={"Software": None})
    plt.close(fig)
