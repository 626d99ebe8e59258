"""Bootstrap intervals: whole biopsies resampled, seeded, and 95 % intervals that cover the true value
about 95 % of the time on data drawn from a known distribution."""

import numpy as np
import pytest

from glomeruli.evaluation.metrics import scalar_metrics
from glomeruli.evaluation.uncertainty import bootstrap_intervals, format_interval, resample_rows, resample_units, rows_of_units


def accuracy(y, p):
    return {"accuracy": float(np.mean((p >= 0.5) == y))}


def test_resamples_draw_whole_biopsies():
    groups = np.array(["b", "a", "b", "c", "a", "b"])
    unit, unit_of = resample_units(groups)
    assert unit == "biopsy" and unit_of.tolist() == [1, 0, 1, 2, 0, 1]
    units = rows_of_units(unit_of)
    rows = resample_rows(units, np.random.default_rng(3))
    drawn = [g for g in groups[rows]]
    for g in set(drawn):  # every drawn biopsy comes with all its images, as often as it was drawn
        assert drawn.count(g) % int((groups == g).sum()) == 0
    assert sum(drawn.count(g) // int((groups == g).sum()) for g in set(drawn)) == 3  # 3 biopsies drawn
    assert resample_units(np.array(["x", "y", "z"]))[0] == "image"  # no shared groups: images


def test_intervals_are_seeded_and_bracket_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 120), 0, 1)
    groups = np.repeat(np.arange(12), 10)
    first = bootstrap_intervals(y, p, groups, lambda a, b: scalar_metrics(a, b, 0.5), n_resamples=100, seed=7)
    again = bootstrap_intervals(y, p, groups, lambda a, b: scalar_metrics(a, b, 0.5), n_resamples=100, seed=7)
    assert first == again
    point = scalar_metrics(y, p, 0.5)
    assert set(first) == set(point)
    for name, interval in first.items():
        assert interval.low <= point[name] <= interval.high, name
    assert format_interval(0.5, first["accuracy"]).startswith("0.50 (")


def test_95_percent_intervals_cover_the_truth_about_95_percent_of_the_time():
    """600 simulated test sets of 40 biopsies (10 images each; each biopsy's own accuracy drawn around 0.8,
    so images of one biopsy are correlated). True accuracy 0.8: the biopsy bootstrap's interval should
    cover it in about 95 % of the sets (percentile intervals run slightly narrow at this size)."""
    rng = np.random.default_rng(42)
    n_sets, n_biopsies, per_biopsy, truth = 600, 40, 10, 0.8
    groups = np.repeat(np.arange(n_biopsies), per_biopsy)
    covered = 0
    for s in range(n_sets):
        biopsy_accuracy = np.clip(rng.normal(truth, 0.1, n_biopsies), 0, 1)
        correct = rng.uniform(size=groups.size) < biopsy_accuracy[groups]
        y = np.ones(groups.size, int)
        p = np.where(correct, 0.9, 0.1)
        interval = bootstrap_intervals(y, p, groups, accuracy, n_resamples=200, seed=s)["accuracy"]
        covered += interval.low <= truth <= interval.high
    assert 0.90 <= covered / n_sets <= 0.985, covered / n_sets


def test_image_bootstrap_would_be_too_narrow_for_clustered_data():
    """Why whole biopsies: on the same clustered data, resampling single images covers far less often."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(20), 10)
    covered = {"biopsy": 0, "image": 0}
    for s in range(150):
        biopsy_accuracy = np.clip(rng.normal(0.8, 0.15, 20), 0, 1)
        y = np.ones(200, int)
        p = np.where(rng.uniform(size=200) < biopsy_accuracy[groups], 0.9, 0.1)
        for unit, g in (("biopsy", groups), ("image", np.arange(200))):
            interval = bootstrap_intervals(y, p, g, accuracy, n_resamples=150, seed=s)["accuracy"]
            covered[unit] += interval.low <= 0.8 <= interval.high
    assert covered["image"] < covered["biopsy"] - 10, covered  # measured: 119 vs 137 of 150


def test_undefined_resamples_are_left_out(caplog):
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.8, 0.9])
    groups = np.array(["a", "a", "b", "b"])  # a resample of one biopsy holds one class: no ROC-AUC
    intervals = bootstrap_intervals(y, p, groups, lambda a, b: scalar_metrics(a, b, 0.5), n_resamples=50, seed=0)
    assert intervals["roc_auc"].low == pytest.approx(1.0) and intervals["accuracy"].high == 1.0
    # Perfect predictions: resamples holding only biopsy "a" have no positive, so no recall, F1 or precision;
    # counted as 0 they would pull each interval's low end down to 0.
    for name in ("recall", "f1", "precision", "balanced_accuracy"):
        assert intervals[name].low == pytest.approx(1.0) and intervals[name].high == pytest.approx(1.0), name
