"""Results per site (hospital, scanner, series): a model that learnt the site shows a pooled ROC-AUC above
every within-site one, and recall or specificity that collapse at one site at a threshold chosen on a mix.

The site comes from the file name (`ingest.site_regex`; every image is at site "all" without it), travels in the
manifest and the image store (`sites`), and `split.group_by: site` holds one site out per fold. `site_metrics`
gives the evaluate stage its `by_site` results and cv-summary its pooled per-site table; `site_gap` is the gap
between the pooled and the mean within-site ROC-AUC (above `SITE_GAP_WARNING`, the model may recognise the site).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from glomeruli.evaluation.burden import biopsy_burden, burden_summary
from glomeruli.evaluation.metrics import prediction_metrics

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
        cm = m["confusion_matrix"]
        negatives = cm["tn"] + cm["fp"]
        burden = burden_summary(biopsy_burden(biopsies[members], p, called, y), burden_cutoff)
        out[str(site)] = {
            "n": int(members.sum()), "sclerotic": int(y.sum()), "roc_auc": m["roc_auc"],
            "recall": m["recall"] if y.sum() else math.nan,
            "specificity": cm["tn"] / negatives if negatives else math.nan,
            "f1": m["f1"] if y.sum() else math.nan,
            "burden_mae_pct_points": burden["mae_pct_points"], "biopsies": burden["n_biopsies"]}
        out[str(site)] = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out[str(site)].items()}
    return out


def site_gap(pooled_roc_auc: float, by_site: dict[str, dict]) -> float | None:
    """Pooled ROC-AUC minus the mean within-site ROC-AUC (None with fewer than two sites that have both classes)."""
    within = [s["roc_auc"] for s in by_site.values() if s["roc_auc"] is not None and math.isfinite(s["roc_auc"])]
    return None if len(within) < 2 else float(pooled_roc_auc - np.mean(within))


def plot_site_rocs(out_png: Path, labels: np.ndarray, score: np.ndarray, sites: np.ndarray, title: str) -> None:
    """One ROC curve per site and the pooled one: curves that part company show the site effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    labels, score, sites = np.asarray(labels), np.asarray(score), np.asarray(sites)
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for site in sorted(set(sites.tolist())):
        members = sites == site
        if len(set(labels[members].tolist())) == 2:
            RocCurveDisplay.from_predictions(labels[members], score[members], ax=ax,
                                             name=f"{site} (n={int(members.sum())}, GS {int(labels[members].sum())})")
        else:
            ax.plot([], [], " ", label=f"{site}: one class only (n={int(members.sum())}), no curve")
    if len(set(labels.tolist())) == 2:
        RocCurveDisplay.from_predictions(labels, score, ax=ax, name="pooled",
                                         curve_kwargs={"color": "black", "linestyle": "--"})
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120, metadata={"Software": None})
    plt.close(fig)
