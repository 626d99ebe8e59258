"""The metrics users review, all from scikit-learn, their 95 % biopsy-bootstrap intervals, and the threshold rules
that choose the decision threshold on validation (with the check of what they rest on). No Keras and no plots:
`glomeruli cv-summary`, `predict` and `recalibrate` import this alone. The positive class is globally sclerotic (1).
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn import metrics as skm

from glomeruli.evaluation.calibration import calibration_metrics
from glomeruli.evaluation.outputs import NOT_SCALAR, Bootstrap, Metric
from glomeruli.evaluation.uncertainty import bootstrap_intervals, resample_rows, resample_units, rows_of_units

log = logging.getLogger(__name__)


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
        Metric.N: int(len(y_true)),
        Metric.ACCURACY: float(skm.accuracy_score(y_true, y_pred)),
        Metric.LOSS: float(skm.log_loss(y_true, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
        Metric.PRECISION: float(skm.precision_score(y_true, y_pred, zero_division=0)),
        Metric.RECALL: float(skm.recall_score(y_true, y_pred, zero_division=0)),
        Metric.F1: float(skm.f1_score(y_true, y_pred, zero_division=0)),
        Metric.ROC_AUC: float(skm.roc_auc_score(y_true, score)) if both_classes else float("nan"),
        Metric.PR_AUC: float(skm.average_precision_score(y_true, score)) if both_classes else float("nan"),
        Metric.BALANCED_ACCURACY: float(skm.balanced_accuracy_score(y_true, y_pred)),
        Metric.CONFUSION_MATRIX: {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def scalar_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float,
                   score: np.ndarray | None = None) -> dict[str, float]:
    """binary_metrics without the count and the confusion matrix: what gets an interval.

    A metric undefined on these rows is NaN, so the bootstrap leaves the resample out, instead of scikit-learn's
    zero_division 0, which would drag the interval's low end to 0 whenever a resample of biopsies holds no
    sclerotic glomerulus: recall, F1, ROC/PR-AUC and balanced accuracy need both classes, precision needs a
    predicted positive.
    """
    metrics = {k: v for k, v in binary_metrics(y_true, prob, threshold, score).items() if k not in NOT_SCALAR}
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        metrics.update(dict.fromkeys((Metric.RECALL, Metric.F1, Metric.ROC_AUC, Metric.PR_AUC,
                                      Metric.BALANCED_ACCURACY), float("nan")))
    if not (np.asarray(prob) >= threshold).any():
        metrics[Metric.PRECISION] = float("nan")
    return metrics


def metric_intervals(labels: np.ndarray, prob: np.ndarray, score: np.ndarray, biopsies: np.ndarray, threshold: float,
                     *, resamples: int, seed: int, what: str) -> tuple[dict, dict]:
    """95 % biopsy-bootstrap intervals of `scalar_metrics` and `calibration_metrics` at `threshold`, and what the
    bootstrap drew; ({}, {...}) when `resamples` is 0 or `what` (the set, for the log) holds one biopsy."""
    unit, unit_of = resample_units(biopsies)
    info = {Bootstrap.RESAMPLES: resamples, Bootstrap.LEVEL: 0.95, Bootstrap.UNIT: unit,
            Bootstrap.UNITS: int(unit_of.max()) + 1, Bootstrap.SEED: seed}
    if resamples == 0:
        return {}, info
    if info[Bootstrap.UNITS] < 2:
        log.warning("bootstrap: %s holds one %s only; no intervals", what, unit)
        return {}, info

    def statistic(y, prob_and_score):
        p, s = prob_and_score[:, 0], prob_and_score[:, 1]
        return {**scalar_metrics(y, p, threshold, s), **calibration_metrics(y, p)}

    return bootstrap_intervals(labels, np.column_stack([prob, score]), biopsies, statistic, n_resamples=resamples,
                               seed=seed), info


# ---------------------------------------------------------------- the decision threshold, chosen on validation

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


def bootstrap_threshold(y_true: np.ndarray, prob: np.ndarray, biopsies: np.ndarray, rule: str, *, resamples: int,
                        seed: int, fixed: float = 0.5) -> float:
    """Median of `rule`'s threshold over `resamples` bootstrap resamples of whole validation biopsies.

    A threshold from one small validation set follows its few borderline biopsies; the median over resamples
    follows what most subsets of them agree on. Resamples holding one class are skipped.
    """
    if rule == "fixed" or resamples == 0:
        return choose_threshold(y_true, prob, rule, fixed)
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    units = rows_of_units(resample_units(biopsies)[1])
    rng = np.random.default_rng([seed, 7])
    thresholds = []
    for _ in range(resamples):
        rows = resample_rows(units, rng)
        if len(set(y_true[rows].tolist())) == 2:
            thresholds.append(choose_threshold(y_true[rows], prob[rows], rule, fixed))
    if not thresholds:
        return choose_threshold(y_true, prob, rule, fixed)
    return float(np.median(thresholds))


# Below this many validation biopsies of a class the threshold and temperature rest on a few patients.
MIN_VAL_BIOPSIES_PER_CLASS = 3
EXTREME_THRESHOLD = (0.05, 0.95)


def thin_evidence(labels: np.ndarray, biopsies: np.ndarray, threshold: float) -> tuple[list[tuple[str, int]], bool]:
    """What a threshold and temperature fitted on (labels, biopsies) rest on too little of: the classes held by fewer
    than MIN_VAL_BIOPSIES_PER_CLASS biopsies, as (name, count), and whether the threshold lies at an extreme."""
    few = []
    for label, name in ((0, "non-sclerotic"), (1, "sclerotic")):
        n = len(set(np.asarray(biopsies)[np.asarray(labels) == label].tolist()))
        if n < MIN_VAL_BIOPSIES_PER_CLASS:
            few.append((name, n))
    return few, not EXTREME_THRESHOLD[0] <= threshold <= EXTREME_THRESHOLD[1]


def warn_about_validation(labels: np.ndarray, biopsies: np.ndarray, threshold: float) -> list[str]:
    """Warn (and return the warnings) when what was chosen on validation rests on too little."""
    warnings = []
    few, extreme = thin_evidence(labels, biopsies, threshold)
    for name, n in few:
        warnings.append(f"validation holds {name} glomeruli from {n} biopsies only (fewer than "
                        f"{MIN_VAL_BIOPSIES_PER_CLASS}): the threshold and temperature rest on too few patients; "
                        "raise split.val_fraction or add data")
    if extreme:
        warnings.append(f"the threshold {threshold:.3f} chosen on validation lies outside {EXTREME_THRESHOLD}: "
                        "validation is probably separated or tiny, and the threshold may not transfer to new "
                        "biopsies; check metrics/plots/roc_pr.png and consider evaluate.threshold_rule")
    for warning in warnings:
        log.warning(warning)
    return warnings
