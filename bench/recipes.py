#!/usr/bin/env python
"""Training recipes compared on the hard synthetic set (issue 11), at CPU size, without ImageNet weights.

    .venv/bin/python bench/recipes.py --n-biopsies 125     # run 5 of bench/RESULTS.md (~20 min on 2 cores)
    .venv/bin/python bench/recipes.py --n-images 200 --scratch-epochs 4 --recipes a,c   # a quick look

The set: `glomeruli sample-data --structure-only` (colour, brightness and nucleus count do not separate the
classes; only the tuft's structure does), preprocessed, augmented and split by biopsy with the package's own
functions and the shipped params.yaml (sizes and epochs overridden below). Recipes, each from the same seed:

  a  head on the frozen random base (train_frozen only)
  b  the demo's fine-tune: a, then the top block unfrozen, BatchNormalization frozen, constant lr 1e-4, 4 epochs
  c  from scratch: a, then every layer (stem included) trained with BatchNormalization in training mode,
     cosine decay, the head's standardisation reset to the identity: the recommended offline recipe,
     glomeruli.model.recipes.FROM_SCRATCH_OVERRIDES
  d  c plus online augmentation (fresh variants every epoch)

The threshold is chosen on validation (max F1); balanced accuracy and ROC-AUC are measured with 95 % bootstrap
intervals that resample whole biopsies (glomeruli.evaluation.uncertainty when present), on the split's test fold and on an
independent hold-out set (`--holdout-images`, another seed, its own biopsies: four times the test fold's biopsies
for the price of predicting them). Wall time includes the frozen phase. Not part of the test suite.
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

from glomeruli.data.augment import OnlineAugment, augment_store  # noqa: E402
from glomeruli.model.backend import configure  # noqa: E402
from glomeruli.evaluation.metrics import binary_metrics, choose_threshold  # noqa: E402
from glomeruli.data.h5store import ImageStore  # noqa: E402
from glomeruli.model.inference import StoreRows, predict_rows  # noqa: E402
from glomeruli.data.ingest import IngestConfig, ingest_dataset  # noqa: E402
from glomeruli.model.efficientnet import build_model, load_model  # noqa: E402
from glomeruli.core.params import parse_params  # noqa: E402
from glomeruli.data.preprocess import preprocess_images  # noqa: E402
from glomeruli.data.sample_data import generate_sample_dataset  # noqa: E402
from glomeruli.data.split import split_records  # noqa: E402
from glomeruli.model.training import finetune, load_phase_data, train_frozen  # noqa: E402
from glomeruli.model.recipes import FROM_SCRATCH_OVERRIDES as SCRATCH  # noqa: E402

RECIPES = {
    "a": "head on the frozen random base",
    "b": "today's fine-tune (top block, BN frozen, lr 1e-4 constant)",
    "c": "from scratch: every layer + BatchNormalization, cosine decay",
    "d": "c + online augmentation",
}
RESAMPLES = 2000
HOLDOUT_SEED_OFFSET = 1000


def make_params(args):
    raw = shipped_params()
    raw["preprocess"]["image_size"] = args.size
    raw["model"]["weights"] = "none"
    raw["runtime"].update(workers=1, memory_budget_gb=2)
    raw["split"].update(group_by="biopsy", folds=5, fold=0, val_fraction=0.2)
    raw["train_frozen"].update(epochs=SCRATCH["train_frozen.epochs"], lr=SCRATCH["train_frozen.lr"],
                               patience=SCRATCH["train_frozen.patience"], batch_size=32)
    raw["finetune"].update(batch_size=32)
    return parse_params(raw)


def _preprocessed_hard_set(args, params, work: Path, *, n_images: int, seed: int, n_biopsies: int | None) -> Path:
    """Hard set -> ingest -> preprocess, the package's own functions."""
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw"
    generate_sample_dataset(raw, n_images, seed=seed, difficulty=0.3, size_range=(64, 160),
                            sclerotic_fraction=args.sclerotic_fraction, structure_only=True, workers=1,
                            n_biopsies=n_biopsies, progress=False)
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=params.ingest.labels_csv,
                          group_regex=params.ingest.group_regex, max_pixels=params.ingest.max_pixels,
                          max_unreadable_fraction=params.ingest.max_unreadable_fraction, workers=1)
    rows = ingest_dataset(raw, config).rows
    preprocessed = work / "preprocessed.h5"
    preprocess_images(raw, rows, preprocessed, size=args.size, fill=params.preprocess.fill,
                      max_pixels=params.ingest.max_pixels, workers=1)
    return preprocessed


def build_data(args, params, work: Path):
    """Hard set -> ingest -> preprocess -> augment -> split (biopsy)."""
    preprocessed = _preprocessed_hard_set(args, params, work, n_images=args.n_images, seed=args.seed,
                                          n_biopsies=args.n_biopsies)
    augmented = work / "augmented.h5"
    meta = augment_store(preprocessed, augmented, params.augment, seed=params.seed, workers=1)
    return augmented, split_records(meta, params.split, params.seed)


def build_holdout(args, params, work: Path) -> Path | None:
    """An independent hard set (another seed, its own biopsies), never trained or tuned on: more test biopsies
    than the split's test fold holds, for the price of predicting them."""
    if not args.holdout_images:
        return None
    return _preprocessed_hard_set(args, params, work, n_images=args.holdout_images,
                                  seed=args.seed + HOLDOUT_SEED_OFFSET, n_biopsies=max(1, args.holdout_images // 4))


def intervals(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, threshold: float, seed: int) -> dict:
    """95 % bootstrap intervals (whole biopsies resampled) of balanced accuracy and ROC-AUC."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    def statistic(yy, pp):
        auc = roc_auc_score(yy, pp) if len(np.unique(yy)) == 2 else float("nan")
        return {"balanced_accuracy": balanced_accuracy_score(yy, pp >= threshold), "roc_auc": auc}

    try:
        from glomeruli.evaluation.uncertainty import bootstrap_intervals

        found = bootstrap_intervals(y, prob, groups, statistic, n_resamples=RESAMPLES, seed=seed)
        return {k: [v.low, v.high] for k, v in found.items()}
    except ImportError:  # before glomeruli.evaluation.uncertainty existed: the same percentile bootstrap by biopsy
        rng = np.random.default_rng(seed)
        units = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        draws = {"balanced_accuracy": [], "roc_auc": []}
        for _ in range(RESAMPLES):
            rows = np.concatenate([units[u] for u in rng.integers(0, len(units), len(units))])
            for k, v in statistic(y[rows], prob[rows]).items():
                draws[k].append(v)
        return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in draws.items()}


def finetune_params(params, recipe: str, args):
    ft = params.finetune
    if recipe == "b":
        return replace(ft, unfreeze_blocks=1, epochs=4, lr=1e-4, lr_schedule="constant", warmup_epochs=0,
                       patience=4, online_augment=False)
    return replace(ft, unfreeze_blocks=SCRATCH["finetune.unfreeze_blocks"], epochs=args.scratch_epochs,
                   lr=args.scratch_lr, lr_schedule=SCRATCH["finetune.lr_schedule"], batch_size=args.scratch_batch,
                   warmup_epochs=SCRATCH["finetune.warmup_epochs"], patience=args.scratch_epochs,
                   online_augment=recipe == "d")


def scores(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, threshold: float, seed: int) -> dict:
    metrics = binary_metrics(y, prob, threshold)
    ci = intervals(y, prob, groups, threshold, seed)
    return {"balanced_accuracy": metrics["balanced_accuracy"], "balanced_accuracy_ci": ci["balanced_accuracy"],
            "roc_auc": metrics["roc_auc"], "roc_auc_ci": ci["roc_auc"], "n_images": int(len(y)),
            "n_biopsies": int(len(np.unique(groups)))}


def run_recipe(recipe: str, args, params, augmented: Path, split, frozen: Path, frozen_seconds: float,
               holdout: Path | None) -> dict:
    configure(params.seed, "float32", "auto")
    start = time.perf_counter()
    with ImageStore(augmented) as store:
        if recipe != "a":
            model = load_model(frozen)
            ft = finetune_params(params, recipe, args)
            data = load_phase_data(store, split, 2.0, originals=ft.online_augment)
            finetune(model, data, ft, params.runtime, seed=params.seed, callbacks=[], from_scratch=recipe != "b",
                     augment=OnlineAugment(params.augment, params.preprocess.fill, params.seed))
        else:
            model = load_model(frozen)
        trained = time.perf_counter() - start
        val = predict_rows(model, StoreRows(store, split.val), 64).ravel()
        test = predict_rows(model, StoreRows(store, split.test), 64).ravel()
        labels, groups = store.meta.labels, np.asarray(store.meta.groups)
    threshold = choose_threshold(labels[split.val], val, "max_f1")
    row = {"recipe": recipe, "description": RECIPES[recipe], "threshold": threshold,
           **scores(labels[split.test], test, groups[split.test], threshold, params.seed),
           "wall_s": round(frozen_seconds + (trained if recipe != "a" else 0.0), 1)}
    if holdout is not None:
        with ImageStore(holdout) as held:
            prob = predict_rows(model, StoreRows(held, np.arange(len(held.meta.labels))), 64).ravel()
            row["holdout"] = scores(held.meta.labels, prob, np.asarray(held.meta.groups), threshold, params.seed)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--size", type=int, default=SCRATCH["preprocess.image_size"])
    ap.add_argument("--sclerotic-fraction", type=float, default=0.35)
    ap.add_argument("--n-biopsies", type=int, default=None, help="default: one per 12 images, as sample-data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch-epochs", type=int, default=SCRATCH["finetune.epochs"], help="fine-tune epochs of recipes c and d")
    ap.add_argument("--scratch-lr", type=float, default=SCRATCH["finetune.lr"], help="peak learning rate of recipes c and d")
    ap.add_argument("--scratch-batch", type=int, default=32, help="fine-tune batch size of recipes c and d")
    ap.add_argument("--holdout-images", type=int, default=400,
                    help="independent hard set (another seed, one biopsy per 4 images) scored with each recipe's "
                         "validation threshold; 0 = none")
    ap.add_argument("--recipes", default="a,b,c,d")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glomeruli-recipes"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recipes.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("glomeruli.model.training").setLevel(logging.INFO)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    params = make_params(args)
    log(f"hard set: {args.n_images} images, {args.size} px, split by biopsy")
    augmented, split = build_data(args, params, args.work)
    holdout = build_holdout(args, params, args.work / "holdout")
    with ImageStore(augmented) as store:
        labels = store.meta.labels
    log(f"train {len(split.train)} records (with copies), val {len(split.val)}, test {len(split.test)} "
        f"({int(labels[split.test].sum())} sclerotic)")
    # Recipe a's model is every other recipe's starting point: train it once, time it once.
    configure(params.seed, "float32", "auto")
    start = time.perf_counter()
    model = build_model(args.size, "none", params.model.dropout)
    with ImageStore(augmented) as store:
        train_frozen(model, load_phase_data(store, split, 2.0), params.train_frozen, params.runtime,
                     seed=params.seed, callbacks=[])
    frozen_seconds = time.perf_counter() - start
    frozen = args.work / "frozen.keras"
    model.save(frozen)
    rows = []
    for recipe in args.recipes.split(","):
        log(f"recipe {recipe}: {RECIPES[recipe]}")
        rows.append(run_recipe(recipe, args, params, augmented, split, frozen, frozen_seconds, holdout))
        log(json.dumps(rows[-1]))
    result = {"machine": machine(),
              "n_images": args.n_images, "n_biopsies": args.n_biopsies, "size": args.size, "sclerotic_fraction": args.sclerotic_fraction,
              "scratch_epochs": args.scratch_epochs, "scratch_lr": args.scratch_lr, "scratch_batch": args.scratch_batch,
              "n_train": int(len(split.train)), "n_val": int(len(split.val)), "n_test": int(len(split.test)),
              "holdout_images": args.holdout_images, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for title, pick in (("test fold", lambda r: r), ("independent hold-out set", lambda r: r.get("holdout"))):
        first = pick(rows[0])
        if first is None:
            continue
        print(f"\n{title}: {first['n_images']} images, {first['n_biopsies']} biopsies")
        print("| recipe | balanced accuracy (95 % CI) | ROC-AUC (95 % CI) | wall time |\n|---|---|---|---|")
        for r in rows:
            s = pick(r)
            ba, auc = s["balanced_accuracy_ci"], s["roc_auc_ci"]
            print(f"| ({r['recipe']}) {r['description']} | {s['balanced_accuracy']:.3f} ({ba[0]:.3f}-{ba[1]:.3f}) | "
                  f"{s['roc_auc']:.3f} ({auc[0]:.3f}-{auc[1]:.3f}) | {r['wall_s'] / 60:.1f} min |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
