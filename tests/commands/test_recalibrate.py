"""`glomeruli recalibrate`: a site refits temperature and threshold on its own labelled biopsies; new metadata
beside the model, the model's own untouched, `predict --meta` predicts with it."""

import csv
import json
import logging
import math

import numpy as np
import pytest

from glomeruli.commands import cli
from glomeruli.model.metadata import CLASS_NAMES, DatasetLayout, MetadataError, read_metadata, write_metadata
from glomeruli.commands.recalibrate import (LabelledScores, RecalibrationError, check_output, default_output,
                                   recalibrate_scores, recalibrated_metadata)

from handmade import labelled_folder, model_metadata, save_grey_model, stand_in_model


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def _scores(logits, labels, biopsies) -> LabelledScores:
    """What the model said (raw probabilities, temperature 1) of labelled images of the given biopsies."""
    return LabelledScores(np.array([f"img{i}.png" for i in range(len(labels))], dtype=object),
                          np.asarray(labels, dtype=int), np.asarray(biopsies, dtype=object), _sigmoid(logits))


# ---------------------------------------------------------------------------------------- the refit itself

@pytest.mark.parametrize("t_true", [2.5, 0.5])
def test_a_known_temperature_is_recovered(t_true):
    """A model over- (T > 1) or under-confident (T < 1): its logit is t_true times the true log-odds the labels are
    drawn from."""
    rng = np.random.default_rng(0)
    true_log_odds = rng.normal(0.0, 1.5, 4000)
    labels = (rng.random(4000) < _sigmoid(true_log_odds)).astype(int)
    biopsies = np.repeat([f"B{b:03d}" for b in range(200)], 20)
    result = recalibrate_scores(_scores(true_log_odds * t_true, labels, biopsies), old_temperature=1.0,
                                old_threshold=0.5, rule="max_f1", bootstrap_resamples=0)
    assert result.temperature == pytest.approx(t_true, rel=0.08)
    assert result.old_temperature == 1.0 and result.old_threshold == 0.5
    assert result.after["ece"] < result.before["ece"]  # the refitted probabilities say what they mean
    assert result.images == {CLASS_NAMES[0]: int(np.sum(labels == 0)), CLASS_NAMES[1]: int(np.sum(labels == 1))}
    assert result.n_biopsies == 200 and result.before_ci95 == {} and result.after_ci95 == {}


def _gap_set():
    """A site whose scores sit lower than the training site's: non-sclerotic logits -5 ... -2, sclerotic 0 ... 3,
    evenly spread over 12 biopsies that each hold both classes. The gap between them is (-2, 0)."""
    negatives, positives = np.linspace(-5.0, -2.0, 48), np.linspace(0.0, 3.0, 24)
    logits = np.concatenate([negatives, positives])
    labels = np.array([0] * 48 + [1] * 24)
    biopsies = np.array([f"B{i % 12}" for i in range(48)] + [f"B{i % 12}" for i in range(24)], dtype=object)
    return _scores(logits, labels, biopsies)


@pytest.mark.parametrize("rule", ["max_f1", "youden"])
def test_a_known_threshold_is_recovered_on_a_shifted_set(rule):
    # the old threshold 0.7 (logit 0.847) misses the sclerotic images between logit 0 and 0.847
    result = recalibrate_scores(_gap_set(), old_temperature=1.0, old_threshold=0.7, rule=rule,
                                bootstrap_resamples=40)
    # separated: no temperature fits, the metadata's 1.0 stays; the threshold is centred in the gap (-2, 0) in
    # logit space: sigmoid(-1)
    assert result.temperature == 1.0
    assert result.threshold == pytest.approx(1 / (1 + math.exp(1)), abs=1e-9)
    assert result.threshold_rule == rule
    assert result.before["recall"] == pytest.approx(17 / 24)  # 7 of 24 sclerotic logits (0, 3/23 ... 18/23) < 0.847
    assert result.after["recall"] == 1.0 and result.after["accuracy"] == 1.0
    interval = result.before_ci95["recall"]
    assert interval["low"] <= result.before["recall"] <= interval["high"] < 1.0
    assert result.bootstrap["unit"] == "biopsy" and result.bootstrap["units"] == 12
    assert result.biopsies == {CLASS_NAMES[0]: 12, CLASS_NAMES[1]: 12} and result.warnings == []


def test_a_separated_set_keeps_the_metadatas_temperature(caplog):
    with caplog.at_level(logging.WARNING):
        result = recalibrate_scores(_gap_set(), old_temperature=2.0, old_threshold=0.5, rule="max_f1",
                                    bootstrap_resamples=0)
    assert result.temperature == 2.0
    # at T = 2 the gap (-2, 0) becomes (-1, 0) in calibrated logits: centred at -0.5
    assert result.threshold == pytest.approx(1 / (1 + math.exp(0.5)), abs=1e-9)
    assert "temperature kept at the metadata's 2.000" in caplog.text and "perfectly separated" in caplog.text


def test_the_fixed_rule_keeps_the_threshold(caplog):
    with caplog.at_level(logging.WARNING):
        result = recalibrate_scores(_gap_set(), old_temperature=1.0, old_threshold=0.7, rule="fixed",
                                    bootstrap_resamples=0)
    assert result.threshold == 0.7 and "--threshold-rule" in caplog.text


def test_one_class_or_one_biopsy_is_refused():
    with pytest.raises(RecalibrationError, match=f"no labelled {CLASS_NAMES[1]} image"):
        recalibrate_scores(_scores([-1.0, -2.0, -3.0], [0, 0, 0], ["A", "B", "C"]), old_temperature=1.0,
                           old_threshold=0.5, rule="max_f1")
    with pytest.raises(RecalibrationError, match="1 biopsy only"):
        recalibrate_scores(_scores([-1.0, 2.0, -3.0], [0, 1, 0], ["A", "A", "A"]), old_temperature=1.0,
                           old_threshold=0.5, rule="max_f1")


def test_few_biopsies_per_class_are_warned_about(caplog):
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 20)
    logits = rng.normal(0.0, 1.0, 40) + 1.5 * labels
    biopsies = np.array(["A"] * 20 + ["B"] * 20, dtype=object)
    with caplog.at_level(logging.WARNING):
        result = recalibrate_scores(_scores(logits, labels, biopsies), old_temperature=1.0, old_threshold=0.5,
                                    rule="max_f1", bootstrap_resamples=0)
    assert len(result.warnings) == 2 and "glomeruli from 2 biopsies only" in caplog.text


# ---------------------------------------------------------------------------------------- the metadata

def test_recalibrated_metadata_round_trips_beside_the_model(tmp_path):
    model = stand_in_model(tmp_path / "models" / "model.keras")
    write_metadata(model, model_metadata(model))
    result = recalibrate_scores(_gap_set(), old_temperature=1.0, old_threshold=0.7, rule="max_f1",
                                bootstrap_resamples=20)
    new = recalibrated_metadata(read_metadata(model), result, folder=tmp_path / "site b", source=model)
    output = default_output(model, tmp_path / "site b")
    assert output == model.with_name("model.recalibrated-site_b.meta.json")
    write_metadata(model, new, output)
    again = read_metadata(model, output)
    assert again == new and again.recalibration["folder"] == str(tmp_path / "site b")
    assert (again.temperature, again.threshold) == (result.temperature, result.threshold)
    assert again.recalibration["old_threshold"] == 0.7 and "optimistic" in again.recalibration["after_note"]
    assert read_metadata(model).recalibration is None and read_metadata(model).threshold == 0.7


def test_metadata_for_another_model_or_missing_is_refused(tmp_path):
    model = stand_in_model(tmp_path / "models" / "model.keras")
    other = tmp_path / "other.meta.json"
    write_metadata(model, model_metadata(model, model_sha256="0" * 64), other)
    with pytest.raises(MetadataError, match="checksum differs.*glomeruli recalibrate"):
        read_metadata(model, other)
    with pytest.raises(MetadataError, match="not found"):
        read_metadata(model, tmp_path / "absent.meta.json")
    (tmp_path / "bad.meta.json").write_text(json.dumps({**json.loads(other.read_text()), "recalibration": [1]}))
    with pytest.raises(MetadataError, match="recalibration is list"):
        read_metadata(model, tmp_path / "bad.meta.json")


def test_the_model_and_its_own_metadata_are_never_the_output(tmp_path):
    model = stand_in_model(tmp_path / "models" / "model.keras")
    write_metadata(model, model_metadata(model))
    for protected in (model.with_name("model.meta.json"), model, tmp_path / "models" / ".." / "models" / "model.keras"):
        with pytest.raises(RecalibrationError, match="never replaces it"):
            check_output(protected, model, tmp_path / "site")
    check_output(default_output(model, tmp_path / "site"), model, tmp_path / "site")


# ---------------------------------------------------------------------------------------- end to end

SICK, HEALTHY = "sick", "healthy"
# Biopsy = first letter (the layout's group_regex). A site where sclerotic glomeruli look paler than in training:
# the shipped threshold (grey value 128) misses most of them, and the classes overlap (a temperature fits).
SITE = {SICK: {"a1": 150, "a2": 110, "b1": 135, "b2": 95, "c1": 120, "c2": 140, "d1": 105, "d2": 160, "e1": 125,
               "f1": 100},
        HEALTHY: {"a3": 60, "a4": 90, "b3": 112, "b4": 70, "c3": 80, "c4": 50, "d3": 98, "d4": 65, "e2": 85,
                  "f2": 118}}


def _logit_of_grey(value: float) -> float:
    return 0.06 * value - 7.68  # the grey model: 3 channels x 0.02, bias -7.68


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    """probability = sigmoid(0.06 * grey value - 7.68) for a flat grey image: 0.5 at 128. Its metadata: the
    `sick/` = 1, `healthy/` = 0 layout, biopsy id the first letter, threshold 0.5 (max_f1), temperature 1."""
    layout = DatasetLayout(class_dirs={SICK: 1, HEALTHY: 0}, labels_csv="truth.csv", group_regex=r"^(?P<group>[a-z])\d")
    return save_grey_model(tmp_path_factory.mktemp("grey") / "models" / "model.keras", threshold_rule="max_f1",
                           dataset_layout=layout)


@pytest.fixture()
def site_folder(tmp_path):
    return labelled_folder(tmp_path / "site_b", {f"{folder}/{name}.png": value for folder, images in SITE.items()
                                                for name, value in images.items()})


def _predicted(path) -> dict[str, tuple[int, float]]:
    with open(path, newline="") as f:
        return {row["name"]: (int(row["ground truth"]), float(row["probability"])) for row in csv.DictReader(f)}


def test_recalibrate_writes_new_metadata_and_predict_uses_it(grey_model, site_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    own = grey_model.with_name("model.meta.json")
    own_before = own.read_bytes()
    assert cli.main(["recalibrate", str(site_folder), "--model", str(grey_model), "--workers", "1",
                     "--bootstrap-resamples", "50"]) == 0
    assert own.read_bytes() == own_before  # the model's own metadata is untouched
    new_path = grey_model.with_name("model.recalibrated-site_b.meta.json")
    new = json.loads(new_path.read_text())
    record = new["recalibration"]
    assert new["temperature"] == record["temperature"] != 1.0  # overlapping classes: a temperature is fitted
    assert new["threshold"] == record["threshold"] and 0.05 < new["threshold"] < 0.5  # paler sclerotic: lower
    assert (record["old_temperature"], record["old_threshold"]) == (1.0, 0.5)
    assert record["images"] == {CLASS_NAMES[0]: 10, CLASS_NAMES[1]: 10}
    assert record["biopsies"] == {CLASS_NAMES[0]: 6, CLASS_NAMES[1]: 6} and record["folder"] == str(site_folder)
    assert record["before"]["recall"] == pytest.approx(4 / 10)  # 150, 135, 140, 160 are above grey 128
    assert record["after"]["recall"] > record["before"]["recall"]
    assert set(record["after_ci95"]) >= {"accuracy", "recall", "roc_auc", "brier", "ece"}
    assert {k: v for k, v in new.items() if k not in ("temperature", "threshold", "recalibration")} == {
        k: v for k, v in json.loads(own_before).items() if k not in ("temperature", "threshold", "recalibration")}
    printed = capsys.readouterr().out
    assert "recalibrated on 20 labelled images" in printed and "temperature 1.000 ->" in printed

    out = tmp_path / "with_new.csv"
    assert cli.main(["predict", str(site_folder), "-r", "--model", str(grey_model), "--meta", str(new_path),
                     "-o", str(out), "--workers", "1"]) == 0
    predicted = _predicted(out)
    for folder, images in SITE.items():
        for name, value in images.items():
            label, probability = predicted[f"{folder}/{name}.png"]
            expected = float(_sigmoid(_logit_of_grey(value) / new["temperature"]))
            assert probability == pytest.approx(expected, abs=2e-6)
            assert label == int(expected >= new["threshold"])
    assert json.loads((tmp_path / "with_new.metrics.json").read_text())["threshold"] == new["threshold"]


def test_recalibrate_refuses_to_replace_the_models_metadata(grey_model, site_folder, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    own = grey_model.with_name("model.meta.json")
    own_before = own.read_bytes()
    assert cli.main(["recalibrate", str(site_folder), "--model", str(grey_model), "-o", str(own)]) == 1
    assert "never replaces it" in capfd.readouterr().err and own.read_bytes() == own_before


def test_predict_refuses_metadata_of_another_model(grey_model, site_folder, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.meta.json"
    other.write_text(json.dumps({**json.loads(grey_model.with_name("model.meta.json").read_text()),
                                 "model_sha256": "0" * 64}))
    out = tmp_path / "out.csv"
    assert cli.main(["predict", str(site_folder), "-r", "--model", str(grey_model), "--meta", str(other),
                     "-o", str(out), "--workers", "1"]) == 1
    assert "checksum differs" in capfd.readouterr().err and not out.exists()


def test_an_unlabelled_folder_is_refused(grey_model, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "loose"
    folder.mkdir()
    (folder / "a1.png").write_bytes(b"not read")
    assert cli.main(["recalibrate", str(folder), "--model", str(grey_model)]) == 1
    assert "no labelled image in the model's training layout" in capfd.readouterr().err
    assert not grey_model.with_name("model.recalibrated-loose.meta.json").exists()
