"""Evaluate stage: calibration and threshold chosen on validation; on test every metric with its 95 %
interval, calibration, per-biopsy burden, error and Grad-CAM sheets, curves and plots for review.

The stage body only: the numbers come from `metrics` (and the threshold rules), `calibration`, `burden` and
`sites`, the pictures from `plots` and `gallery`; the names it writes are `outputs`'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from glomeruli.core.atomic import atomic_path, write_json
from glomeruli.core.csvcells import spreadsheet_safe, write_csv
from glomeruli.core.params import EvaluateParams
from glomeruli.data.h5store import SINGLE_SITE, ImageStore
from glomeruli.data.split import read_split
from glomeruli.data.stain import stored_normalization
from glomeruli.evaluation.burden import biopsy_burden, burden_summary, write_burden_csv
from glomeruli.evaluation.calibration import (N_BINS, apply_temperature, calibration_metrics, fit_temperature,
                                              ranking_score)
from glomeruli.evaluation.gallery import write_error_sheets
from glomeruli.evaluation.metrics import binary_metrics, bootstrap_threshold, metric_intervals, warn_about_validation
from glomeruli.evaluation.outputs import (BURDEN_CSV, BURDEN_NAME, TEST_PREDICTIONS_NAME, Burden, Calibration,
                                          Metric, Report, interval_key, prediction_columns)
from glomeruli.evaluation.plots import (plot_burden, plot_site_rocs, plot_training_curves, write_confusion_roc_pr,
                                        write_reliability)
from glomeruli.evaluation.sites import SITE_GAP_WARNING, site_gap, site_metrics
from glomeruli.model.efficientnet import load_model
from glomeruli.model.inference import StoreRows, predict_rows
from glomeruli.model.metadata import CLASS_NAMES, DatasetLayout, ModelMetadata, file_sha256, write_metadata

log = logging.getLogger(__name__)


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
    """`outputs.prediction_columns`, one row per test image: what `glomeruli cv-summary` pools (`score`, the
    calibrated logit, is what its ROC/PR-AUC rank: six decimals of a probability near 0 or 1 would tie)."""
    rows = []
    for i in range(len(test.rows)):
        row = [*map(spreadsheet_safe, (test.names[i], test.biopsies[i], test.sites[i])), int(test.labels[i]),
               f"{test.raw_probability[i]:.6f}"]
        if calibrated:
            row.append(f"{test.probability[i]:.6f}")
        rows.append(row + [f"{test.score[i]:.6f}", int(test.probability[i] >= threshold)])
    write_csv(path, prediction_columns(calibrated), rows)


def _calibration_report(params: EvaluateParams, temperature: float, test: TestSet, intervals: dict) -> dict:
    report = {Calibration.METHOD: params.calibration, Calibration.TEMPERATURE: temperature,
              Calibration.FITTED_ON: "validation", Calibration.BINS: N_BINS,
              **calibration_metrics(test.labels, test.probability)}
    if params.calibration != "none":
        uncalibrated = calibration_metrics(test.labels, test.raw_probability)
        report.update({Calibration.BRIER_UNCALIBRATED: uncalibrated[Calibration.BRIER],
                       Calibration.ECE_UNCALIBRATED: uncalibrated[Calibration.ECE]})
    for name in (Calibration.BRIER, Calibration.ECE):
        if name in intervals:
            report[interval_key(name)] = intervals[name].to_json()
    return report


def _site_warning(report: dict) -> str | None:
    """The warning when the pooled ROC-AUC stands well above the within-site ones (None when it does not)."""
    gap = report[Report.SITE_GAP_ROC_AUC]
    if gap is None or gap <= SITE_GAP_WARNING:
        return None
    return (f"pooled test ROC-AUC {report[Report.TEST][Metric.ROC_AUC]:.3f} is {gap:.3f} above the mean "
            "within-site ROC-AUC: the model may be recognising the site rather than the glomerulus (see "
            "metrics/plots/by_site.png and README, 'Several hospitals')")


def _write_pictures_and_tables(folder: Path, test: TestSet, threshold: float, report: dict, burden_rows: list,
                               params: EvaluateParams, curves: dict[str, Path]) -> None:
    """Everything under metrics/plots but the error sheets: the CSV data `dvc plots` reads and the PNGs."""
    write_confusion_roc_pr(folder, test.ids, test.labels, test.probability, threshold, report[Report.TEST_CI95],
                           test.score)
    write_test_predictions(folder / TEST_PREDICTIONS_NAME, test, threshold, params.calibration != "none")
    write_reliability(folder, test.labels, test.probability, test.raw_probability, report[Report.CALIBRATION])
    write_burden_csv(folder / BURDEN_NAME, burden_rows)
    b = report[Report.BURDEN]
    plot_burden(burden_rows, params.burden_cutoff, folder / "burden.png",
                f"Per-biopsy burden, {b[Burden.N_BIOPSIES]} test biopsies\nMAE {b[Burden.MAE_PCT_POINTS]:.1f} pp, "
                f"{b[Burden.WRONG_SIDE_OF_CUTOFF]} on the wrong side of {b[Burden.CUTOFF_PCT]:g} %")
    plot_training_curves(curves, folder / "training_curves.png")
    gap = report[Report.SITE_GAP_ROC_AUC]
    plot_site_rocs(folder / "by_site.png", test.labels, test.score, test.sites,
                   "ROC by site (test); pooled minus mean within-site AUC: "
                   + ("n/a" if gap is None else f"{gap:+.3f}"))


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

    intervals, bootstrap_info = metric_intervals(test.labels, test.probability, test.score, test.biopsies, threshold,
                                                 resamples=params.bootstrap_resamples, seed=seed, what="the test set")
    metrics = binary_metrics(test.labels, test.probability, threshold, test.score)
    burden_rows = biopsy_burden(test.biopsies, test.probability, test.probability >= threshold, test.labels)
    report = {Report.THRESHOLD: threshold, Report.THRESHOLD_RULE: params.threshold_rule,
              Report.THRESHOLD_RESAMPLES: params.threshold_resamples, Report.TEST: metrics,
              Report.TEST_CI95: {k: intervals[k].to_json() for k in metrics if k in intervals},
              Report.BOOTSTRAP: bootstrap_info,
              Report.CALIBRATION: _calibration_report(params, temperature, test, intervals),
              Report.BURDEN: {**burden_summary(burden_rows, params.burden_cutoff), Burden.PER_BIOPSY: BURDEN_CSV},
              Report.VAL: binary_metrics(labels["val"], prob["val"], threshold, ranking_score(raw["val"], temperature)),
              Report.WARNINGS: validation_warnings,
              Report.BY_SITE: site_metrics(test.labels, test.probability, test.score, test.probability >= threshold,
                                           test.sites, test.biopsies, params.burden_cutoff)}
    report[Report.SITE_GAP_ROC_AUC] = site_gap(metrics[Metric.ROC_AUC], report[Report.BY_SITE])
    if warning := _site_warning(report):
        log.warning(warning)
        report[Report.WARNINGS].append(warning)
    log.info("test: %s", {k: v for k, v in metrics.items() if k != Metric.CONFUSION_MATRIX})
    with atomic_path(plots_dir) as tmp:
        _write_pictures_and_tables(tmp, test, threshold, report, burden_rows, params, curves)
        report[Report.GRADCAM_FOCUS] = write_error_sheets(
            tmp, model, store_path, test, threshold, max_tiles=params.max_error_tiles,
            per_class=params.gradcam_examples, batch_size=params.batch_size, focus_images=params.gradcam_focus_images)
    write_json(metrics_path, report)
    write_metadata(model_path, ModelMetadata(image_size=image_size, fill=fill, threshold=threshold,
                                             threshold_rule=params.threshold_rule, class_names=CLASS_NAMES,
                                             model_sha256=file_sha256(model_path), max_pixels=max_pixels,
                                             temperature=temperature, dataset_layout=dataset_layout,
                                             stain_normalization=stain))
    return report
