"""The evaluate stage's review outputs after a real `dvc repro` (session fixture pipeline_repo, read only):
intervals, calibration, per-biopsy burden, test predictions, error and Grad-CAM sheets, declared plots."""

import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from glomeruli.commands import cli
from glomeruli.data.h5store import ImageStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outputs(pipeline_repo):
    report = json.loads((pipeline_repo / "metrics/evaluate.json").read_text())
    meta = json.loads((pipeline_repo / "models/model.meta.json").read_text())

    def table(name):
        with open(pipeline_repo / "metrics/plots" / name) as f:
            return list(csv.DictReader(f))

    return report, meta, table


def test_report_shape_intervals_and_calibration(outputs, pipeline_repo):
    report, meta, _ = outputs
    params = yaml.safe_load((pipeline_repo / "params.yaml").read_text())["evaluate"]
    test = report["test"]
    assert set(test["confusion_matrix"]) == {"tn", "fp", "fn", "tp"} and sum(test["confusion_matrix"].values()) == test["n"]
    scalars = {k for k in test if k not in ("n", "confusion_matrix")}
    assert set(report["test_ci95"]) == scalars
    for name, interval in report["test_ci95"].items():
        if interval["low"] is not None:
            assert interval["low"] <= test[name] + 1e-9 and test[name] <= interval["high"] + 1e-9, name
    assert report["bootstrap"]["resamples"] == params["bootstrap_resamples"] > 0
    assert report["bootstrap"]["unit"] == "biopsy"
    calibration = report["calibration"]
    assert calibration["method"] == params["calibration"] and calibration["temperature"] == meta["temperature"] > 0
    assert 0 <= calibration["brier"] <= 1 and 0 <= calibration["ece"] <= 1
    assert meta["threshold"] == report["threshold"]


def test_test_predictions_match_the_report(outputs):
    report, meta, table = outputs
    rows = table("test_predictions.csv")
    assert len(rows) == report["test"]["n"] and len({r["name"] for r in rows}) == len(rows)
    raw = np.array([float(r["probability"]) for r in rows])
    calibrated = np.array([float(r["calibrated_probability"]) for r in rows])

    def by_hand(raw_probability):
        p = np.clip(raw_probability, 1e-7, 1 - 1e-7)
        return 1 / (1 + np.exp(-np.log(p / (1 - p)) / meta["temperature"]))

    # The CSV rounds the raw probability to 6 decimals; near 0 or 1 that half-unit moves the logit, and so the
    # calibrated value, by more than its own rounding (raw 0.998814, T 2.19: 8e-6), so check against that band.
    low, high = by_hand(raw - 5e-7), by_hand(raw + 5e-7)
    assert ((calibrated >= low - 1e-6) & (calibrated <= high + 1e-6)).all(), (calibrated, low, high)
    np.testing.assert_allclose(calibrated, by_hand(raw), atol=1e-4)
    labels, predicted = np.array([int(r["label"]) for r in rows]), np.array([int(r["predicted"]) for r in rows])
    assert (predicted == (calibrated >= report["threshold"] - 1e-6)).all()
    assert int(((labels == 1) & (predicted == 1)).sum()) == report["test"]["confusion_matrix"]["tp"]
    assert int(((labels == 0) & (predicted == 1)).sum()) == report["test"]["confusion_matrix"]["fp"]
    assert all(r["name"].startswith(r["biopsy"] + "_PAS_") for r in rows)


def test_by_site_counts_and_rates_by_hand(outputs, pipeline_repo):
    """The fixture has three synthetic sites; by_site counts and rates recounted from test_predictions.csv."""
    report, _, table = outputs
    rows = table("test_predictions.csv")
    assert {r["site"] for r in rows} <= {"SITE1", "SITE2", "SITE3"}
    assert all(r["name"].startswith(f"SYNTH-{r['site']}_") for r in rows)
    assert set(report["by_site"]) == {r["site"] for r in rows}
    for site, values in report["by_site"].items():
        mine = [r for r in rows if r["site"] == site]
        positives = [r for r in mine if r["label"] == "1"]
        negatives = [r for r in mine if r["label"] == "0"]
        assert values["n"] == len(mine) and values["sclerotic"] == len(positives)
        assert values["biopsies"] == len({r["biopsy"] for r in mine})
        if positives:
            assert values["recall"] == pytest.approx(sum(r["predicted"] == "1" for r in positives) / len(positives))
        if negatives:
            assert values["specificity"] == pytest.approx(
                sum(r["predicted"] == "0" for r in negatives) / len(negatives))
    assert (pipeline_repo / "metrics/plots/by_site.png").stat().st_size > 0


def test_burden_and_reliability_tables(outputs, pipeline_repo):
    """burden.csv against plain counting: the test images named by the split, each labelled by the class folder
    it sits in, grouped by the biopsy id before `_PAS_` in its name, predicted sclerotic at the chosen threshold."""
    report, meta, table = outputs
    split = json.loads((pipeline_repo / "data/processed/split.json").read_text())
    with ImageStore(pipeline_repo / "data/processed/augmented.h5") as store:
        test_names = sorted(str(store.meta.ids[row]).rsplit("/", 1)[-1] for row in split["test"])
    label_of = {path.name: label for folder, label in (("globally_sclerotic_glomeruli", 1),
                                                        ("non_globally_sclerotic_glomeruli", 0))
                for path in (pipeline_repo / "data/raw" / folder).iterdir()}
    rows = table("test_predictions.csv")
    assert sorted(r["name"] for r in rows) == test_names
    counts: dict[str, list] = {}  # biopsy -> [images, truly sclerotic, predicted sclerotic, sum of probabilities]
    for r in rows:
        probability = float(r["calibrated_probability"])
        count = counts.setdefault(r["name"].split("_PAS_")[0], [0, 0, 0, 0.0])
        count[0] += 1
        count[1] += label_of[r["name"]]
        count[2] += probability >= meta["threshold"] - 1e-6  # the csv rounds probabilities to 6 decimals
        count[3] += probability
    burden = table("burden.csv")
    assert [b["biopsy"] for b in burden] == sorted(counts)
    errors = []
    for b in burden:
        n, sclerotic, predicted, probabilities = counts[b["biopsy"]]
        true_pct, predicted_pct = 100 * sclerotic / n, 100 * predicted / n
        assert int(b["glomeruli"]) == n
        assert float(b["true_pct"]) == pytest.approx(true_pct, abs=0.005)
        assert float(b["predicted_pct"]) == pytest.approx(predicted_pct, abs=0.005)
        assert float(b["mean_probability_pct"]) == pytest.approx(100 * probabilities / n, abs=0.006)
        assert float(b["error_pct_points"]) == pytest.approx(predicted_pct - true_pct, abs=0.005)
        errors.append(abs(predicted_pct - true_pct))
    assert report["burden"]["mae_pct_points"] == pytest.approx(sum(errors) / len(errors), abs=1e-6)
    assert report["burden"]["n_biopsies"] == len(counts) and report["burden"]["n_glomeruli"] == len(test_names)
    assert sum(int(r["count"]) for r in table("reliability.csv")) == report["test"]["n"] == len(test_names)


def test_pictures_exist_and_dvc_declares_the_plots(pipeline_repo):
    plots = pipeline_repo / "metrics/plots"
    for name in ("errors.png", "gradcam.png", "reliability.png", "burden.png", "confusion_matrix.png", "roc_pr.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG", name
    declared = set()
    for entry in yaml.safe_load((pipeline_repo / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, str):
            declared.add(entry)
        else:
            (spec,) = entry.values()
            declared.update(spec["y"])
    for name in ("reliability.csv", "burden.csv", "reliability.png", "burden.png", "errors.png", "gradcam.png"):
        assert f"metrics/plots/{name}" in declared, name


def test_predict_by_biopsy_on_the_trained_model(pipeline_repo, tmp_path, outputs):
    report, meta, table = outputs
    ingest = yaml.safe_load((pipeline_repo / "params.yaml").read_text())["ingest"]
    # predict reads the biopsy ids with the group_regex the model's metadata carries, not params.yaml
    assert meta["dataset_layout"] == {"class_dirs": ingest["class_dirs"], "labels_csv": ingest["labels_csv"],
                                      "group_regex": ingest["group_regex"]}
    rows = table("test_predictions.csv")
    folder = tmp_path / "new"
    folder.mkdir()
    chosen = rows[:6]
    for r in chosen:
        source = next((pipeline_repo / "data/raw").rglob(r["name"]))
        shutil.copy(source, folder / r["name"])
    out, summary = tmp_path / "evaluation.csv", tmp_path / "biopsies.csv"
    assert cli.main(["predict", str(folder), "--model", str(pipeline_repo / "models/model.keras"), "-o", str(out),
                     "--by-biopsy", str(summary), "--workers", "1", "--devices", "1"]) == 0
    with open(summary) as f:
        by_biopsy = list(csv.DictReader(f))
    biopsies = sorted({r["biopsy"] for r in chosen})
    assert [b["biopsy"] for b in by_biopsy] == biopsies and all(b["true_pct"] == "" for b in by_biopsy)
    for b in by_biopsy:  # the probabilities and labels evaluate wrote for the same images
        mine = [r for r in chosen if r["biopsy"] == b["biopsy"]]
        assert int(b["glomeruli"]) == len(mine)
        assert float(b["predicted_pct"]) == pytest.approx(100 * np.mean([int(r["predicted"]) for r in mine]), abs=0.01)
        assert float(b["mean_probability_pct"]) == pytest.approx(
            100 * np.mean([float(r["calibrated_probability"]) for r in mine]), abs=0.01)
