"""Metrics and threshold rules: the threshold from validation only, every metric from scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from glomeruli.evaluation.metrics import binary_metrics, bootstrap_threshold, choose_threshold, warn_about_validation


def test_max_f1_threshold_is_centred_between_classes():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.01, 0.2, 0.3, 0.9998, 0.99999])
    t = choose_threshold(y, p, "max_f1")
    assert 0.3 < t < 0.9998
    assert ((p >= t) == y.astype(bool)).all()


def test_rules_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 300), 0, 1)
    for rule, score in (("max_f1", lambda t: skm.f1_score(y, p >= t)),
                        ("youden", lambda t: skm.recall_score(y, p >= t) - (1 - skm.recall_score(1 - y, p < t)))):
        t = choose_threshold(y, p, rule)
        best = max(score(c) for c in np.unique(p))
        assert score(t) == pytest.approx(best), rule
    assert choose_threshold(y, p, "fixed", 0.42) == 0.42
    with pytest.raises(ValueError, match="evaluate.threshold_rule"):
        choose_threshold(y, p, "best")


def test_binary_metrics_by_hand_and_confusion_adds_up():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2, 0.8, 0.3])
    m = binary_metrics(y, p, 0.5)
    assert m["accuracy"] == pytest.approx(0.75) and m["n"] == 8
    # Positives .7 .4 .9 .8, negatives .1 .6 .2 .3: a positive scores above a negative in 15 of the 16 pairs.
    assert m["roc_auc"] == pytest.approx(15 / 16)
    # Ranked .9 .8 .7 (.6) .4: precision 1, 1, 1 and 4/5 at the four positives.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 1 + 4 / 5) / 4)
    # Cross-entropy: -log p for positives, -log(1 - p) for negatives (.9 .4 .8 .7), the same four values twice.
    assert m["loss"] == pytest.approx(-np.log([0.7, 0.4, 0.9, 0.8]).mean())
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert sum(m["confusion_matrix"].values()) == m["n"]


def test_validation_warnings_name_the_class_and_the_extreme_threshold(caplog):
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    biopsies = np.array(["a", "b", "c", "c", "a", "a", "b"])  # non-sclerotic in 3 biopsies, sclerotic in 2
    warnings = warn_about_validation(labels, biopsies, 0.5)
    assert len(warnings) == 1 and "sclerotic glomeruli from 2 biopsies" in warnings[0]
    assert warn_about_validation(np.array([0, 0, 0, 1, 1, 1]), np.array(list("abcdef")), 0.5) == []
    extreme = warn_about_validation(np.array([0, 0, 0, 1, 1, 1]), np.array(list("abcdef")), 0.97)
    assert len(extreme) == 1 and "0.970" in extreme[0]


def test_bootstrap_threshold_is_the_median_over_biopsy_resamples():
    # Biopsy A: positives at .9, negatives at .1; biopsy B: a positive at .35 and a negative at .3; biopsy C clean.
    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.35, 0.3, 0.8, 0.2])
    biopsies = np.array(["A", "A", "B", "B", "C", "C"])
    plain = choose_threshold(y, p, "max_f1")
    assert bootstrap_threshold(y, p, biopsies, "max_f1", resamples=0, seed=1) == plain
    assert bootstrap_threshold(y, p, biopsies, "fixed", resamples=50, seed=1, fixed=0.4) == 0.4
    smoothed = bootstrap_threshold(y, p, biopsies, "max_f1", resamples=200, seed=1)
    assert smoothed == bootstrap_threshold(y, p, biopsies, "max_f1", resamples=200, seed=1)  # seeded
    # Resamples without B centre the threshold between .2 and .8 (about .5); with B it lies between .3 and .35:
    # about 30 % of resamples lack B ((2/3)^3), so the median is a with-B threshold.
    assert 0.3 < plain < 0.35 and 0.3 < smoothed < 0.35
    without_b = bootstrap_threshold(y[[0, 1, 4, 5]], p[[0, 1, 4, 5]], biopsies[[0, 1, 4, 5]], "max_f1",
                                    resamples=100, seed=1)
    assert 0.2 < without_b < 0.8
