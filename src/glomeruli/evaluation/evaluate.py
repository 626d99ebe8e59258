"""Evaluate stage: calibration and threshold chosen on validation; on test every metric with its 95 %
interval, calibration, per-biopsy burden, error and Grad-CAM sheets, curves and plots for review."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import matplotlib

matplotlib.use("Agg")  # no display on training boxes and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from glomeruli.core.atomic import atomic_path, write_json  # noqa: E402
from glomeruli.evaluation.burden import biopsy_burden, burden_summary, plot_burden, write_burden_csv  # noqa: E402
from glomeruli.evaluation.calibration import (N_BINS, apply_temperature, calibration_metrics, fit_temperature,  # noqa: E402
                                   ranking_score, reliability_bins)
from glomeruli.core.csvcells import spreadsheet_safe  # noqa: E402
from glomeruli.evaluation.gallery import write_error_sheets  # noqa: E402
from glomeruli.data.h5store import SINGLE_SITE, ImageStore  # noqa: E402
from glomeruli.model.inference import StoreRows, predict_rows  # noqa: E402
from glomeruli.evaluation.metrics import (binary_metrics, plot_confusion_matrix, prediction_metrics,  # noqa: E402, F401 (re-exported)
                               scalar_metrics)
from glomeruli.model.metadata import CLASS_NAMES, DatasetLayout, ModelMetadata, file_sha256, write_metadata  # noqa: E402
from glomeruli.model.efficientnet import load_model  # noqa: E402
from glomeruli.core.params import EvaluateParams  # noqa: E402
from glomeruli.evaluation.sites import SITE_GAP_WARNING, plot_site_rocs, site_gap, site_metrics  # noqa: E402
from glomeruli.data.split import read_split  # noqa: E402
from glomeruli.data.stain import stored_normalization  # noqa: E402
from glomeruli.evaluation.uncertainty import bootstrap_intervals, format_interval, resample_units  # noqa: E402

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


def bootstrap_threshold(y_true: np.ndarray, prob: np.ndarray, biopsies: np.ndarray, rule: str, *, resamples: int,
                        seed: int, fixed: float = 0.5) -> float:
    """Median of `rule`'s threshold over `resamples` bootstrap resamples of whole validation biopsies.

    A threshold from one small validation set follows its few borderline biopsies; the median over resamples
    follows what most subsets of them agree on. Resamples holding one class are skipped.
    """
    from glomeruli.evaluation.uncertainty import resample_rows, resample_units, rows_of_units

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


def prob_of_score(score: np.ndarray) -> np.ndarray:
    """The calibrated probability of a `ranking_score` (a calibrated logit); +inf (roc_curve's first) gives 1."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(score, dtype=np.float64)))


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


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_plots(folder: Path, ids: np.ndarray, y_true: np.ndarray, prob: np.ndarray, threshold: float,
                ci: dict | None = None, score: np.ndarray | None = None) -> None:
    """CSV data for `dvc plots` (confusion, ROC, PR) and PNG renderings of the same; `ci` (metric ->
    {"low", "high"}) puts the 95 % intervals into the titles. The curves rank by `score` (default `prob`;
    see `calibration.ranking_score`); their threshold columns stay probabilities."""
    ci = ci or {}
    score = prob if score is None else np.asarray(score)
    folder.mkdir(parents=True, exist_ok=True)
    y_pred = (prob >= threshold).astype(int)
    _write_csv(folder / "confusion.csv", ["id", "actual", "predicted"],
               zip(map(spreadsheet_safe, ids), y_true.tolist(), y_pred.tolist()))
    as_probability = prob_of_score if score is not prob else (lambda values: values)
    fpr, tpr, roc_thr = skm.roc_curve(y_true, score)
    _write_csv(folder / "roc.csv", ["fpr", "tpr", "threshold"],
               zip(np.round(fpr, 6), np.round(tpr, 6), np.round(np.minimum(as_probability(roc_thr), 1.0), 6)))
    precision, recall, pr_thr = skm.precision_recall_curve(y_true, score)
    _write_csv(folder / "precision_recall.csv", ["recall", "precision", "threshold"],
               zip(np.round(recall[:-1], 6), np.round(precision[:-1], 6), np.round(as_probability(pr_thr), 6)))

    m = scalar_metrics(y_true, prob, threshold, score)
    plot_confusion_matrix(folder / "confusion_matrix.png", y_true, y_pred,
                          f"Test set ({len(y_true)} images), threshold {threshold:.3f}"
                          + ("; 95 % interval in brackets\n" if ci else "\n") +
                          f"accuracy {format_interval(m['accuracy'], ci.get('accuracy'))}\n"
                          f"F1 {format_interval(m['f1'], ci.get('f1'))}, "
                          f"recall {format_interval(m['recall'], ci.get('recall'))}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    skm.RocCurveDisplay.from_predictions(y_true, score, ax=axes[0], name="test")
    skm.PrecisionRecallDisplay.from_predictions(y_true, score, ax=axes[1], name="test")
    axes[0].set_title(f"ROC, AUC {format_interval(m['roc_auc'], ci.get('roc_auc'))}", fontsize=10)
    axes[1].set_title(f"Precision-recall, AP {format_interval(m['pr_auc'], ci.get('pr_auc'))}", fontsize=10)
    if ci:
        fig.suptitle("test set; in brackets: 95 % bootstrap interval", fontsize=9, color="0.3")
    fig.tight_layout()
    fig.savefig(folder / "roc_pr.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


@dataclass(frozen=True)
class TestSet:
    """The test images' identity, labels and probabilities (calibrated when calibration is on)."""

    rows: np.ndarray  # rows of the augmented store
    ids: np.ndarray
    biopsies: np.ndarray
    labels: np.ndarray
    raw_probability: np.ndarray  # the model's output
    probability: np.ndarray  # after temperature scaling (the same when calibration is none)
    score: np.ndarray  # calibrated logit: ranks as the model does, without saturation ties (ROC/PR-AUC)
    sites: np.ndarray | None = None  # None: one site

    def __post_init__(self) -> None:
        if self.sites is None:
            object.__setattr__(self, "sites", np.full(len(self.rows), SINGLE_SITE, dtype=object))

    @property
    def names(self) -> np.ndarray:
        return np.array([PurePosixPath(i).name for i in self.ids], dtype=object)


def write_test_predictions(path: Path, test: TestSet, threshold: float, calibrated: bool) -> None:
    """`name,biopsy,site,label,probability[,calibrated_probability],score,predicted`: what `glomeruli cv-summary`
    pools (`score`, the calibrated logit, is what its ROC/PR-AUC rank: six decimals of a probability near 0 or 1
    would tie)."""
    header = ["name", "biopsy", "site", "label", "probability"] + (["calibrated_probability"] if calibrated else [])
    rows = []
    for i in range(len(test.rows)):
        row = [*map(spreadsheet_safe, (test.names[i], test.biopsies[i], test.sites[i])), int(test.labels[i]),
               f"{test.raw_probability[i]:.6f}"]
        if calibrated:
            row.append(f"{test.probability[i]:.6f}")
        rows.append(row + [f"{test.score[i]:.6f}", int(test.probability[i] >= threshold)])
    _write_csv(path, header + ["score", "predicted"], rows)


def _calibration_report(params: EvaluateParams, temperature: float, test: TestSet, intervals: dict) -> dict:
    report = {"method": params.calibration, "temperature": temperature, "fitted_on": "validation",
              "bins": N_BINS, **calibration_metrics(test.labels, test.probability)}
    if params.calibration != "none":
        uncalibrated = calibration_metrics(test.labels, test.raw_probability)
        report.update(brier_uncalibrated=uncalibrated["brier"], ece_uncalibrated=uncalibrated["ece"])
    for name in ("brier", "ece"):
        if name in intervals:
            report[f"{name}_ci95"] = intervals[name].to_json()
    return report


def write_reliability(folder: Path, test: TestSet, report: dict) -> None:
    """reliability.csv (non-empty bins, for `dvc plots`) and reliability.png (diagram + bin counts)."""
    bins = reliability_bins(test.labels, test.probability)
    filled = [b for b in bins if b.count]
    _write_csv(folder / "reliability.csv", ["bin_low", "bin_high", "count", "mean_probability", "fraction_positive"],
               [(f"{b.low:.2f}", f"{b.high:.2f}", b.count, f"{b.mean_probability:.6f}", f"{b.fraction_positive:.6f}")
                for b in filled])
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(5.2, 6.2), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    if report["method"] != "none":  # what calibration changed: the model's own probabilities, faintly
        raw = [b for b in reliability_bins(test.labels, test.raw_probability) if b.count]
        ax.plot([b.mean_probability for b in raw], [b.fraction_positive for b in raw], "s--", color="0.6", ms=4,
                label=f"uncalibrated (ECE {report['ece_uncalibrated']:.3f})")
    ax.plot([b.mean_probability for b in filled], [b.fraction_positive for b in filled], "o-", color="tab:blue",
            label="test set" + (", calibrated" if report["method"] != "none" else ""))
    ax.set(ylabel="observed fraction globally sclerotic", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.set_title(f"Reliability ({report['method']}" + (f", T={report['temperature']:.2f}" if report["method"] != "none"
                                                       else "") + ")\n"
                 f"ECE {format_interval(report['ece'], report.get('ece_ci95'), 3)}, "
                 f"Brier {format_interval(report['brier'], report.get('brier_ci95'), 3)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    bar.bar([(b.low + b.high) / 2 for b in bins], [b.count for b in bins], width=0.09, color="tab:grey")
    bar.set(xlabel="predicted probability (bin)", ylabel="images", yscale="log" if max(b.count for b in bins) > 50
            else "linear")
    fig.tight_layout()
    fig.savefig(folder / "reliability.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def _bootstrap(params: EvaluateParams, test: TestSet, threshold: float, seed: int) -> tuple[dict, dict]:
    """Intervals of every test metric and of the calibration scores; ({}, {...}) when switched off."""
    return metric_intervals(test.labels, test.probability, test.score, test.biopsies, threshold,
                            resamples=params.bootstrap_resamples, seed=seed, what="the test set")


def metric_intervals(labels: np.ndarray, prob: np.ndarray, score: np.ndarray, biopsies: np.ndarray, threshold: float,
                     *, resamples: int, seed: int, what: str) -> tuple[dict, dict]:
    """95 % biopsy-bootstrap intervals of `scalar_metrics` and `calibration_metrics` at `threshold`, and what the
    bootstrap drew; ({}, {...}) when `resamples` is 0 or `what` (the set, for the log) holds one biopsy."""
    unit, unit_of = resample_units(biopsies)
    info = {"resamples": resamples, "level": 0.95, "unit": unit, "units": int(unit_of.max()) + 1, "seed": seed}
    if resamples == 0:
        return {}, info
    if info["units"] < 2:
        log.warning("bootstrap: %s holds one %s only; no intervals", what, unit)
        return {}, info

    def statistic(y, prob_and_score):
        p, s = prob_and_score[:, 0], prob_and_score[:, 1]
        return {**scalar_metrics(y, p, threshold, s), **calibration_metrics(y, p)}

    return bootstrap_intervals(labels, np.column_stack([prob, score]), biopsies, statistic, n_resamples=resamples,
                               seed=seed), info


def evaluate_model(model_path: Path, store_path: Path, split_path: Path, params: EvaluateParams, *,
                   max_pixels: int, dataset_layout: DatasetLayout, metrics_path: Path, plots_dir: Path,
                   curves: dict[str, Path], seed: int = 0) -> dict:
    """Calibration and threshold on validation; metrics, intervals, calibration, per-biopsy burden and
    error sheets on test; writes the metrics JSON, plots and the model's metadata (`dataset_layout`, the
    ingest settings, travels in it so predict reads a labelled folder as ingest read the training data)."""
    model = load_model(model_path)
    with ImageStore(store_path) as store:
        split = read_split(split_path, len(store.meta))
        raw = {p: predict_rows(model, StoreRows(store, split.rows(p)), params.batch_size).reshape(-1)
               for p in ("val", "test")}
        labels = {p: store.meta.labels[split.rows(p)] for p in ("val", "test")}
        test_ids, test_biopsies = store.meta.ids[split.test], store.meta.groups[split.test]
        val_biopsies, test_sites = store.meta.groups[split.val], store.meta.sites[split.test]
        image_size, fill = store.image_size, tuple(int(c) for c in store.attrs["fill"])
        stain = stored_normalization(store.attrs.get("stain_normalization"))  # preprocess's, for predict to apply
    temperature = fit_temperature(labels["val"], raw["val"]) if params.calibration == "temperature" else 1.0
    prob = {p: apply_temperature(raw[p], temperature) for p in raw}
    if params.calibration == "temperature":
        log.info("temperature %.3f fitted on %d validation images", temperature, len(labels["val"]))
    threshold = bootstrap_threshold(labels["val"], prob["val"], val_biopsies, params.threshold_rule,
                                    resamples=params.threshold_resamples, seed=seed, fixed=params.fixed_threshold)
    log.info("threshold %.4f chosen on %d validation images (%s%s)", threshold, len(labels["val"]), params.threshold_rule,
             f", median over {params.threshold_resamples} biopsy resamples" if params.threshold_resamples else "")
    validation_warnings = warn_about_validation(labels["val"], val_biopsies, threshold)
    test = TestSet(split.test, test_ids, test_biopsies, labels["test"], raw["test"], prob["test"],
                   ranking_score(raw["test"], temperature), test_sites)

    intervals, bootstrap_info = _bootstrap(params, test, threshold, seed)
    metrics = binary_metrics(test.labels, test.probability, threshold, test.score)
    burden_rows = biopsy_burden(test.biopsies, test.probability, test.probability >= threshold, test.labels)
    calibration = _calibration_report(params, temperature, test, intervals)
    report = {"threshold": threshold, "threshold_rule": params.threshold_rule,
              "threshold_resamples": params.threshold_resamples, "test": metrics,
              "test_ci95": {k: intervals[k].to_json() for k in metrics if k in intervals},
              "bootstrap": bootstrap_info, "calibration": calibration,
              "burden": {**burden_summary(burden_rows, params.burden_cutoff), "per_biopsy": "metrics/plots/burden.csv"},
              "val": binary_metrics(labels["val"], prob["val"], threshold, ranking_score(raw["val"], temperature)),
              "warnings": validation_warnings,
              "by_site": site_metrics(test.labels, test.probability, test.score, test.probability >= threshold,
                                      test.sites, test.biopsies,
                                      params.burden_cutoff)}
    report["site_gap_roc_auc"] = site_gap(metrics["roc_auc"], report["by_site"])
    if report["site_gap_roc_auc"] is not None and report["site_gap_roc_auc"] > SITE_GAP_WARNING:
        warning = (f"pooled test ROC-AUC {metrics['roc_auc']:.3f} is {report['site_gap_roc_auc']:.3f} above the mean "
                   "within-site ROC-AUC: the model may be recognising the site rather than the glomerulus (see "
                   "metrics/plots/by_site.png and README, 'Several hospitals')")
        log.warning(warning)
        report["warnings"].append(warning)
    log.info("test: %s", {k: v for k, v in metrics.items() if k != "confusion_matrix"})
    with atomic_path(plots_dir) as tmp:
        write_plots(tmp, test_ids, test.labels, test.probability, threshold, report["test_ci95"], test.score)
        write_test_predictions(tmp / "test_predictions.csv", test, threshold, params.calibration != "none")
        write_reliability(tmp, test, calibration)
        write_burden_csv(tmp / "burden.csv", burden_rows)
        b = report["burden"]
        plot_burden(burden_rows, params.burden_cutoff, tmp / "burden.png",
                    f"Per-biopsy burden, {b['n_biopsies']} test biopsies\nMAE {b['mae_pct_points']:.1f} pp, "
                    f"{b['wrong_side_of_cutoff']} on the wrong side of {b['cutoff_pct']:g} %")
        report["gradcam_focus"] = write_error_sheets(
            tmp, model, store_path, test, threshold, max_tiles=params.max_error_tiles,
            per_class=params.gradcam_examples, batch_size=params.batch_size, focus_images=params.gradcam_focus_images)
        plot_training_curves(curves, tmp / "training_curves.png")
        plot_site_rocs(tmp / "by_site.png", test.labels, test.score, test.sites,
                       f"ROC by site (test); pooled minus mean within-site AUC: "
                       + ("n/a" if report["site_gap_roc_auc"] is None else f"{report['site_gap_roc_auc']:+.3f}"))
    write_json(metrics_path, report)
    write_metadata(model_path, ModelMetadata(image_size=image_size, fill=fill, threshold=threshold,
                                             threshold_rule=params.threshold_rule, class_names=CLASS_NAMES,
                                             model_sha256=file_sha256(model_path), max_pixels=max_pixels,
                                             temperature=temperature, dataset_layout=dataset_layout,
                                             stain_normalization=stain))
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
