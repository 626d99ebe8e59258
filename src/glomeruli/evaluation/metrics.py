"""Test-set metrics users review, all from scikit-learn (no Keras: `glomeruli cv-summary` and the bootstrap
import this alone); the positive class is globally sclerotic (1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics as skm


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float, score: np.ndarray | None = None) -> dict:
    """Every metric users review, from scikit-learn; the positive class is globally sclerotic (1).

    `score` (default `prob`) is what ROC-AUC and PR-AUC rank: an order-keeping score such as
    `calibration.ranking_score`, where calibrated probabilities could tie by saturating at 0 or 1.
    """
    return prediction_metrics(y_true, prob, (np.asarray(prob) >= threshold).astype(int), score)


def prediction_metrics(y_true: np.ndarray, prob: np.ndarray, y_pred: np.ndarray, score: np.ndarray | None = None) -> dict:
    """binary_metrics from given predicted labels (pooled out-of-fold predictions of models that each
    had their own threshold)."""
    score = prob if score is None else score
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "loss": float(skm.log_loss(y_true, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, score)) if both_classes else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, score)) if both_classes else float("nan"),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def scalar_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float,
                   score: np.ndarray | None = None) -> dict[str, float]:
    """binary_metrics without the count and the confusion matrix: what gets an interval.

    A metric undefined on these rows is NaN, so the bootstrap leaves the resample out, instead of scikit-learn's
    zero_division 0, which would drag the interval's low end to 0 whenever a resample of biopsies holds no
    sclerotic glomerulus: recall, F1, ROC/PR-AUC and balanced accuracy need both classes, precision needs a
    predicted positive.
    """
    metrics = {k: v for k, v in binary_metrics(y_true, prob, threshold, score).items() if k not in ("n", "confusion_matrix")}
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        metrics.update(dict.fromkeys(("recall", "f1", "roc_auc", "pr_auc", "balanced_accuracy"), float("nan")))
    if not (np.asarray(prob) >= threshold).any():
        metrics["precision"] = float("nan")
    return metrics


def plot_confusion_matrix(path: Path, y_true: np.ndarray, y_pred: np.ndarray, title: str) -> None:
    """The confusion-matrix PNG of the evaluate stage and of `glomeruli predict` on a labelled folder."""
    import matplotlib  # late: plain prediction (the ONNX environment) draws nothing and may not have it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6))
    skm.ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=[0, 1], display_labels=["non-GS (0)", "GS (1)"],
                                                ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
