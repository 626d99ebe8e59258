"""`glomeruli recalibrate`: a site with a few labelled biopsies of its own refits the temperature and the threshold
on them, by the rules the evaluate stage applies to validation, and writes new metadata beside the model with a
record of what was refitted on what (the model's own `model.meta.json` is never replaced). `glomeruli predict
--meta NEW` then predicts with it."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from glomeruli.core.atomic import check_file_output
from glomeruli.evaluation.calibration import (MIN_PER_CLASS, apply_temperature, calibration_metrics, fit_temperature,
                                   is_separated, ranking_score)
from glomeruli.core.errors import UserError
from glomeruli.evaluation.outputs import Bootstrap, Calibration, Metric
from glomeruli.model.metadata import CLASS_NAMES, ModelMetadata, metadata_path, read_metadata, write_metadata
from glomeruli.commands.predict import FolderLabels, Prediction, biopsy_ids, dataset_layout, folder_labels, predict_folder

log = logging.getLogger(__name__)
_FIRST_SHOWN = 5
THRESHOLD_RULES = ("max_f1", "youden", "fixed")
# What the metrics after recalibration are: said in the record and on the terminal, so nobody quotes them as a test.
IN_SAMPLE_NOTE = ("measured on the images the temperature and threshold were refitted on: optimistic; for an "
                  "unbiased estimate run `glomeruli predict --meta` on other labelled biopsies of the site")


class RecalibrationError(UserError, ValueError):
    """The folder cannot support a recalibration, or the output would replace what it must not."""


@dataclass(frozen=True)
class LabelledScores:
    """The labelled images of a folder: their names (paths inside it), labels (ingest's rule), biopsy ids
    (ingest.group_regex) and the model's raw probabilities (temperature 1: calibration fits their logit)."""

    names: np.ndarray
    labels: np.ndarray
    biopsies: np.ndarray
    raw_probability: np.ndarray


@dataclass(frozen=True)
class Recalibration:
    """Refitted temperature and threshold, what they were, and the metrics before and after (95 % biopsy-bootstrap
    intervals: {"low", "high"} per metric; {} when the bootstrap is off)."""

    temperature: float
    threshold: float
    threshold_rule: str
    threshold_resamples: int
    old_temperature: float
    old_threshold: float
    images: dict[str, int]    # class name -> labelled images
    biopsies: dict[str, int]  # class name -> biopsies holding images of that class
    n_biopsies: int
    before: dict              # the metadata as it was, on these images: honest (nothing was fitted on them)
    before_ci95: dict
    after: dict               # the refitted values, on the images they were fitted on: optimistic
    after_ci95: dict
    bootstrap: dict
    warnings: list[str]


def labelled_scores(predictions: list[Prediction], labels: FolderLabels, group_regex: str) -> LabelledScores:
    """The predictions ingest would label, with their labels and biopsy ids; the others are logged and left out."""
    label_of = {p.name: labels.label_of(p.name) for p in predictions}
    unlabelled = [name for name, label in label_of.items() if label is None]
    if unlabelled:
        log.warning("%d predicted image(s) left out of the recalibration, as ingest would leave them out of training: "
                    "%s", len(unlabelled),
                    "; ".join(f"{name} ({labels.why_unlabelled(name)})" for name in unlabelled[:_FIRST_SHOWN]))
    kept = [p for p in predictions if label_of[p.name] is not None]
    names = [p.name for p in kept]
    return LabelledScores(np.array(names, dtype=object), np.array([label_of[n] for n in names], dtype=int),
                          np.array(biopsy_ids(names, group_regex) if names else [], dtype=object),
                          np.array([p.probability for p in kept], dtype=np.float64))


def check_recalibration_set(labels: np.ndarray, biopsies: np.ndarray, source: str) -> None:
    """Refuse a set that cannot give a threshold: one class missing, or fewer than 2 biopsies."""
    for label, name in enumerate(CLASS_NAMES):
        if not np.any(np.asarray(labels) == label):
            raise RecalibrationError(f"{source} holds no labelled {name} image ({len(labels)} labelled in all): "
                                     "a threshold and a temperature need both classes; add biopsies with both")
    n = len(set(np.asarray(biopsies).tolist()))
    if n < 2:
        raise RecalibrationError(f"{source} holds images of {n} biopsy only (ids read from the file names by the "
                                 "model's ingest.group_regex): refitting on one patient fits that patient; add "
                                 "labelled biopsies (3 or more of each class)")


def refit_temperature(labels: np.ndarray, raw_probability: np.ndarray, old_temperature: float) -> float:
    """calibration.fit_temperature on the site's images; where they cannot support a fit (separated, or fewer than
    MIN_PER_CLASS of a class), the metadata's temperature is kept, with a warning: no evidence to change it."""
    counts = [int(np.sum(np.asarray(labels) == label)) for label in (0, 1)]
    if min(counts) < MIN_PER_CLASS or is_separated(labels, raw_probability):
        why = (f"fewer than {MIN_PER_CLASS} images of a class ({counts[0]} non-sclerotic, {counts[1]} sclerotic)"
               if min(counts) < MIN_PER_CLASS else "the classes are perfectly separated (no temperature fits them)")
        log.warning("temperature kept at the metadata's %.3f: %s; label more, harder biopsies to refit it",
                    old_temperature, why)
        return float(old_temperature)
    return fit_temperature(labels, raw_probability)


def _warn_about_set(labels: np.ndarray, biopsies: np.ndarray, threshold: float, source: str) -> list[str]:
    """Warn (and return the warnings) when the refitted values rest on too little; evaluate's limits."""
    from glomeruli.evaluation.metrics import EXTREME_THRESHOLD, MIN_VAL_BIOPSIES_PER_CLASS, thin_evidence

    warnings = []
    few, extreme = thin_evidence(labels, biopsies, threshold)
    for name, n in few:
        warnings.append(f"{source} holds {name} glomeruli from {n} biopsies only (fewer than "
                        f"{MIN_VAL_BIOPSIES_PER_CLASS}): the refitted threshold and temperature rest on too few "
                        "patients; label more biopsies")
    if extreme:
        warnings.append(f"the refitted threshold {threshold:.3f} lies outside {EXTREME_THRESHOLD}: {source} is "
                        "probably separated or tiny, and the threshold may not transfer to the site's next biopsies")
    for warning in warnings:
        log.warning(warning)
    return warnings


def _metrics(scores: LabelledScores, temperature: float, threshold: float, *, resamples: int, seed: int,
             source: str) -> tuple[dict, dict, dict]:
    """evaluate's metrics and calibration scores at `temperature` and `threshold`, their intervals and the bootstrap."""
    from glomeruli.evaluation.metrics import binary_metrics, metric_intervals

    prob = apply_temperature(scores.raw_probability, temperature)
    score = ranking_score(scores.raw_probability, temperature)
    metrics = {**binary_metrics(scores.labels, prob, threshold, score), **calibration_metrics(scores.labels, prob)}
    intervals, info = metric_intervals(scores.labels, prob, score, scores.biopsies, threshold, resamples=resamples,
                                       seed=seed, what=source)
    return metrics, {name: interval.to_json() for name, interval in intervals.items()}, info


def recalibrate_scores(scores: LabelledScores, *, old_temperature: float, old_threshold: float, rule: str,
                       threshold_resamples: int = 0, bootstrap_resamples: int = 1000, seed: int = 0,
                       source: str = "the labelled folder") -> Recalibration:
    """Temperature (refit_temperature) and threshold (metrics.bootstrap_threshold with `rule`, on the refitted
    probabilities, as evaluate chooses it on validation) refitted on `scores`, with the metrics before and after.
    `source` names the set in messages."""
    from glomeruli.evaluation.metrics import bootstrap_threshold

    if rule not in THRESHOLD_RULES:
        raise RecalibrationError(f"unknown threshold rule {rule!r}: use one of {', '.join(THRESHOLD_RULES)}")
    check_recalibration_set(scores.labels, scores.biopsies, source)
    temperature = refit_temperature(scores.labels, scores.raw_probability, old_temperature)
    prob = apply_temperature(scores.raw_probability, temperature)
    if rule == "fixed":
        log.warning("threshold rule 'fixed' (from the metadata): the threshold stays %.4f; pass --threshold-rule "
                    "max_f1 or youden to refit it", old_threshold)
    threshold = bootstrap_threshold(scores.labels, prob, scores.biopsies, rule, resamples=threshold_resamples,
                                    seed=seed, fixed=old_threshold)
    warnings = _warn_about_set(scores.labels, scores.biopsies, threshold, source)
    before, before_ci, _ = _metrics(scores, old_temperature, old_threshold, resamples=bootstrap_resamples, seed=seed,
                                    source=source)
    after, after_ci, info = _metrics(scores, temperature, threshold, resamples=bootstrap_resamples, seed=seed,
                                     source=source)
    labels, biopsies = np.asarray(scores.labels), np.asarray(scores.biopsies)
    return Recalibration(
        temperature=float(temperature), threshold=float(threshold), threshold_rule=rule,
        threshold_resamples=threshold_resamples, old_temperature=float(old_temperature),
        old_threshold=float(old_threshold),
        images={name: int(np.sum(labels == label)) for label, name in enumerate(CLASS_NAMES)},
        biopsies={name: len(set(biopsies[labels == label].tolist())) for label, name in enumerate(CLASS_NAMES)},
        n_biopsies=len(set(biopsies.tolist())), before=before, before_ci95=before_ci, after=after, after_ci95=after_ci,
        bootstrap=info, warnings=warnings)


def recalibrated_metadata(meta: ModelMetadata, result: Recalibration, *, folder: Path, source: Path,
                          date: datetime | None = None) -> ModelMetadata:
    """`meta` with the refitted temperature, threshold and rule, and the record of the recalibration."""
    date = datetime.now(timezone.utc) if date is None else date
    record = {"folder": str(folder), "date": date.isoformat(timespec="seconds"), "from_metadata": str(source),
              **asdict(result), "after_note": IN_SAMPLE_NOTE}
    if meta.recalibration is not None:  # `source` was itself recalibrated: keep its history
        record["previous"] = meta.recalibration
    return replace(meta, temperature=result.temperature, threshold=result.threshold,
                   threshold_rule=result.threshold_rule, recalibration=record)


def default_output(model_path: Path, folder: Path) -> Path:
    """Beside the model, named by the folder: models/model.keras and site_b/ give
    models/model.recalibrated-site_b.meta.json."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", folder.resolve().name).strip("_") or "folder"
    return model_path.with_name(f"{model_path.name.removesuffix('.keras')}.recalibrated-{slug}.meta.json")


def check_output(output: Path, model_path: Path, folder: Path) -> None:
    """Refuse, before any work, an output that is the model or its own metadata (or a folder)."""
    for protected, what in ((metadata_path(model_path), "the model's own metadata (the evaluate stage's)"),
                            (model_path, "the model file")):
        same = output.resolve() == protected.resolve() or (
            output.exists() and protected.exists() and output.samefile(protected))
        if same:
            raise RecalibrationError(f"{output} is {what}: recalibrate never replaces it; give another -o "
                                     f"(default: {default_output(model_path, folder)})")
    check_file_output(output)


def recalibrate_folder(model_path: Path, folder: Path, *, output: Path | None = None, threshold_rule: str | None = None,
                       threshold_resamples: int = 0, bootstrap_resamples: int = 1000, seed: int = 0,
                       batch_size: int = 32, workers: int = 0) -> tuple[Recalibration, Path]:
    """Predict the labelled images of `folder` (recursively, in the model's training layout), refit, and write
    the new metadata to `output` (default: `default_output`). Returns the result and where it went."""
    output = default_output(model_path, folder) if output is None else output
    check_output(output, model_path, folder)
    meta = read_metadata(model_path)
    layout = dataset_layout(model_path, meta)
    labels = folder_labels(folder, layout)
    if labels is None or not labels.scorable:
        raise RecalibrationError(
            f"{folder} holds no labelled image in the model's training layout: recalibrate needs images directly "
            f"inside the class folders {', '.join(f'{d}/' for d in sorted(layout.class_dirs))} (at its top or in one "
            "wrapper folder), as ingest reads them (class names from the model's metadata, dataset_layout)")
    # temperature 1: the model's own output, whose logit the temperature is fitted to
    predictions, _ = predict_folder(model_path, folder, batch_size=batch_size, workers=workers, recursive=True,
                                    ignore=frozenset({labels.csv_name} if labels.csv_name else ()),
                                    meta=replace(meta, temperature=1.0))
    scores = labelled_scores(predictions, labels, layout.group_regex)
    result = recalibrate_scores(scores, old_temperature=meta.temperature, old_threshold=meta.threshold,
                                rule=meta.threshold_rule if threshold_rule is None else threshold_rule,
                                threshold_resamples=threshold_resamples, bootstrap_resamples=bootstrap_resamples,
                                seed=seed, source=str(folder))
    if output.exists():
        log.warning("replacing %s (an earlier recalibration written there)", output)
    write_metadata(model_path, recalibrated_metadata(meta, result, folder=folder, source=metadata_path(model_path)),
                   output)
    return result, output


_SHOWN_METRICS = ((Metric.ACCURACY, "accuracy"), (Metric.BALANCED_ACCURACY, "balanced accuracy"),
                  (Metric.PRECISION, "precision"), (Metric.RECALL, "recall"), (Metric.F1, "F1"),
                  (Metric.ROC_AUC, "ROC AUC"), (Calibration.BRIER, "Brier"), (Calibration.ECE, "ECE"))


def format_recalibration(result: Recalibration) -> str:
    """The recalibration as a few lines for the terminal: counts, old -> new values, metrics before and after."""
    from glomeruli.evaluation.uncertainty import format_interval

    n0, n1 = (result.images[name] for name in CLASS_NAMES)
    b0, b1 = (result.biopsies[name] for name in CLASS_NAMES)
    lines = [f"recalibrated on {n0 + n1} labelled images ({n0} non-sclerotic from {b0} biopsies, {n1} sclerotic "
             f"from {b1}; {result.n_biopsies} biopsies):",
             f"  temperature {result.old_temperature:.3f} -> {result.temperature:.3f}   threshold "
             f"{result.old_threshold:.4f} -> {result.threshold:.4f} ({result.threshold_rule})",
             f"  {'':<18}  {'before (as shipped)':<22}  after (refitted here; optimistic)"]
    for key, name in _SHOWN_METRICS:
        before = format_interval(result.before[key], result.before_ci95.get(key), 3)
        after = format_interval(result.after[key], result.after_ci95.get(key), 3)
        lines.append(f"  {name:<18}  {before:<22}  {after}")
    if result.before_ci95:
        lines.append(f"  in brackets: 95 % interval, {result.bootstrap[Bootstrap.RESAMPLES]} resamples of "
                     f"{result.bootstrap[Bootstrap.UNITS]} {result.bootstrap[Bootstrap.UNIT]} units")
    lines.append(f"  after: {IN_SAMPLE_NOTE}")
    return "\n".join(lines)
