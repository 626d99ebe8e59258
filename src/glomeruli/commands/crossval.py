"""`glomeruli cv-summary`: the K runs of grouped K-fold cross-validation (one per `split.fold`) summed up as
mean ± sd over folds of every test metric, and the metrics of the pooled out-of-fold test predictions.

Runs come from DVC experiments (`dvc exp run --queue -S split.fold=k`; read at their git revisions, since
the metrics and predictions are `cache: false` outputs kept in git) or from project folders.

`check_complete` refuses a set that does not cover every fold once. The pooled predictions also give a per-site
table and the gap between pooled and within-site ROC-AUC (`evaluation.sites`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glomeruli.evaluation.burden import biopsy_burden, burden_summary
from glomeruli.evaluation.calibration import calibration_metrics, logit
from glomeruli.core.csvcells import original_cell
from glomeruli.core.errors import UserError
from glomeruli.core.vcs import CommandError, git_show, run_dvc
from glomeruli.data.h5store import SINGLE_SITE
from glomeruli.evaluation.metrics import prediction_metrics
from glomeruli.evaluation.outputs import (EVALUATE_JSON, NOT_SCALAR, PREDICTION_REQUIRED_COLUMNS,
                                          PREDICTION_TEXT_COLUMNS, TEST_PREDICTIONS_CSV, Burden, Calibration,
                                          Metric, PredictionColumn, Report, Site)
from glomeruli.evaluation.sites import SITE_GAP_WARNING, site_gap, site_metrics

log = logging.getLogger(__name__)

SPLIT_JSON = "metrics/split.json"


class CrossValidationError(UserError, ValueError):
    """The runs given do not make one complete cross-validation."""


@dataclass(frozen=True)
class FoldRun:
    source: str  # experiment name and revision, or folder
    fold: int
    folds: int
    report: dict  # its metrics/evaluate.json
    predictions: list[dict]  # rows of its test_predictions.csv


def _parse_run(source: str, read: Callable[[str], str]) -> FoldRun:
    """One run from the text of its three files (`read(relative path) -> text`)."""
    try:
        split = json.loads(read(SPLIT_JSON))
        report = json.loads(read(EVALUATE_JSON))
        predictions = [{key: original_cell(value) if key in PREDICTION_TEXT_COLUMNS and value else value
                        for key, value in row.items()}
                       for row in csv.DictReader(io.StringIO(read(TEST_PREDICTIONS_CSV)))]
    except (OSError, CommandError, KeyError, ValueError) as err:
        raise CrossValidationError(f"{source}: cannot read its {SPLIT_JSON}, {EVALUATE_JSON} and "
                                   f"{TEST_PREDICTIONS_CSV} ({err}); was it run with this version of the pipeline?"
                                   ) from err
    missing = set(PREDICTION_REQUIRED_COLUMNS) - set(predictions[0] if predictions else ())
    if "fold" not in split or missing:
        raise CrossValidationError(f"{source}: written by an older pipeline (no split.fold or prediction columns "
                                   f"{sorted(missing)}); rerun it")
    return FoldRun(source, int(split["fold"]), int(split["folds"]), report, predictions)


def folder_run(folder: Path) -> FoldRun:
    """A project folder (or an experiment's copy) holding metrics/ from one fold's run."""
    folder = Path(folder)
    return _parse_run(str(folder), lambda rel: (folder / rel).read_text(encoding="utf-8"))


def experiment_revisions(repo: Path) -> list[tuple[str, str]]:
    """(name, commit) of every finished experiment on top of the current commit (`dvc exp show --json`)."""
    found = []
    for baseline in json.loads(run_dvc(["exp", "show", "--json", "--no-fetch"], repo) or "[]"):
        for experiment in baseline.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state", "success")  # no executor: ran in the workspace
            for rev in experiment.get("revs") or []:
                if state == "success" and rev.get("error") is None and rev.get("rev"):
                    found.append((rev.get("name") or rev["rev"][:7], rev["rev"]))
    return found


def experiment_runs(repo: Path, names: list[str] | None = None) -> list[FoldRun]:
    """The fold runs among the DVC experiments of `repo` (all of them, or those named)."""
    revisions = experiment_revisions(repo)
    if names:
        known = {name: rev for name, rev in revisions}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CrossValidationError(f"no finished experiment named {', '.join(unknown)} in {repo} "
                                       f"(`dvc exp show` lists {', '.join(sorted(known)) or 'none'})")
        revisions = [(n, known[n]) for n in names]
    if not revisions:
        raise CrossValidationError(f"no finished DVC experiments in {repo}: run every fold first "
                                   "(`dvc exp run --queue -S split.fold=K`, `dvc queue start -j 1`), or pass run folders")
    return [_parse_run(f"experiment {name} ({rev[:7]})", lambda rel, rev=rev: git_show(rev, rel, repo))
            for name, rev in revisions]


def check_complete(runs: list[FoldRun]) -> int:
    """Exactly one run per fold 0..K-1, one K, and no test image in two folds; returns K."""
    folds = {r.folds for r in runs}
    if len(folds) != 1:
        raise CrossValidationError(f"the runs use different split.folds ({sorted(folds)}); summarise one K at a time")
    k = folds.pop()
    by_fold: dict[int, list[str]] = {}
    for r in runs:
        by_fold.setdefault(r.fold, []).append(r.source)
    twice = {f: s for f, s in by_fold.items() if len(s) > 1}
    if twice:
        raise CrossValidationError("more than one run for fold(s) " + "; ".join(
            f"{f}: {', '.join(s)}" for f, s in sorted(twice.items())) + ": name the runs to use (cv-summary --exp "
            "NAME ...), or remove the extra ones (`dvc exp remove NAME`)")
    missing = sorted(set(range(k)) - set(by_fold))
    if missing:
        raise CrossValidationError(f"fold(s) {missing} of {k} have no run: `dvc exp run --queue -S split.fold=N` "
                                   "for each, then `dvc queue start -j 1`")
    seen: dict[str, int] = {}
    for r in runs:
        for row in r.predictions:
            name = row[PredictionColumn.NAME]
            if name in seen:
                raise CrossValidationError(f"{name} is a test image of folds {seen[name]} and {r.fold}: "
                                           "the runs do not share one split (same data, seed and split.group_by)")
            seen[name] = r.fold
    return k


def fold_metrics(report: dict) -> dict[str, float]:
    """The numbers of one run's evaluate.json that are averaged over folds."""
    calibration, burden = report[Report.CALIBRATION], report[Report.BURDEN]
    values = {k: v for k, v in report[Report.TEST].items() if k not in NOT_SCALAR}
    values.update({Calibration.BRIER: calibration[Calibration.BRIER], Calibration.ECE: calibration[Calibration.ECE]},
                  burden_mae_pct_points=burden[Burden.MAE_PCT_POINTS],
                  burden_wrong_side_of_cutoff=burden[Burden.WRONG_SIDE_OF_CUTOFF])
    return {k: float(v) if v is not None else float("nan") for k, v in values.items()}


def pooled_metrics(runs: list[FoldRun]) -> dict:
    """Metrics of every fold's test predictions together: each image predicted once, by the model that
    never saw it, at that model's threshold (calibrated probabilities when the runs calibrated)."""
    c = PredictionColumn
    rows = [row for r in runs for row in r.predictions]
    labels = np.array([int(row[c.LABEL]) for row in rows])
    prob = np.array([float(row.get(c.CALIBRATED_PROBABILITY) or row[c.PROBABILITY]) for row in rows])
    # ROC/PR-AUC rank the calibrated logit where evaluate wrote it: probabilities written to six decimals tie near 0 and 1
    score = (np.array([float(row[c.SCORE]) for row in rows]) if all(row.get(c.SCORE) for row in rows)
             else logit(prob))
    predicted = np.array([int(row[c.PREDICTED]) for row in rows])
    biopsies = np.array([row[c.BIOPSY] for row in rows], dtype=object)
    cutoffs = {r.report[Report.BURDEN][Burden.CUTOFF_PCT] for r in runs}
    if len(cutoffs) != 1:
        raise CrossValidationError(f"the runs use different evaluate.burden_cutoff ({sorted(cutoffs)})")
    cutoffs_pct = next(iter(cutoffs))
    pooled = prediction_metrics(labels, prob, predicted, score)
    pooled.update(calibration_metrics(labels, prob))
    burden = burden_summary(biopsy_burden(biopsies, prob, predicted, labels), cutoffs_pct / 100)
    pooled.update(burden_mae_pct_points=burden[Burden.MAE_PCT_POINTS],
                  burden_wrong_side_of_cutoff=burden[Burden.WRONG_SIDE_OF_CUTOFF],
                  burden_biopsies=burden[Burden.N_BIOPSIES])
    # runs written before sites were recorded hold one site
    sites = np.array([row.get(c.SITE) or SINGLE_SITE for row in rows], dtype=object)
    pooled["by_site"] = site_metrics(labels, prob, score, predicted, sites, biopsies, cutoffs_pct / 100)
    pooled["site_gap_roc_auc"] = site_gap(pooled[Metric.ROC_AUC], pooled["by_site"])
    return pooled


def summarize(runs: list[FoldRun]) -> dict:
    """Mean and sample standard deviation (ddof=1) over folds of every metric, and the pooled metrics."""
    k = check_complete(runs)
    runs = sorted(runs, key=lambda r: r.fold)
    per_fold = [fold_metrics(r.report) for r in runs]
    names = list(per_fold[0])
    table = {name: np.array([m[name] for m in per_fold]) for name in names}
    return {
        "folds": k,
        "runs": [{"fold": r.fold, "source": r.source, "test_images": len(r.predictions),
                  "threshold": r.report[Report.THRESHOLD]} for r in runs],
        "per_fold": {name: values.tolist() for name, values in table.items()},
        "mean": {name: float(np.nanmean(v)) if np.isfinite(v).any() else None for name, v in table.items()},
        "sd": {name: float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else None for name, v in table.items()},
        "pooled": pooled_metrics(runs),
    }


def format_summary(summary: dict) -> str:
    """A plain table: metric, mean ± sd over folds, pooled out-of-fold value."""
    lines = [f"{summary['folds']}-fold cross-validation ({sum(r['test_images'] for r in summary['runs'])} test images, "
             "each predicted once by the model that did not see it)",
             f"{'metric':<28}{'mean ± sd over folds':>24}{'pooled':>10}"]
    for name in summary["mean"]:
        mean, sd, pooled = summary["mean"][name], summary["sd"][name], summary["pooled"].get(name)
        spread = "n/a" if mean is None else f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"
        lines.append(f"{name:<28}{spread:>24}{'' if pooled is None else f'{pooled:.3f}':>10}")
    by_site = summary["pooled"].get("by_site") or {}
    if len(by_site) > 1:
        lines += ["", "pooled out-of-fold predictions by site (recall, specificity, F1 at each fold's threshold)",
                  f"{'site':<16}{'images':>7}{'GS':>6}{'ROC-AUC':>9}{'recall':>8}{'spec.':>7}{'F1':>7}{'burden pp':>11}"]
        number = (lambda v, width: f"{'n/a' if v is None else f'{v:.3f}':>{width}}")
        for site, m in by_site.items():
            lines.append(f"{site:<16}{m[Site.N]:>7}{m[Site.SCLEROTIC]:>6}{number(m[Site.ROC_AUC], 9)}"
                         f"{number(m[Site.RECALL], 8)}{number(m[Site.SPECIFICITY], 7)}{number(m[Site.F1], 7)}"
                         f"{m[Site.BURDEN_MAE_PCT_POINTS]:>11.1f}")
        gap = summary["pooled"].get("site_gap_roc_auc")
        if gap is not None:
            lines.append(f"pooled ROC-AUC minus mean within-site ROC-AUC: {gap:+.3f}")
            if gap > SITE_GAP_WARNING:
                lines.append(f"WARNING: the gap is above {SITE_GAP_WARNING}: part of what the model ranks is the site "
                             "(stain, prevalence), not the glomerulus; see README, 'Several hospitals'")
    return "\n".join(lines)
