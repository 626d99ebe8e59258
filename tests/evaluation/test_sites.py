"""Per-site results against values counted by hand."""

import math

import numpy as np
import pytest

from glomeruli.evaluation.sites import site_gap, site_metrics


def test_site_metrics_by_hand():
    # Site A: 6 images in biopsies a1 (3) and a2 (3); site B: 4 images in biopsy b1, all non-sclerotic.
    sites = np.array(["A"] * 6 + ["B"] * 4)
    biopsies = np.array(["a1", "a1", "a1", "a2", "a2", "a2", "b1", "b1", "b1", "b1"])
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.6, 0.1, 0.4, 0.8, 0.2, 0.7, 0.1, 0.2, 0.3])
    result = site_metrics(labels, prob, prob, prob >= 0.5, sites, biopsies, burden_cutoff=0.2)
    a, b = result["A"], result["B"]
    # A at 0.5: predicted [1,1,0,0,1,0]; TP 2 (0.9, 0.8), FN 1 (0.4), FP 1 (0.6), TN 2
    assert a["n"] == 6 and a["sclerotic"] == 3 and a["biopsies"] == 2
    assert a["recall"] == pytest.approx(2 / 3) and a["specificity"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # ROC-AUC of A: positive scores 0.9, 0.4, 0.8 vs negatives 0.6, 0.1, 0.2: pairs won 3 + 2 + 3 = 8 of 9
    assert a["roc_auc"] == pytest.approx(8 / 9)
    # burden: a1 true 1/3, predicted 2/3 -> 33.3 pp; a2 true 2/3, predicted 1/3 -> 33.3 pp
    assert a["burden_mae_pct_points"] == pytest.approx(100 / 3)
    # B has no sclerotic glomerulus: no AUC, recall or F1; specificity 3 of 4; burden predicted 25 % vs 0
    assert b["roc_auc"] is None and b["recall"] is None and b["f1"] is None
    assert b["specificity"] == pytest.approx(0.75) and b["burden_mae_pct_points"] == pytest.approx(25.0)


def test_site_gap_is_pooled_minus_mean_within():
    by_site = {"A": {"roc_auc": 0.8}, "B": {"roc_auc": 0.7}, "C": {"roc_auc": None}}
    assert site_gap(0.9, by_site) == pytest.approx(0.15)
    assert site_gap(0.9, {"A": {"roc_auc": 0.8}}) is None


def test_a_model_that_learnt_the_site_shows_a_gap():
    # Within each site the score is useless (random), but site B has both more positives and higher scores.
    rng = np.random.default_rng(0)
    sites = np.array(["A"] * 200 + ["B"] * 200)
    labels = np.concatenate([rng.uniform(size=200) < 0.05, rng.uniform(size=200) < 0.5]).astype(int)
    score = np.concatenate([rng.normal(0, 1, 200), rng.normal(3, 1, 200)])
    result = site_metrics(labels, 1 / (1 + np.exp(-score)), score, score >= 0, sites, np.arange(400).astype(str), 0.2)
    from sklearn.metrics import roc_auc_score

    gap = site_gap(roc_auc_score(labels, score), result)
    assert all(abs(result[s]["roc_auc"] - 0.5) < 0.15 for s in "AB") and gap > 0.2 and not math.isnan(gap)
