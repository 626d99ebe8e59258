"""Hand-written cross-validation fold runs: the files evaluate and split write, with known values."""

from __future__ import annotations

import json
from pathlib import Path

# Three fold runs by hand. Pooled rows (label, calibrated probability, predicted):
#   fold 0: a1 A (1, .9, 1), a2 A (0, .2, 0), b1 B (0, .7, 1)
#   fold 1: c1 C (1, .4, 0), c2 C (1, .8, 1), d1 D (0, .1, 0)
#   fold 2: e1 E (0, .3, 0), e2 E (1, .6, 1)
PREDICTIONS = {
    0: [("a1", "A", 1, 0.9, 1), ("a2", "A", 0, 0.2, 0), ("b1", "B", 0, 0.7, 1)],
    1: [("c1", "C", 1, 0.4, 0), ("c2", "C", 1, 0.8, 1), ("d1", "D", 0, 0.1, 0)],
    2: [("e1", "E", 0, 0.3, 0), ("e2", "E", 1, 0.6, 1)],
}
FOLD_F1, FOLD_ACCURACY, FOLD_ECE = (0.5, 0.7, 0.9), (0.6, 0.8, 0.7), (0.1, 0.2, 0.6)


def fold_files(fold: int, folds: int = 3) -> dict[str, str]:
    test = {"n": len(PREDICTIONS[fold]), "accuracy": FOLD_ACCURACY[fold], "loss": 0.4, "precision": 0.5,
            "recall": 0.5, "f1": FOLD_F1[fold], "roc_auc": 0.8, "pr_auc": 0.7, "balanced_accuracy": 0.6,
            "confusion_matrix": {"tn": 1, "fp": 0, "fn": 1, "tp": 1}}
    report = {"threshold": 0.5, "test": test, "calibration": {"brier": 0.2, "ece": FOLD_ECE[fold]},
              "burden": {"cutoff_pct": 20.0, "mae_pct_points": 10.0 * fold, "wrong_side_of_cutoff": fold}}
    lines = ["name,biopsy,label,probability,calibrated_probability,predicted"]
    # raw probabilities differ from the calibrated ones: pooling must use the calibrated
    lines += [f"{n},{b},{y},0.5,{p},{d}" for n, b, y, p, d in PREDICTIONS[fold]]
    return {"metrics/split.json": json.dumps({"fold": fold, "folds": folds, "group_by": "biopsy"}),
            "metrics/evaluate.json": json.dumps(report),
            "metrics/plots/test_predictions.csv": "\n".join(lines) + "\n"}


def write_run(folder: Path, fold: int, folds: int = 3) -> Path:
    for rel, text in fold_files(fold, folds).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder
