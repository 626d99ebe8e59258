"""Per-biopsy burden on a tiny hand-made fixture: counts, true and predicted %, error, wrong side of the
cutoff; the same summary from `glomeruli predict --by-biopsy` with biopsy ids read from file names."""

import csv

import numpy as np
import pytest

from glomeruli.evaluation.burden import biopsy_burden, burden_summary, write_burden_csv
from glomeruli.model.metadata import DatasetLayout
from glomeruli.commands.predict import Prediction, burden_by_biopsy, folder_labels

# biopsy A: 4 glomeruli, 1 sclerotic (25 %); B: 5, none (0 %); C: 2, both (100 %)
BIOPSIES = np.array(["A", "A", "A", "A", "B", "B", "B", "B", "B", "C", "C"])
LABELS = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
PROB = np.array([0.9, 0.2, 0.1, 0.1, 0.6, 0.2, 0.1, 0.1, 0.0, 0.8, 0.4])
THRESHOLD = 0.5


def test_per_biopsy_rows_by_hand():
    rows = biopsy_burden(BIOPSIES, PROB, PROB >= THRESHOLD, LABELS)
    assert [(r.biopsy, r.glomeruli) for r in rows] == [("A", 4), ("B", 5), ("C", 2)]
    assert [r.true_pct for r in rows] == pytest.approx([25.0, 0.0, 100.0])
    assert [r.predicted_pct for r in rows] == pytest.approx([25.0, 20.0, 50.0])  # A: 1/4, B: 1/5, C: 1/2
    assert [r.mean_probability_pct for r in rows] == pytest.approx([32.5, 20.0, 60.0])
    assert [r.error_pct_points for r in rows] == pytest.approx([0.0, 20.0, -50.0])
    summary = burden_summary(rows, cutoff=0.2)
    assert summary["mae_pct_points"] == pytest.approx((0 + 20 + 50) / 3)
    assert summary["mae_pct_points_mean_probability"] == pytest.approx((7.5 + 20 + 40) / 3)
    # at or above 20 %: true A yes, B no, C yes; predicted A yes, B yes (20 %), C yes -> B on the wrong side
    assert summary["wrong_side_of_cutoff"] == 1 and summary["wrong_side_of_cutoff_mean_probability"] == 1
    assert summary["n_biopsies"] == 3 and summary["n_glomeruli"] == 11 and summary["cutoff_pct"] == 20.0
    assert burden_summary(rows, cutoff=0.3)["wrong_side_of_cutoff"] == 0  # at 30 %: A, B below on both sides, C above


def test_csv(tmp_path):
    rows = biopsy_burden(BIOPSIES, PROB, PROB >= THRESHOLD, LABELS)
    write_burden_csv(tmp_path / "burden.csv", rows)
    with open(tmp_path / "burden.csv") as f:
        table = list(csv.DictReader(f))
    assert table[1] == {"biopsy": "B", "glomeruli": "5", "true_pct": "0.00", "predicted_pct": "20.00",
                        "mean_probability_pct": "20.00", "error_pct_points": "20.00"}


def test_predict_by_biopsy_reads_ids_from_file_names(caplog, tmp_path):
    names = [f"{b}_PAS_{i}of9_x.png" for i, b in enumerate(BIOPSIES)]
    predictions = [Prediction(n, int(p >= THRESHOLD), float(p)) for n, p in zip(names, PROB)]
    rows = burden_by_biopsy(predictions, r"^(?P<group>.+?)_PAS_")
    assert [(r.biopsy, r.glomeruli, r.true_pct) for r in rows] == [("A", 4, None), ("B", 5, None), ("C", 2, None)]
    assert [r.predicted_pct for r in rows] == pytest.approx([25.0, 20.0, 50.0])
    # the same numbers as evaluate's, true % included, when the folder carries labels (its class folders)
    folder_of = {1: "sclerotic", 0: "healthy"}
    for name, label in zip(names, LABELS.tolist()):
        (tmp_path / folder_of[label]).mkdir(exist_ok=True)
        (tmp_path / folder_of[label] / name).write_bytes(b"")  # labelling reads names, not pixels
    labels = folder_labels(tmp_path, DatasetLayout({"sclerotic": 1, "healthy": 0}, None, r"^(?P<group>.+?)_PAS_"))
    labelled = burden_by_biopsy([Prediction(f"{folder_of[label]}/{p.name}", p.label, p.probability)
                                 for p, label in zip(predictions, LABELS.tolist())], r"^(?P<group>.+?)_PAS_", labels)
    assert labelled == biopsy_burden(BIOPSIES, PROB, PROB >= THRESHOLD, LABELS)
    odd = burden_by_biopsy([Prediction("no-biopsy-id.png", 1, 0.9)], r"^(?P<group>.+?)_PAS_")
    assert [r.biopsy for r in odd] == ["no-biopsy-id.png"] and "no biopsy id" in caplog.text
