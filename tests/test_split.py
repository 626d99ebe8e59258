"""Split: whole images (or biopsies) per partition, augmented copies only in train, both classes held out."""

import numpy as np
import pytest

from glomeruli.h5store import RecordMeta
from glomeruli.params import SplitParams
from glomeruli.split import SplitError, split_records, summarize


def _meta(n_sources: int = 120, copies: int = 2, n_biopsies: int = 24, positive_every: int = 4) -> RecordMeta:
    ids, sources, groups, labels, augmented = [], [], [], [], []
    for s in range(n_sources):
        label = int(s % positive_every == 0)
        for c in range(1 + copies * label):
            ids.append(f"s{s}" + (f"#aug{c}" if c else ""))
            sources.append(f"s{s}")
            groups.append(f"B{s % n_biopsies}")
            labels.append(label)
            augmented.append(c > 0)
    obj = lambda x: np.array(x, dtype=object)  # noqa: E731
    return RecordMeta(obj(ids), obj(sources), obj(groups), np.array(labels), np.array(augmented))


@pytest.mark.parametrize("group_by", ["image", "biopsy"])
def test_partitions_are_disjoint_and_stratified(group_by):
    meta = _meta()
    split = split_records(meta, SplitParams(group_by, folds=5, fold=0, val_fraction=0.2), seed=3)
    key = meta.source_ids if group_by == "image" else meta.groups
    parts = {p: set(key[split.rows(p)]) for p in ("train", "val", "test")}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    sources = {p: set(meta.source_ids[split.rows(p)]) for p in ("train", "val", "test")}
    assert not sources["train"] & sources["test"] and not sources["val"] & sources["test"]
    train_sources = set(meta.source_ids[split.train])
    assert set(split.train) == {i for i in range(len(meta)) if meta.source_ids[i] in train_sources}
    for p in ("val", "test"):
        assert not meta.is_augmented[split.rows(p)].any()
        assert set(meta.labels[split.rows(p)]) == {0, 1}
    assert meta.is_augmented[split.train].any()
    originals = ~meta.is_augmented
    assert 0.12 < len(split.test) / originals.sum() < 0.3


def test_split_is_deterministic_and_seeded():
    meta = _meta()
    a = split_records(meta, SplitParams("image", folds=5, fold=0, val_fraction=0.2), seed=1)
    b = split_records(meta, SplitParams("image", folds=5, fold=0, val_fraction=0.2), seed=1)
    c = split_records(meta, SplitParams("image", folds=5, fold=0, val_fraction=0.2), seed=2)
    assert a.to_json() == b.to_json() and a.to_json() != c.to_json()


def test_too_few_biopsies_is_a_clear_error():
    meta = _meta(n_sources=12, n_biopsies=3, positive_every=6)
    with pytest.raises(SplitError, match="split"):
        split_records(meta, SplitParams("biopsy", folds=5, fold=0, val_fraction=0.2), seed=0)


def test_summary_counts_classes_per_partition():
    meta = _meta()
    split = split_records(meta, SplitParams("image", folds=5, fold=0, val_fraction=0.2), seed=0)
    summary = summarize(meta, split, SplitParams("image", folds=5, fold=0, val_fraction=0.2))
    assert sum(summary[p]["originals"] for p in ("train", "val", "test")) == int((~meta.is_augmented).sum())
    assert summary["test"]["augmented"] == 0 and summary["train"]["augmented"] == int(meta.is_augmented[split.train].sum())
    assert summary["test"]["label_0"] + summary["test"]["label_1"] == summary["test"]["originals"]


def _few_positive_biopsies() -> RecordMeta:
    """10 biopsies of uneven size; only 5 hold sclerotic images (as in a real cohort: 61 of 215 CMIL biopsies
    have none), so some grouped folds of the non-test data hold no sclerotic image at all."""
    sizes, positives = [17, 9, 7, 16, 18, 5, 4, 14, 9, 13], [1, 0, 3, 0, 9, 0, 0, 0, 3, 6]
    ids, groups, labels = [], [], []
    for b, (n, n_positive) in enumerate(zip(sizes, positives)):
        for i in range(n):
            ids.append(f"B{b}-{i}")
            groups.append(f"B{b}")
            labels.append(int(i < n_positive))
    obj = lambda x: np.array(x, dtype=object)  # noqa: E731
    return RecordMeta(obj(ids), obj(ids), obj(groups), np.array(labels), np.zeros(len(ids), bool))


@pytest.mark.parametrize("fold", range(5))
def test_validation_holds_both_classes_in_every_fold(fold):
    meta = _few_positive_biopsies()
    split = split_records(meta, SplitParams("biopsy", folds=5, fold=fold, val_fraction=0.15), seed=42)
    for partition in ("train", "val", "test"):
        assert set(meta.labels[split.rows(partition)].tolist()) == {0, 1}, partition
    assert not set(meta.groups[split.val]) & set(meta.groups[split.train])
