"""Evaluate stage: threshold chosen on validation, every metric on test, curves and plots for review."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training boxes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from glomeruli.atomic import atomic_path, write_json  # noqa: E402
from glomeruli.h5store import ImageStore  # noqa: E402
from glomeruli.inference import StoreRows, predict_rows  # noqa: E402
from glomeruli.metadata import CLASS_NAMES, ModelMetadata, file_sha256, write_metadata  # noqa: E402
from glomeruli.model import load_model  # noqa: E402
from glomeruli.params import EvaluateParams  # noqa: E402
from glomeruli.split import read_split  # noqa: E402

log = logging.getLogger(__name__)


def choose_threshold(y_true: np.ndarray, prob: np.ndarray, rule: str, fixed: float = 0.5) -> float:
    """Decision threshold from VALIDATION data only (choosing it on test would inflate the results).

    max_f1 / youden: of the thresholds that maximise the score, the one centred (in logit space) in the gap of
    validation scores around them, so a small, well-separated validation set does not push the
    threshold right against its lowest positive score.
    """
    if rule == "fixed":
        return float(fixed)
    if rule not in ("max_f1", "youden"):
        raise ValueError(f"unknown threshold rule {rule!r} (evaluate.threshold_rule): use max_f1, youden or fixed")
    fpr, tpr, thresholds = skm.roc_curve(y_true, prob, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first threshold is +inf: predicts nothing
    if rule == "youden":
        score = tpr - fpr
    else:
        n_pos, n_neg = int(np.sum(y_true == 1)), int(np.sum(y_true == 0))
        tp, fp = tpr * n_pos, fpr * n_neg
        score = 2 * tp / np.maximum(2 * tp + fp + (n_pos - tp), 1e-12)
    best = np.flatnonzero(score >= score.max() - 1e-12)
    # thresholds descend: the optimal run that reaches the lowest optimal threshold, and the score below it
    lowest = best[-1]
    run_top = lowest
    while run_top - 1 >= 0 and score[run_top - 1] >= score.max() - 1e-12:
        run_top -= 1
    below = prob[prob < thresholds[lowest]]
    if not len(below):
        return float(thresholds[lowest])
    # centre in logit space: saturated probabilities (0.999 vs 0.99999) are far apart there
    edges = np.clip([float(below.max()), min(float(thresholds[run_top]), 1.0)], 1e-7, 1 - 1e-7)
    centre = float(np.mean(np.log(edges / (1 - edges))))
    return float(1 / (1 + np.exp(-centre)))


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    """Every metric users review, from scikit-learn; the positive class is globally sclerotic (1)."""
    y_pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "loss": float(skm.log_loss(y_true, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, prob)) if both_classes else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, prob)) if both_classes else float("nan"),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def plot_confusion_matrix(path: Path, y_true: np.ndarray, y_pred: np.ndarray, title: str) -> None:
    """The confusion-matrix PNG of the evaluate stage and of `glomeruli predict` on a labelled folder."""
    fig, ax = plt.subplots(figsize=(5, 4.6))
    skm.ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=[0, 1], display_labels=["non-GS (0)", "GS (1)"],
                                                ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def write_plots(folder: Path, ids: np.ndarray, y_true: np.ndarray, prob: np.ndarray, threshold: float) -> None:
    """CSV data for `dvc plots` (confusion, ROC, PR) and PNG renderings of the same."""
    folder.mkdir(parents=True, exist_ok=True)
    y_pred = (prob >= threshold).astype(int)
    _write_csv(folder / "confusion.csv", ["id", "actual", "predicted"], zip(ids, y_true.tolist(), y_pred.tolist()))
    fpr, tpr, roc_thr = skm.roc_curve(y_true, prob)
    _write_csv(folder / "roc.csv", ["fpr", "tpr", "threshold"],
               zip(np.round(fpr, 6), np.round(tpr, 6), np.round(np.minimum(roc_thr, 1.0), 6)))
    precision, recall, pr_thr = skm.precision_recall_curve(y_true, prob)
    _write_csv(folder / "precision_recall.csv", ["recall", "precision", "threshold"],
               zip(np.round(recall[:-1], 6), np.round(precision[:-1], 6), np.round(pr_thr, 6)))

    plot_confusion_matrix(folder / "confusion_matrix.png", y_true, y_pred, f"Test set, threshold {threshold:.3f}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    skm.RocCurveDisplay.from_predictions(y_true, prob, ax=axes[0], name="test")
    skm.PrecisionRecallDisplay.from_predictions(y_true, prob, ax=axes[1], name="test")
    axes[0].set_title("ROC")
    axes[1].set_title("Precision-recall")
    fig.tight_layout()
    fig.savefig(folder / "roc_pr.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def evaluate_model(model_path: Path, store_path: Path, split_path: Path, params: EvaluateParams, *,
                   max_pixels: int, metrics_path: Path, plots_dir: Path, curves: dict[str, Path]) -> dict:
    """Threshold on validation, metrics on test; writes metrics JSON, plots and the model's metadata."""
    model = load_model(model_path)
    with ImageStore(store_path) as store:
        split = read_split(split_path, len(store.meta))
        prob = {p: predict_rows(model, StoreRows(store, split.rows(p)), params.batch_size).reshape(-1)
                for p in ("val", "test")}
        labels = {p: store.meta.labels[split.rows(p)] for p in ("val", "test")}
        test_ids = store.meta.ids[split.test]
        image_size, fill = store.image_size, tuple(int(c) for c in store.attrs["fill"])
    threshold = choose_threshold(labels["val"], prob["val"], params.threshold_rule, params.fixed_threshold)
    log.info("threshold %.4f chosen on %d validation images (%s)", threshold, len(labels["val"]), params.threshold_rule)
    report = {"threshold": threshold, "threshold_rule": params.threshold_rule,
              "test": binary_metrics(labels["test"], prob["test"], threshold),
              "val": binary_metrics(labels["val"], prob["val"], threshold)}
    log.info("test: %s", {k: v for k, v in report["test"].items() if k != "confusion_matrix"})
    with atomic_path(plots_dir) as tmp:
        write_plots(tmp, test_ids, labels["test"], prob["test"], threshold)
        plot_training_curves(curves, tmp / "training_curves.png")
    write_json(metrics_path, report)
    write_metadata(model_path, ModelMetadata(image_size=image_size, fill=fill, threshold=threshold,
                                             threshold_rule=params.threshold_rule, class_names=CLASS_NAMES,
                                             model_sha256=file_sha256(model_path), max_pixels=max_pixels))
    return report


def _read_curve(live_dir: Path, split: str, metric: str) -> tuple[list[int], list[float]]:
    path = live_dir / "plots" / "metrics" / split / f"{metric}.tsv"
    if not path.is_file():
        return [], []
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [int(r["step"]) for r in rows], [float(r[metric]) for r in rows]


def plot_training_curves(phases: dict[str, Path], out_png: Path) -> None:
    """Loss and accuracy per epoch of both phases, fine-tuning continuing the frozen phase's x-axis."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for phase, live_dir in phases.items():
        n_steps = 0
        for ax, metric in zip(axes, ("loss", "accuracy")):
            for split, style in (("train", "-"), ("val", "--")):
                steps, values = _read_curve(live_dir, split, metric)
                ax.plot([s + offset + 1 for s in steps], values, style, label=f"{phase} {split}")
                n_steps = max(n_steps, len(steps))
            ax.set_xlabel("epoch")
            ax.set_title(metric)
        offset += n_steps
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120, metadata={"Software": None})
    plt.close(fig)
