"""Results per site (hospital, scanner, series): a model that learnt the site shows a pooled ROC-AUC above
every within-site one, and recall or specificity that collapse at one site at a threshold chosen on a mix.

The site comes from the file name (`ingest.site_regex`; every image is at site "all" without it), travels in the
manifest and the image store (`sites`), and `split.group_by: site` holds one site out per fold. `site_metrics`
gives the evaluate stage its `by_site` results and cv-summary its pooled per-site table; `site_gap` is the gap
between the pooled and the mean within-site ROC-AUC (above `SITE_GAP_WARNING`, the model may recognise the site).
Their picture is `plots.plot_site_rocs`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from glomeruli.evaluation.burden import biopsy_burden, burden_summary
from glomeruli.evaluation.metrics import prediction_metrics
from glomeruli.evaluation.outputs import Burden, Metric, Site

# Pooled ROC-AUC this far above the mean within-site ROC-AUC: the model may be recognising the site.
SITE_GAP_WARNING = 0.05


def site_metrics(labels: np.ndarray, prob: np.ndarray, score: np.ndarray, predicted: np.ndarray, sites: np.ndarray,
                 biopsies: np.ndarray, burden_cutoff: float) -> dict[str, dict]:
    """For each site (sorted): images, sclerotic count, ROC-AUC (of `score`), recall, specificity and F1 of
    `predicted` (probability >= threshold; pooled folds: each fold's own), and the per-biopsy burden error.
    None where a site lacks a class (JSON has no NaN)."""
    labels, prob, score, predicted = np.asarray(labels), np.asarray(prob), np.asarray(score), np.asarray(predicted)
    sites, biopsies = np.asarray(sites), np.asarray(biopsies)
    out = {}
    for site in sorted(set(sites.tolist())):
        members = sites == site
        y, p, called = labels[members], prob[members], predicted[members].astype(int)
        with warnings.catch_warnings():  # a site holding one class: its undefined metrics are None below
            warnings.simplefilter("ignore", UserWarning)
            m = prediction_metrics(y, p, called, score[members])
        cm = m[Metric.CONFUSION_MATRIX]
        negatives = cm["tn"] + cm["fp"]
        burden = burden_summary(biopsy_burden(biopsies[members], p, called, y), burden_cutoff)
        out[str(site)] = {
            Site.N: int(members.sum()), Site.SCLEROTIC: int(y.sum()), Site.ROC_AUC: m[Metric.ROC_AUC],
            Site.RECALL: m[Metric.RECALL] if y.sum() else math.nan,
            Site.SPECIFICITY: cm["tn"] / negatives if negatives else math.nan,
            Site.F1: m[Metric.F1] if y.sum() else math.nan,
            Site.BURDEN_MAE_PCT_POINTS: burden[Burden.MAE_PCT_POINTS], Site.BIOPSIES: burden[Burden.N_BIOPSIES]}
        out[str(site)] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out[str(site)].items()}
    return out


def site_gap(pooled_roc_auc: float, by_site: dict[str, dict]) -> float | None:
    """Pooled ROC-AUC minus the mean within-site ROC-AUC (None with fewer than two sites that have both classes)."""
    within = [s[Site.ROC_AUC] for s in by_site.values()
              if s[Site.ROC_AUC] is not None and math.isfinite(s[Site.ROC_AUC])]
    return None if len(within) < 2 else float(pooled_roc_auc - np.mean(within))

