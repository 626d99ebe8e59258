"""Every picture of the evaluate stage, and the CSV data `dvc plots` draws: confusion matrix, ROC and
precision-recall curves, reliability diagram, training curves, ROC curves by site and per-biopsy burden.
The numbers come from `metrics`, `calibration`, `sites` and `burden`; this module only draws and writes them,
so those stay free of matplotlib (`glomeruli predict` imports this late, for a labelled folder's confusion matrix).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training boxes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from glomeruli.core.csvcells import spreadsheet_safe, write_csv  # noqa: E402
from glomeruli.evaluation.burden import BiopsyBurden  # noqa: E402
from glomeruli.evaluation.calibration import prob_of_score, reliability_bins  # noqa: E402
from glomeruli.evaluation.metrics import scalar_metrics  # noqa: E402
from glomeruli.evaluation.outputs import (CONFUSION_NAME, PR_NAME, ROC_NAME, Calibration, Metric, PlotColumn,  # noqa: E402
                                          interval_key)
from glomeruli.evaluation.uncertainty import format_interval  # noqa: E402

MAX_BIOPSIES_LISTED = 20  # biopsies named beside the burden scatter plot; beyond that burden.csv lists them


def write_confusion_roc_pr(folder: Path, ids: np.ndarray, y_true: np.ndarray, prob: np.ndarray, threshold: float,
                           ci: dict | None = None, score: np.ndarray | None = None) -> None:
    """CSV data for `dvc plots` (confusion, ROC, PR) and PNG renderings of the same; `ci` (metric ->
    {"low", "high"}) puts the 95 % intervals into the titles. The curves rank by `score` (default `prob`;
    see `calibration.ranking_score`); their threshold columns stay probabilities."""
    ci = ci or {}
    score = prob if score is None else np.asarray(score)
    folder.mkdir(parents=True, exist_ok=True)
    y_pred = (prob >= threshold).astype(int)
    c = PlotColumn
    write_csv(folder / CONFUSION_NAME, [c.ID, c.ACTUAL, c.PREDICTED],
              zip(map(spreadsheet_safe, ids), y_true.tolist(), y_pred.tolist()))
    as_probability = prob_of_score if score is not prob else (lambda values: values)
    fpr, tpr, roc_thr = skm.roc_curve(y_true, score)
    write_csv(folder / ROC_NAME, [c.FPR, c.TPR, c.THRESHOLD],
              zip(np.round(fpr, 6), np.round(tpr, 6), np.round(np.minimum(as_probability(roc_thr), 1.0), 6)))
    precision, recall, pr_thr = skm.precision_recall_curve(y_true, score)
    write_csv(folder / PR_NAME, [c.RECALL, c.PRECISION, c.THRESHOLD],
              zip(np.round(recall[:-1], 6), np.round(precision[:-1], 6), np.round(as_probability(pr_thr), 6)))

    m = scalar_metrics(y_true, prob, threshold, score)
    plot_confusion_matrix(folder / "confusion_matrix.png", y_true, y_pred,
                          f"Test set ({len(y_true)} images), threshold {threshold:.3f}"
                          + ("; 95 % interval in brackets\n" if ci else "\n") +
                          f"accuracy {format_interval(m[Metric.ACCURACY], ci.get(Metric.ACCURACY))}\n"
                          f"F1 {format_interval(m[Metric.F1], ci.get(Metric.F1))}, "
                          f"recall {format_interval(m[Metric.RECALL], ci.get(Metric.RECALL))}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    skm.RocCurveDisplay.from_predictions(y_true, score, ax=axes[0], name="test")
    skm.PrecisionRecallDisplay.from_predictions(y_true, score, ax=axes[1], name="test")
    axes[0].set_title(f"ROC, AUC {format_interval(m[Metric.ROC_AUC], ci.get(Metric.ROC_AUC))}", fontsize=10)
    axes[1].set_title(f"Precision-recall, AP {format_interval(m[Metric.PR_AUC], ci.get(Metric.PR_AUC))}", fontsize=10)
    if ci:
        fig.suptitle("test set; in brackets: 95 % bootstrap interval", fontsize=9, color="0.3")
    fig.tight_layout()
    fig.savefig(folder / "roc_pr.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def plot_confusion_matrix(path: Path, y_true: np.ndarray, y_pred: np.ndarray, title: str) -> None:
    """The confusion-matrix PNG of the evaluate stage and of `glomeruli predict` on a labelled folder."""
    fig, ax = plt.subplots(figsize=(5, 4.6))
    skm.ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=[0, 1], display_labels=["non-GS (0)", "GS (1)"],
                                                ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def write_reliability(folder: Path, labels: np.ndarray, probability: np.ndarray, raw_probability: np.ndarray,
                      report: dict) -> None:
    """reliability.csv (non-empty bins of `probability`, for `dvc plots`) and reliability.png (diagram + bin
    counts; `raw_probability`, the model's own, drawn faintly when `report`, evaluate.json's calibration,
    says it was calibrated)."""
    bins = reliability_bins(labels, probability)
    filled = [b for b in bins if b.count]
    write_csv(folder / "reliability.csv", ["bin_low", "bin_high", "count", "mean_probability", "fraction_positive"],
              [(f"{b.low:.2f}", f"{b.high:.2f}", b.count, f"{b.mean_probability:.6f}", f"{b.fraction_positive:.6f}")
               for b in filled])
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(5.2, 6.2), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    calibrated = report[Calibration.METHOD] != "none"
    if calibrated:  # what calibration changed: the model's own probabilities, faintly
        raw = [b for b in reliability_bins(labels, raw_probability) if b.count]
        ax.plot([b.mean_probability for b in raw], [b.fraction_positive for b in raw], "s--", color="0.6", ms=4,
                label=f"uncalibrated (ECE {report[Calibration.ECE_UNCALIBRATED]:.3f})")
    ax.plot([b.mean_probability for b in filled], [b.fraction_positive for b in filled], "o-", color="tab:blue",
            label="test set" + (", calibrated" if calibrated else ""))
    ax.set(ylabel="observed fraction globally sclerotic", xlim=(0, 1), ylim=(-0.02, 1.02))
    ece, brier = Calibration.ECE, Calibration.BRIER
    ax.set_title(f"Reliability ({report[Calibration.METHOD]}"
                 + (f", T={report[Calibration.TEMPERATURE]:.2f}" if calibrated else "") + ")\n"
                 f"ECE {format_interval(report[ece], report.get(interval_key(ece)), 3)}, "
                 f"Brier {format_interval(report[brier], report.get(interval_key(brier)), 3)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    bar.bar([(b.low + b.high) / 2 for b in bins], [b.count for b in bins], width=0.09, color="tab:grey")
    bar.set(xlabel="predicted probability (bin)", ylabel="images", yscale="log" if max(b.count for b in bins) > 50
            else "linear")
    fig.tight_layout()
    fig.savefig(folder / "reliability.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def _read_curve(live_dir: Path, split: str, metric: str) -> tuple[list[int], list[float]]:
    path = live_dir / "plots" / "metrics" / split / f"{metric}.tsv"
    if not path.is_file():
        return [], []
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [int(r["step"]) for r in rows], [float(r[metric]) for r in rows]


def plot_training_curves(phases: dict[str, Path], out_png: Path) -> None:
    """Loss and accuracy per epoch of both phases, fine-tuning continuing the frozen phase's x-axis."""
    fig = training_curves_figure(phases)
    fig.savefig(out_png, dpi=120, metadata={"Software": None})
    plt.close(fig)


def training_curves_figure(phases: dict[str, Path]):
    """The figure of plot_training_curves; a phase without epochs (finetune.epochs: 0) is named as such in the
    legend rather than listed with lines that are not there."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for phase, live_dir in phases.items():
        curves = {(metric, split): _read_curve(live_dir, split, metric)
                  for metric in ("loss", "accuracy") for split in ("train", "val")}
        n_steps = max(len(steps) for steps, _ in curves.values())
        for ax, metric in zip(axes, ("loss", "accuracy")):
            if n_steps == 0:
                ax.plot([], [], " ", label=f"{phase}: no epochs")
            for split, style in (("train", "-"), ("val", "--")):
                steps, values = curves[metric, split]
                if steps:
                    ax.plot([s + offset + 1 for s in steps], values, style, label=f"{phase} {split}")
            ax.set_xlabel("epoch")
            ax.set_title(metric)
        offset += n_steps
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_site_rocs(out_png: Path, labels: np.ndarray, score: np.ndarray, sites: np.ndarray, title: str) -> None:
    """One ROC curve per site and the pooled one: curves that part company show the site effect."""
    labels, score, sites = np.asarray(labels), np.asarray(score), np.asarray(sites)
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for site in sorted(set(sites.tolist())):
        members = sites == site
        if len(set(labels[members].tolist())) == 2:
            name = f"{site} (n={int(members.sum())}, GS {int(labels[members].sum())})"
            skm.RocCurveDisplay.from_predictions(labels[members], score[members], ax=ax, name=name)
        else:
            ax.plot([], [], " ", label=f"{site}: one class only (n={int(members.sum())}), no curve")
    if len(set(labels.tolist())) == 2:
        skm.RocCurveDisplay.from_predictions(labels, score, ax=ax, name="pooled",
                                             curve_kwargs={"color": "black", "linestyle": "--"})
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120, metadata={"Software": None})
    plt.close(fig)


def plot_burden(rows: list[BiopsyBurden], cutoff: float, out_png: Path, title: str) -> None:
    """Predicted vs true % per biopsy (point area = glomeruli), the diagonal and the cutoff lines; points
    in the shaded quadrants fall on the wrong side of the cutoff."""
    true = np.array([r.true_pct for r in rows])
    count = np.array([r.predicted_pct for r in rows])
    mean_prob = np.array([r.mean_probability_pct for r in rows])
    sizes = np.array([r.glomeruli for r in rows], dtype=np.float64)
    area = 30 + 400 * sizes / max(sizes.max(), 1)
    cutoff_pct = 100 * cutoff
    listed = len(rows) <= MAX_BIOPSIES_LISTED
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
