"""Split stage: grouped, stratified K-fold test set (or one held-out site per fold), validation from the rest;
augmented copies only in train.

Test is fold `split.fold` of a seeded `StratifiedGroupKFold` by biopsy (`split.group_by: site`: the fold-th
site, whole; `image`: by source image); validation is the first fold of the rest that holds both classes.
A biopsy (by image: a source image and its copies) never straddles partitions, and the folds depend only on
(data, K, seed), so the K runs of cross-validation test every original exactly once (`fold_assignment`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from glomeruli.core.errors import UserError
from glomeruli.data.h5store import RecordMeta
from glomeruli.core.params import SplitParams

log = logging.getLogger(__name__)
PARTITIONS = ("train", "val", "test")


class SplitError(UserError, ValueError):
    """The data cannot be split as asked (too few images or groups per class)."""


@dataclass(frozen=True)
class Split:
    """Row indices into the augmented store, per partition, sorted."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def rows(self, partition: str) -> np.ndarray:
        return getattr(self, partition)

    def to_json(self) -> dict:
        return {p: self.rows(p).tolist() for p in PARTITIONS}

    @classmethod
    def from_json(cls, data: dict) -> "Split":
        return cls(**{p: np.asarray(data[p], dtype=np.int64) for p in PARTITIONS})


def _fold_mask(labels: np.ndarray, groups: np.ndarray, n_splits: int, fold: int, seed: int, what: str) -> np.ndarray:
    """Boolean mask of fold `fold` of a stratified group K-fold (scikit-learn's StratifiedGroupKFold)."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise SplitError(f"only {n_groups} groups for {n_splits} folds of the {what}; add images, or lower "
                         "split.folds / split.val_fraction, or use split.group_by: image")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for i, (_, held) in enumerate(folds.split(np.zeros(len(labels)), labels, groups)):
        if i == fold:
            mask = np.zeros(len(labels), dtype=bool)
            mask[held] = True
            return mask
    raise AssertionError("unreachable: fold < n_splits is validated with the params")


def _validation_mask(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """One stratified group fold of the non-test data as validation: the first (in the seeded order) that
    holds both classes and leaves both in train. With few biopsies a class can sit in one or two groups,
    so fold 0 alone can miss it; the test fold, by contrast, is fixed by `split.fold`."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise SplitError(f"only {n_groups} groups for {n_splits} folds of the non-test data (validation); add "
                         "images, or lower split.folds / split.val_fraction, or use split.group_by: image")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    candidates = []
    for _, held in folds.split(np.zeros(len(labels)), labels, groups):
        mask = np.zeros(len(labels), dtype=bool)
        mask[held] = True
        candidates.append(mask)
        if set(labels[mask].tolist()) == {0, 1} and set(labels[~mask].tolist()) == {0, 1}:
            return mask
    return candidates[0]  # no fold holds both classes: split_records says so, naming the way out


MIN_SITES = 3  # leave-one-site-out needs a held-out site, and at least two to train and validate on


def site_folds(sites: np.ndarray, params: SplitParams) -> list[str]:
    """The sites in fold order (sorted names) for `split.group_by: site`: fold k holds out site k."""
    names = sorted(set(np.asarray(sites).tolist()))
    if len(names) < MIN_SITES:
        raise SplitError(f"split.group_by: site needs at least {MIN_SITES} sites, the data has {len(names)} "
                         f"({', '.join(names)}): set ingest.site_regex to name them, or use split.group_by: biopsy")
    if params.folds != len(names):
        raise SplitError(f"split.group_by: site holds out one site per fold, so split.folds must be {len(names)} (the "
                         f"number of sites: {', '.join(names)}), not {params.folds}")
    return names


def _grouping(meta: RecordMeta, params: SplitParams) -> np.ndarray:
    """What must never straddle partitions: the biopsy (group_by biopsy or site) or the source image."""
    return meta.source_ids if params.group_by == "image" else meta.groups


def fold_assignment(meta: RecordMeta, params: SplitParams, seed: int) -> np.ndarray:
    """The cross-validation fold (0..K-1) of every original record, -1 for augmented copies.

    Every fold is the test set of one run (`split.fold`); the folds are disjoint by group and cover
    every original once, whatever fold is chosen, because they depend only on (data, K, seed).
    """
    originals = np.flatnonzero(~meta.is_augmented)
    labels = meta.labels[originals]
    groups = _grouping(meta, params)[originals]
    fold_of = np.full(len(meta), -1, dtype=np.int64)
    if params.group_by == "site":
        names = site_folds(meta.sites[originals], params)
        fold_of[originals] = [names.index(site) for site in meta.sites[originals]]
        return fold_of
    for k in range(params.folds):
        fold_of[originals[_fold_mask(labels, groups, params.folds, k, seed, "data")]] = k
    return fold_of


def split_records(meta: RecordMeta, params: SplitParams, seed: int) -> Split:
    """Test = fold `split.fold` of K grouped, stratified folds (group_by site: the fold-th site, whole);
    validation = whole biopsies of the rest (of the training sites); train = the remaining originals with the
    augmented copies of their sources."""
    originals = np.flatnonzero(~meta.is_augmented)
    labels = meta.labels[originals]
    groups = _grouping(meta, params)[originals]
    if params.group_by == "site":
        test = meta.sites[originals] == site_folds(meta.sites[originals], params)[params.fold]
        val_share = params.val_fraction / max(1e-9, 1 - float(test.mean()))
    else:
        test = _fold_mask(labels, groups, params.folds, params.fold, seed, "data")
        val_share = params.val_fraction / (1 - 1 / params.folds)
    rest = np.flatnonzero(~test)
    val = np.zeros(len(originals), dtype=bool)
    val[rest[_validation_mask(labels[rest], groups[rest], max(2, round(1 / val_share)), seed + 1)]] = True

    source_partition = {}
    for i, row in enumerate(originals):
        source_partition[meta.source_ids[row]] = "test" if test[i] else "val" if val[i] else "train"
    train_rows = [r for r in range(len(meta)) if source_partition[meta.source_ids[r]] == "train"]
    split = Split(train=np.array(train_rows, dtype=np.int64),
                  val=np.sort(originals[val]), test=np.sort(originals[test]))
    for partition in ("val", "test"):
        present = set(meta.labels[split.rows(partition)].tolist())
        if present != {0, 1}:
            knob = "split.folds" if partition == "test" else "split.val_fraction"
            raise SplitError(
                f"the {partition} partition holds only label(s) {sorted(present)}: too few "
                f"{'images' if params.group_by == 'image' else 'biopsies'} per class; add data or change {knob}"
                + ("" if params.group_by == "image" else ", or use split.group_by: image"))
    return split


def summarize(meta: RecordMeta, split: Split, params: SplitParams) -> dict:
    """Class counts per partition, for review in `dvc metrics diff`."""
    summary: dict = {"group_by": params.group_by, "folds": params.folds, "fold": params.fold}
    n_originals = int((~meta.is_augmented).sum())
    for p in PARTITIONS:
        rows = split.rows(p)
        labels, augmented = meta.labels[rows], meta.is_augmented[rows]
        summary[p] = {
            "records": int(len(rows)),
            "originals": int((~augmented).sum()),
            "augmented": int(augmented.sum()),
            "label_0": int((labels == 0).sum()),
            "label_1": int((labels == 1).sum()),
            "biopsies": int(len(np.unique(meta.groups[rows]))),
            "sites": sorted(set(meta.sites[rows].tolist())),
            "share_of_originals": round(float((~augmented).sum()) / max(1, n_originals), 4),
        }
    return summary


def read_split(path: Path, n_records: int) -> Split:
    """The split index, checked against the store it points into."""
    try:
        split = Split.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as err:
        raise SplitError(f"{path} is missing or malformed ({err}); rerun `dvc repro split`") from err
    if any(len(split.rows(p)) and split.rows(p).max() >= n_records for p in PARTITIONS):
        raise SplitError(f"{path} points past the end of the augmented store ({n_records} records): "
                         "it was written for other data; rerun `dvc repro split`")
    return split
