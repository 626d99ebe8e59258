#!/usr/bin/env python
"""Stain and sites (issue 20): leave-one-site-out on the multi-site synthetic set, colour augmentation off/on x
stain normalisation none/macenko/reinhard, and the threshold rules compared on the held-out sites.

    .venv/bin/python bench/stain_sites.py                      # the bench/RESULTS.md table (~35 min on 2 cores)
    .venv/bin/python bench/stain_sites.py --n-images 180 --epochs 2 --configs none:off   # a quick look

The set: `glomeruli sample-data --sites 3` (each site its own stain vectors, intensity, blur, background and
share of sclerotic glomeruli, so site and label are correlated; the class is decided by structure alone).
Ingested with ingest.site_regex, preprocessed (with the stain normalisation under test), augmented (colour jitter
off, or COLOUR_ON below) and split with `split.group_by: site` by the package's own functions; every other setting
is the committed params.yaml's. Each held-out site is one fold: trained from scratch (the README's offline recipe at CPU size),
temperature and threshold fitted on validation (whole biopsies of the training sites) as evaluate does, scored
on the held-out site. A row pools the three held-out sites: ROC-AUC of the calibrated logit, recall, F1 and the
per-biopsy burden error at each fold's own validation threshold, each with a 95 % interval that resamples whole
biopsies; "within" is the mean within-site ROC-AUC.

The threshold rules are compared on the same saved predictions (no retraining): for every fold and rule, recall
and F1 on the held-out site against the best F1 any threshold reaches there. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from _common import ROOT, log, machine, shipped_params  # first: puts src/ on sys.path

from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402

from glomeruli.data.augment import augment_store  # noqa: E402
from glomeruli.model.backend import configure  # noqa: E402
from glomeruli.evaluation.burden import biopsy_burden, burden_summary  # noqa: E402
from glomeruli.evaluation.calibration import apply_temperature, fit_temperature, ranking_score  # noqa: E402
from glomeruli.evaluation.metrics import bootstrap_threshold, choose_threshold  # noqa: E402
from glomeruli.data.h5store import ImageStore  # noqa: E402
from glomeruli.model.inference import StoreRows, predict_rows  # noqa: E402
from glomeruli.data.ingest import IngestConfig, ingest_dataset  # noqa: E402
from glomeruli.data.layout import SYNTHETIC_SITE_REGEX  # noqa: E402
from glomeruli.model.efficientnet import build_model  # noqa: E402
from glomeruli.core.params import parse_params  # noqa: E402
from glomeruli.data.preprocess import preprocess_images  # noqa: E402
from glomeruli.data.sample_data import generate_sample_dataset  # noqa: E402
from glomeruli.data.split import split_records  # noqa: E402
from glomeruli.data.stain import stain_normalization  # noqa: E402
from glomeruli.model.training import finetune, load_phase_data, train_frozen  # noqa: E402
from glomeruli.evaluation.uncertainty import bootstrap_intervals  # noqa: E402
from glomeruli.model.recipes import FROM_SCRATCH_OVERRIDES as SCRATCH  # noqa: E402

RESAMPLES = 1000
# "on": Tellez et al. 2019 "HED-light" stain jitter with light colour jitter (the values params.yaml suggests).
COLOUR_ON = {"hed_scale": 0.05, "hed_shift": 0.05, "brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.02}
# Threshold rules on validation: (name, probabilities it reads, rule, bootstrap resamples)
RULES = (
    ("max F1, raw probability", "raw", "max_f1", 0),
    ("max F1, calibrated", "cal", "max_f1", 0),
    ("Youden, calibrated", "cal", "youden", 0),
    ("bootstrap median of max F1 (200 biopsy resamples), calibrated", "cal", "max_f1", 200),
    ("bootstrap median of Youden (200 biopsy resamples), calibrated", "cal", "youden", 200),
    ("fixed 0.5 after calibration", "cal", "fixed", 0),
)


def bench_params(args):
    """params.yaml as committed, at CPU bench size; split by site."""
    raw = shipped_params()
    raw["preprocess"]["image_size"] = args.size
    raw["model"]["weights"] = "none"
    raw["runtime"].update(workers=1, memory_budget_gb=2)
    raw["split"].update(group_by="site", folds=args.sites, fold=0, val_fraction=0.25)
    raw["train_frozen"].update(epochs=SCRATCH["train_frozen.epochs"], lr=SCRATCH["train_frozen.lr"],
                               patience=SCRATCH["train_frozen.patience"], batch_size=32)
    raw["finetune"].update(unfreeze_blocks=SCRATCH["finetune.unfreeze_blocks"], lr=SCRATCH["finetune.lr"],
                           lr_schedule=SCRATCH["finetune.lr_schedule"], warmup_epochs=0, epochs=args.epochs,
                           patience=args.epochs, batch_size=32, online_augment=False)
    return parse_params(raw)


def colour(augment, on: bool):
    return replace(augment, **{k: (v if on else 0.0) for k, v in COLOUR_ON.items()})


def fold_predictions(params, augmented: Path, fold: int, seed: int) -> dict:
    """Train fold `fold` (its site held out) from scratch; raw validation and test probabilities."""
    configure(seed, "float32", "auto")
    model = build_model(params.preprocess.image_size, "none", params.model.dropout)
    with ImageStore(augmented) as store:
        split = split_records(store.meta, replace(params.split, fold=fold), params.seed)
        train_frozen(model, load_phase_data(store, split, 2.0), params.train_frozen, params.runtime,
                     seed=seed, callbacks=[])
        finetune(model, load_phase_data(store, split, 2.0), params.finetune, params.runtime, seed=seed,
                 callbacks=[], from_scratch=True, augment=None)
        meta = store.meta
        out = {}
        for part in ("val", "test"):
            rows = split.rows(part)
            out[part] = {"y": meta.labels[rows].tolist(),
                         "prob": predict_rows(model, StoreRows(store, rows), 64).ravel().tolist(),
                         "biopsy": np.asarray(meta.groups)[rows].tolist(),
                         "site": np.asarray(meta.sites)[rows].tolist()}
    return out


def threshold_of(val: dict, rule: tuple, seed: int) -> tuple[float, float]:
    """(temperature, threshold) fitted on validation under `rule`."""
    _, space, name, resamples = rule
    y, prob, biopsies = np.asarray(val["y"]), np.asarray(val["prob"]), np.asarray(val["biopsy"])
    temperature = fit_temperature(y, prob) if space == "cal" else 1.0
    p = apply_temperature(prob, temperature)
    if resamples:
        return temperature, bootstrap_threshold(y, p, biopsies, name, resamples=resamples, seed=seed)
    return temperature, choose_threshold(y, p, name)


def pooled_row(folds: list[dict], rule: tuple, cutoff: float, seed: int) -> dict:
    """The held-out sites pooled, each at its own fold's validation threshold, with biopsy-bootstrap intervals."""
    y, score, called, biopsies, sites = [], [], [], [], []
    for fold in folds:
        temperature, threshold = threshold_of(fold["val"], rule, seed)
        prob = np.asarray(fold["test"]["prob"])
        y += fold["test"]["y"]
        score += ranking_score(prob, temperature).tolist()
        called += (apply_temperature(prob, temperature) >= threshold).astype(int).tolist()
        biopsies += fold["test"]["biopsy"]
        sites += fold["test"]["site"]
    y, score, called, biopsies, sites = map(np.asarray, (y, score, called, biopsies, sites))

    def statistic(yy, cols):
        s, c, b = cols[:, 0], cols[:, 1].astype(int), cols[:, 2].astype(int)
        auc = roc_auc_score(yy, s) if len(np.unique(yy)) == 2 else float("nan")
        burden = burden_summary(biopsy_burden(b, s, c, yy), cutoff)["mae_pct_points"]
        return {"roc_auc": auc, "recall": float(c[yy == 1].mean()) if yy.sum() else float("nan"),
                "f1": f1_score(yy, c, zero_division=0), "burden_mae": burden}

    biopsy_index = np.unique(biopsies, return_inverse=True)[1]
    columns = np.column_stack([score, called, biopsy_index]).astype(np.float64)
    point = statistic(y, columns)
    ci = bootstrap_intervals(y, columns, biopsies, statistic, n_resamples=RESAMPLES, seed=seed)
    within = [roc_auc_score(y[sites == s], score[sites == s]) for s in np.unique(sites)
              if len(np.unique(y[sites == s])) == 2]
    return {**point, "ci": {k: [v.low, v.high] for k, v in ci.items()}, "within_roc_auc": float(np.mean(within)),
            "n_images": int(len(y)), "n_biopsies": int(len(np.unique(biopsies)))}


def rule_rows(runs: dict) -> list[dict]:
    """Every rule on every (config, fold): held-out recall and F1, and their shortfall from the held-out best F1."""
    rows = []
    for rule in RULES:
        recall, f1, shortfall = [], [], []
        for folds in runs.values():
            for fold in folds:
                temperature, threshold = threshold_of(fold["val"], rule, 0)
                y, prob = np.asarray(fold["test"]["y"]), np.asarray(fold["test"]["prob"])
                called = apply_temperature(prob, temperature) >= threshold
                best = max(f1_score(y, prob >= t, zero_division=0) for t in np.unique(prob))
                recall.append(float(called[y == 1].mean()))
                f1.append(f1_score(y, called, zero_division=0))
                shortfall.append(best - f1[-1])
        rows.append({"rule": rule[0], "recall": float(np.mean(recall)), "recall_min": float(np.min(recall)),
                     "f1": float(np.mean(f1)), "f1_shortfall": float(np.mean(shortfall)),
                     "f1_shortfall_max": float(np.max(shortfall)), "n_folds": len(f1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=240)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--n-biopsies", type=int, default=24)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--difficulty", type=float, default=0.5)
    ap.add_argument("--sclerotic-fraction", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=3, help="from-scratch fine-tune epochs per fold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="none:off,none:on,macenko:off,macenko:on,reinhard:off,reinhard:on",
                    help="normalisation:colour-augmentation pairs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glomeruli-stain-sites"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stain_sites.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    params = bench_params(args)
    raw = args.work / "raw"
    generate_sample_dataset(raw, args.n_images, seed=args.seed, difficulty=args.difficulty, size_range=(64, 200),
                            sclerotic_fraction=args.sclerotic_fraction,
                            n_biopsies=args.n_biopsies, n_sites=args.sites, workers=0, progress=False)
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=params.ingest.labels_csv,
                          group_regex=params.ingest.group_regex, site_regex=SYNTHETIC_SITE_REGEX,
                          max_pixels=params.ingest.max_pixels,
                          max_unreadable_fraction=params.ingest.max_unreadable_fraction, workers=0)
    rows = ingest_dataset(raw, config).rows
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for pair in args.configs.split(","):
        method, colour_setting = pair.split(":")
        work = args.work / pair.replace(":", "-")
        work.mkdir()
        preprocessed = work / "preprocessed.h5"
        preprocess_images(raw, rows, preprocessed, size=args.size, fill=params.preprocess.fill,
                          max_pixels=params.ingest.max_pixels, workers=0, stain=stain_normalization(method))
        augment = colour(params.augment, on=colour_setting == "on")
        augment_store(preprocessed, work / "augmented.h5", augment, seed=params.seed, workers=0)
        runs[pair] = []
        for fold in range(args.sites):
            log(f"{pair} fold {fold}")
            runs[pair].append(fold_predictions(params, work / "augmented.h5", fold, params.seed))
    rule = next(r for r in RULES if r[2] == params.evaluate.threshold_rule
                and r[3] == params.evaluate.threshold_resamples and r[1] == "cal")
    table = {pair: pooled_row(folds, rule, params.evaluate.burden_cutoff, args.seed) for pair, folds in runs.items()}
    rules = rule_rows(runs)
    result = {"machine": machine(),
              "args": {k: str(v) for k, v in vars(args).items()}, "threshold_rule": rule[0],
              "colour_augment_on": COLOUR_ON,
              "wall_s": round(time.perf_counter() - start), "table": table, "rules": rules, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nleave-one-site-out, {args.sites} sites, {args.n_images} images, {args.size} px, threshold: {rule[0]}")
    print("| stain normalisation | colour augmentation | ROC-AUC (95 % CI) | within-site ROC-AUC | recall (95 % CI) "
          "| F1 (95 % CI) | burden error, points (95 % CI) |\n|---|---|---|---|---|---|---|")
    for pair, row in table.items():
        method, colour_setting = pair.split(":")
        cells = [f"{row[k]:.2f} ({row['ci'][k][0]:.2f}–{row['ci'][k][1]:.2f})" for k in ("roc_auc",)]
        cells += [f"{row['within_roc_auc']:.2f}"]
        cells += [f"{row[k]:.2f} ({row['ci'][k][0]:.2f}–{row['ci'][k][1]:.2f})" for k in ("recall", "f1")]
        cells += [f"{row['burden_mae']:.1f} ({row['ci']['burden_mae'][0]:.1f}–{row['ci']['burden_mae'][1]:.1f})"]
        print(f"| {method} | {colour_setting} | " + " | ".join(cells) + " |")
    print("\n| threshold rule (on validation) | held-out recall (mean, worst) | held-out F1 | F1 below the "
          "held-out best (mean, worst) |\n|---|---|---|---|")
    for r in rules:
        print(f"| {r['rule']} | {r['recall']:.2f}, {r['recall_min']:.2f} | {r['f1']:.2f} | "
              f"{r['f1_shortfall']:.2f}, {r['f1_shortfall_max']:.2f} |")
    log(f"done in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
