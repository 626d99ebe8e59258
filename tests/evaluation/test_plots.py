"""The evaluate stage's pictures and `dvc plots` data: the files exist, hold PNGs, and their CSV columns and rows
are the ones dvc.yaml and `glomeruli review` read."""

import csv

import numpy as np

from glomeruli.evaluation.burden import biopsy_burden
from glomeruli.evaluation.plots import (plot_burden, plot_site_rocs, plot_training_curves, write_confusion_roc_pr,
                                        write_reliability)


def test_plot_files(tmp_path):
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.6, 0.7, 0.4, 0.2, 0.8])
    write_confusion_roc_pr(tmp_path, np.array([f"i{k}" for k in range(6)], dtype=object), y, p, 0.5)
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


def test_a_phase_without_epochs_is_named_not_drawn(tmp_path):
    """finetune.epochs: 0 leaves header-only curve files: the legend says so, and no empty lines are listed."""
    import matplotlib.pyplot as plt

    from glomeruli.evaluation.plots import training_curves_figure

    for phase, rows in (("frozen", "1\t0\t0.5\n2\t1\t0.4\n"), ("fine-tune", "")):
        for split in ("train", "val"):
            folder = tmp_path / phase / "plots" / "metrics" / split
            folder.mkdir(parents=True)
            for metric in ("loss", "accuracy"):
                (folder / f"{metric}.tsv").write_text(f"timestamp\tstep\t{metric}\n" + rows)
    fig = training_curves_figure({"frozen": tmp_path / "frozen", "fine-tune": tmp_path / "fine-tune"})
    for ax in fig.axes:
        assert [text.get_text() for text in ax.get_legend().get_texts()] == ["frozen train", "frozen val",
                                                                              "fine-tune: no epochs"]
        assert [list(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata())] == [[1, 2], [1, 2]]
    plt.close(fig)


def test_confusion_csv_ids_are_inert(tmp_path):
    ids = np.array(["gs/=1+1.png", "-x.png", "plain.png"], dtype=object)
    write_confusion_roc_pr(tmp_path, ids, np.array([1, 0, 1]), np.array([0.9, 0.2, 0.4]), 0.5)
    with open(tmp_path / "confusion.csv", newline="") as f:
        assert [row["id"] for row in csv.DictReader(f)] == ["gs/=1+1.png", "'-x.png", "plain.png"]


def test_site_rocs(tmp_path):
    sites = np.array(["A"] * 6 + ["B"] * 4)
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 0, 0, 0])  # site B holds one class: named in the legend, no curve
    prob = np.array([0.9, 0.6, 0.1, 0.4, 0.8, 0.2, 0.7, 0.1, 0.2, 0.3])
    plot_site_rocs(tmp_path / "by_site.png", labels, prob, sites, "test")
    assert (tmp_path / "by_site.png").stat().st_size > 1000


def test_burden_plot(tmp_path):
    biopsies = np.array(["A", "A", "A", "A", "B", "B", "B", "B", "B", "C", "C"])
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    prob = np.array([0.9, 0.2, 0.1, 0.1, 0.6, 0.2, 0.1, 0.1, 0.0, 0.8, 0.4])
    plot_burden(biopsy_burden(biopsies, prob, prob >= 0.5, labels), 0.2, tmp_path / "burden.png", "title")
    assert (tmp_path / "burden.png").read_bytes()[:4] == b"\x89PNG"


def test_reliability_csv_holds_the_filled_bins(tmp_path):
    labels = np.array([0, 0, 1, 1, 1])
    prob = np.array([0.05, 0.15, 0.12, 0.85, 0.95])  # bins [0, .1): 1 image, [.1, .2): 2, [.8, .9): 1, [.9, 1]: 1
    report = {"method": "temperature", "temperature": 1.5, "ece": 0.1, "brier": 0.05, "ece_uncalibrated": 0.2}
    write_reliability(tmp_path, labels, prob, prob, report)
    with open(tmp_path / "reliability.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["bin_low", "bin_high", "count", "mean_probability", "fraction_positive"]
    assert [(r["bin_low"], r["count"], r["fraction_positive"]) for r in rows] == [
        ("0.00", "1", "0.000000"), ("0.10", "2", "0.500000"), ("0.80", "1", "1.000000"), ("0.90", "1", "1.000000")]
    assert rows[1]["mean_probability"] == "0.135000"
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_dvc_yaml_plots_name_the_columns_evaluate_writes():
    """dvc.yaml's `plots:` (x and y) and the CSVs evaluate writes (and review reads back) use the same columns."""
    import yaml

    from conftest import ROOT
    from glomeruli.evaluation.outputs import CONFUSION_NAME, PR_NAME, ROC_NAME, PlotColumn

    plots = {name: spec for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
             if isinstance(entry, dict) for name, spec in entry.items()}
    expected = {"Confusion matrix (test)": (PlotColumn.ACTUAL, CONFUSION_NAME, PlotColumn.PREDICTED),
                "ROC (test)": (PlotColumn.FPR, ROC_NAME, PlotColumn.TPR),
                "Precision-recall (test)": (PlotColumn.RECALL, PR_NAME, PlotColumn.PRECISION)}
    for name, (x, file_name, y) in expected.items():
        assert plots[name]["x"] == x, name
        assert plots[name]["y"] == {f"metrics/plots/{file_name}": y}, name
