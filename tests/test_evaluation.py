"""Evaluation: threshold from validation only, every metric from scikit-learn, plot files for DVC."""

import csv

import numpy as np
import pytest
from sklearn import metrics as skm

from glomeruli.evaluation import binary_metrics, choose_threshold, plot_training_curves, write_plots


def test_max_f1_threshold_is_centred_between_classes():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.01, 0.2, 0.3, 0.9998, 0.99999])
    t = choose_threshold(y, p, "max_f1")
    assert 0.3 < t < 0.9998
    assert ((p >= t) == y.astype(bool)).all()


def test_rules_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 300), 0, 1)
    for rule, score in (("max_f1", lambda t: skm.f1_score(y, p >= t)),
                        ("youden", lambda t: skm.recall_score(y, p >= t) - (1 - skm.recall_score(1 - y, p < t)))):
        t = choose_threshold(y, p, rule)
        best = max(score(c) for c in np.unique(p))
        assert score(t) == pytest.approx(best), rule
    assert choose_threshold(y, p, "fixed", 0.42) == 0.42
    with pytest.raises(ValueError, match="evaluate.threshold_rule"):
        choose_threshold(y, p, "best")


def test_binary_metrics_match_sklearn_and_confusion_adds_up():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2, 0.8, 0.3])
    m = binary_metrics(y, p, 0.5)
    assert m["accuracy"] == pytest.approx(0.75) and m["n"] == 8
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["loss"] == pytest.approx(skm.log_loss(y, p))
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert sum(m["confusion_matrix"].values()) == m["n"]


def test_plot_files(tmp_path):
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.6, 0.7, 0.4, 0.2, 0.8])
    write_plots(tmp_path, np.array([f"i{k}" for k in range(6)], dtype=object), y, p, 0.5)
    with open(tmp_path / "confusion.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"id", "actual", "predicted"}
    assert [int(r["predicted"]) for r in rows] == [0, 1, 1, 0, 0, 1]
    for name in ("roc.csv", "precision_recall.csv", "confusion_matrix.png", "roc_pr.png"):
        assert (tmp_path / name).stat().st_size > 0
    live = tmp_path / "live" / "plots" / "metrics"
    for split in ("train", "val"):
        (live / split).mkdir(parents=True)
        for metric in ("loss", "accuracy"):
            (live / split / f"{metric}.tsv").write_text(f"timestamp\tstep\t{metric}\n1\t0\t0.5\n2\t1\t0.4\n")
    plot_training_curves({"frozen": tmp_path / "live"}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_validation_warnings_name_the_class_and_the_extreme_threshold(caplog):
    from glomeruli.evaluation import warn_about_validation

    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    biopsies = np.array(["a", "b", "c", "c", "a", "a", "b"])  # non-sclerotic in 3 biopsies, sclerotic in 2
    warnings = warn_about_validation(labels, biopsies, 0.5)
    assert len(warnings) == 1 and "sclerotic glomeruli from 2 biopsies" in warnings[0]
    assert warn_about_validation(np.array([0, 0, 0, 1, 1, 1]), np.array(list("abcdef")), 0.5) == []
    extreme = warn_about_validation(np.array([0, 0, 0, 1, 1, 1]), np.array(list("abcdef")), 0.97)
    assert len(extreme) == 1 and "0.970" in extreme[0]


def test_confusion_csv_ids_are_inert(tmp_path):
    ids = np.array(["gs/=1+1.png", "-x.png", "plain.png"], dtype=object)
    write_plots(tmp_path, ids, np.array([1, 0, 1]), np.array([0.9, 0.2, 0.4]), 0.5)
    with open(tmp_path / "confusion.csv", newline="") as f:
        assert [row["id"] for row in csv.DictReader(f)] == ["gs/=1+1.png", "'-x.png", "plain.png"]
