"""Split: whole images (or biopsies) per partition, augmented copies only in train, both classes held out."""

import numpy as np
import pytest

from glomeruli.data.h5store import RecordMeta
from glomeruli.core.params import SplitParams
from glomeruli.data.split import SplitError, fold_assignment, split_records, summarize


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


def _source_of(record_id: str) -> str:
    return record_id.split("#")[0]


def _is_positive(record_id: str) -> bool:
    """_meta's rule, read from the id alone: source s<n> is globally sclerotic when n is a multiple of 4."""
    return int(_source_of(record_id)[1:]) % 4 == 0


@pytest.mark.parametrize("group_by", ["image", "biopsy"])
def test_partitions_are_disjoint_and_stratified(group_by):
    meta = _meta()  # 120 originals, 30 of them positive (each with 2 augmented copies), 24 biopsies of 5
    split = split_records(meta, SplitParams(group_by, folds=5, fold=0, val_fraction=0.2), seed=3)
    ids = {p: [str(meta.ids[r]) for r in split.rows(p)] for p in ("train", "val", "test")}

    # Whole groups (biopsies, or images with their copies) per partition.
    key = meta.source_ids if group_by == "image" else meta.groups
    parts = {p: set(key[split.rows(p)]) for p in ("train", "val", "test")}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]

    # Augmented copies only in train, and there all of them: the two copies of each positive train original.
    assert not [i for p in ("val", "test") for i in ids[p] if "#aug" in i]
    train_sources = {i for i in ids["train"] if "#aug" not in i}
    assert sorted(i for i in ids["train"] if "#aug" in i) == sorted(
        f"{s}#aug{c}" for s in train_sources if _is_positive(s) for c in (1, 2))
    assert sorted(i for p in ids.values() for i in p if "#aug" not in i) == sorted(f"s{n}" for n in range(120))

    # Stratified: each class is shared out like the data (test 1/5, validation 1/5 of the originals, train the
    # rest), to within one image, or one biopsy (5 images, all of one class here) when grouped by biopsy.
    slack = 1 if group_by == "image" else 5
    for positive, n_class in ((True, 30), (False, 90)):
        for partition, share in (("test", 0.2), ("val", 0.2), ("train", 0.6)):
            held = sum(1 for i in ids[partition] if "#aug" not in i and _is_positive(i) == positive)
            assert abs(held - share * n_class) <= slack, (partition, positive, held)


@pytest.mark.parametrize("group_by", ["image", "biopsy"])
def test_the_test_set_is_the_fold_split_fold_names(group_by):
    """Fold k of K is the test set of run k: the K test sets are disjoint, cover every original once, and are
    the folds cv-summary's fold_assignment reports."""
    meta = _meta()
    params = {k: SplitParams(group_by, folds=5, fold=k, val_fraction=0.2) for k in range(5)}
    tests = {k: split_records(meta, params[k], seed=3).test for k in range(5)}
    held = sorted(str(meta.ids[r]) for k in range(5) for r in tests[k])
    assert held == sorted(f"s{n}" for n in range(120))  # disjoint and complete: fold k is not fold 0 again
    assert all(18 <= len(tests[k]) <= 30 for k in range(5))
    fold_of = fold_assignment(meta, params[0], seed=3)
    for k in range(5):
        np.testing.assert_array_equal(tests[k], np.flatnonzero(fold_of == k))


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
    for partition in ("train", "val", "test"):
        ids = [str(meta.ids[r]) for r in split.rows(partition)]
        originals = [i for i in ids if "#aug" not in i]
        by_hand = {"records": len(ids), "originals": len(originals), "augmented": len(ids) - len(originals),
                   "label_0": sum(not _is_positive(i) for i in ids),
                   "label_1": sum(_is_positive(i) for i in ids),
                   "biopsies": len({f"B{int(_source_of(i)[1:]) % 24}" for i in ids}),
                   "share_of_originals": round(len(originals) / 120, 4), "sites": ["all"]}
        assert summary[partition] == by_hand, partition
    assert summary["test"]["label_1"] == 6 and summary["test"]["label_0"] == 18  # 1/5 of 30 and of 90


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


def _sited_meta(n_sites: int = 3, biopsies_per_site: int = 6, images_per_biopsy: int = 5) -> RecordMeta:
    """Site k holds biopsies S<k>-B<j>; in every biopsy image 0 is sclerotic, with one augmented copy."""
    ids, sources, groups, labels, augmented, sites = [], [], [], [], [], []
    for k in range(n_sites):
        for j in range(biopsies_per_site):
            for i in range(images_per_biopsy):
                label = int(i == 0)
                for c in range(1 + label):
                    source = f"S{k}-B{j}-{i}"
                    ids.append(source + (f"#aug{c}" if c else ""))
                    sources.append(source)
                    groups.append(f"S{k}-B{j}")
                    labels.append(label)
                    augmented.append(c > 0)
                    sites.append(f"S{k}")
    obj = lambda x: np.array(x, dtype=object)  # noqa: E731
    return RecordMeta(obj(ids), obj(sources), obj(groups), np.array(labels), np.array(augmented), obj(sites))


def test_leave_one_site_out_never_shares_a_site():
    meta = _sited_meta()
    for fold, held_out in enumerate(["S0", "S1", "S2"]):  # sorted site names, one per fold
        split = split_records(meta, SplitParams(group_by="site", folds=3, fold=fold, val_fraction=0.15), seed=1)
        test_sites = {i.split("-")[0] for i in meta.ids[split.test]}
        other_sites = {i.split("-")[0] for p in ("train", "val") for i in meta.ids[split.rows(p)]}
        assert test_sites == {held_out} and held_out not in other_sites
        assert len(split.test) == 6 * 5  # every original of the site, no augmented copy
        val_biopsies = {i.rsplit("-", 1)[0] for i in meta.ids[split.val]}
        train_biopsies = {i.rsplit("-", 1)[0] for i in meta.ids[split.train]}
        assert val_biopsies and not val_biopsies & train_biopsies
    folds = fold_assignment(meta, SplitParams(group_by="site", folds=3, fold=0, val_fraction=0.15), seed=1)
    originals = ~meta.is_augmented
    assert [f"S{f}" for f in folds[originals]] == [i.split("-")[0] for i in meta.ids[originals]]


def test_leave_one_site_out_refuses_too_few_sites_and_wrong_folds():
    with pytest.raises(SplitError, match="at least 3 sites, the data has 2"):
        split_records(_sited_meta(n_sites=2), SplitParams(group_by="site", folds=2, fold=0, val_fraction=0.15), 1)
    with pytest.raises(SplitError, match="split.folds must be 3"):
        split_records(_sited_meta(), SplitParams(group_by="site", folds=5, fold=0, val_fraction=0.15), 1)
    with pytest.raises(SplitError, match="at least 3 sites, the data has 1"):  # no site_regex: one site
        meta = _sited_meta()
        split_records(RecordMeta(meta.ids, meta.source_ids, meta.groups, meta.labels, meta.is_augmented),
                      SplitParams(group_by="site", folds=3, fold=0, val_fraction=0.15), 1)
