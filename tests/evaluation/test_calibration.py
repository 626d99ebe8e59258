"""Calibration: Brier score and ECE against hand-computed values, temperature scaling recovers a known
temperature, and `glomeruli predict` applies the temperature stored with the model."""

import csv
import shutil

import numpy as np
import pytest

from glomeruli.commands import cli
from glomeruli.evaluation.calibration import (apply_temperature, brier_score, expected_calibration_error, fit_temperature,
                                   reliability_bins)
from glomeruli.model.metadata import CLASS_NAMES, ModelMetadata, file_sha256, read_metadata, write_metadata
from glomeruli.model.efficientnet import build_model


def test_brier_and_ece_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 0.75, 0.72, 0.78])
    # Brier: mean of (p - y)^2
    by_hand = (0.05**2 + 0.15**2 + 0.05**2 + 0.25**2 + 0.28**2 + 0.78**2) / 6
    assert brier_score(y, p) == pytest.approx(by_hand)
    # ECE, 10 equal bins: [0,.1) {0.05: y 0}, [.1,.2) {0.15: y 0}, [.7,.8) {0.75, 0.72, 0.78: y 1,1,0}, [.9,1] {0.95: y 1}
    ece = (1 / 6 * 0.05 + 1 / 6 * 0.15 + 3 / 6 * abs((0.75 + 0.72 + 0.78) / 3 - 2 / 3) + 1 / 6 * 0.05)
    assert expected_calibration_error(y, p) == pytest.approx(ece)
    bins = reliability_bins(y, p)
    assert [b.count for b in bins] == [1, 1, 0, 0, 0, 0, 0, 3, 0, 1]
    assert bins[7].fraction_positive == pytest.approx(2 / 3) and np.isnan(bins[2].mean_probability)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0  # 1.0 falls in the last bin


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20000)
    y = (rng.uniform(size=true_logits.size) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = 1 / (1 + np.exp(-2.5 * true_logits))  # a model whose logits are 2.5x too large
    temperature = fit_temperature(y, overconfident)
    assert temperature == pytest.approx(2.5, rel=0.05)
    calibrated = apply_temperature(overconfident, temperature)
    assert expected_calibration_error(y, calibrated) < 0.02 < expected_calibration_error(y, overconfident)
    assert np.array_equal(apply_temperature(overconfident, 1.0), overconfident)


def test_old_metadata_reads_as_uncalibrated(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"not really a model")
    meta = ModelMetadata(image_size=32, fill=(0, 0, 0), threshold=0.5, threshold_rule="fixed", class_names=CLASS_NAMES,
                         model_sha256=file_sha256(model), max_pixels=10**8)
    write_metadata(model, meta)
    raw = (tmp_path / "model.meta.json").read_text().replace('"temperature": 1.0', '"unused": 0')
    (tmp_path / "model.meta.json").write_text(raw)
    assert "temperature" not in raw and read_metadata(model).temperature == 1.0


@pytest.mark.slow
def test_predict_applies_the_stored_temperature(tmp_path, tiny_data):
    model = build_model(32, "none", 0.3)
    dense = model.get_layer("head").get_layer("probability")
    rng = np.random.default_rng(1)
    dense.set_weights([rng.normal(0, 1.0, dense.kernel.shape).astype(np.float32), np.array([1.5], np.float32)])
    path = tmp_path / "model.keras"
    model.save(path)
    temperature = 2.5
    write_metadata(path, ModelMetadata(image_size=32, fill=(0, 0, 0), threshold=0.6, threshold_rule="max_f1",
                                       class_names=CLASS_NAMES, model_sha256=file_sha256(path), max_pixels=10**8,
                                       temperature=temperature))
    folder = tmp_path / "images"
    folder.mkdir()
    for image in sorted((tiny_data.raw / "globally_sclerotic_glomeruli").glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
    out = tmp_path / "evaluation.csv"
    assert cli.main(["predict", str(folder), "--model", str(path), "-o", str(out), "--workers", "1",
                     "--batch-size", "4", "--devices", "1"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    from glomeruli.data.images import load_model_input

    x = np.stack([load_model_input((folder / r["name"]).read_bytes(), r["name"], 32, (0, 0, 0), 10**8) for r in rows])
    raw = model.predict(x.astype(np.float32), verbose=0).ravel().astype(np.float64)
    expected = 1 / (1 + np.exp(-np.log(raw / (1 - raw)) / temperature))
    assert not np.allclose(expected, raw, atol=1e-3)  # the test can tell calibrated from raw
    np.testing.assert_allclose([float(r["probability"]) for r in rows], expected, atol=2e-6)
    assert [int(r["ground truth"]) for r in rows] == [int(p >= 0.6) for p in expected]


def test_a_separated_validation_set_keeps_temperature_one_and_the_ranking(caplog):
    # Every positive above every negative: the likelihood has no minimum, T would run to its bound.
    y = np.array([0] * 20 + [1] * 20)
    prob = np.concatenate([np.linspace(0.02, 0.40, 20), np.linspace(0.45, 0.999, 20)])
    with caplog.at_level("WARNING"):
        assert fit_temperature(y, prob) == 1.0
    assert "perfectly separated" in caplog.text
    from sklearn.metrics import roc_auc_score

    calibrated = apply_temperature(prob, fit_temperature(y, prob))
    assert roc_auc_score(y, calibrated) == roc_auc_score(y, prob) == 1.0


def test_too_few_images_of_a_class_keep_temperature_one(caplog):
    y = np.array([0] * 30 + [1] * 4)
    prob = np.random.default_rng(3).uniform(0.01, 0.99, y.size)
    with caplog.at_level("WARNING"):
        assert fit_temperature(y, prob) == 1.0
    assert "fewer than 5 of a class" in caplog.text


def test_ranking_score_keeps_order_where_a_small_temperature_saturates():
    from sklearn.metrics import roc_auc_score

    from glomeruli.evaluation.calibration import ranking_score

    # Three positives and three negatives interleaved among saturated probabilities: T = 0.05 sends every
    # one of them to exactly 1.0 in float64, so calibrated probabilities tie; the calibrated logit does not.
    prob = np.array([0.9990, 0.9991, 0.9992, 0.9993, 0.9994, 0.9995])
    y = np.array([0, 1, 0, 1, 0, 1])
    saturated = apply_temperature(prob, 0.05)
    assert np.all(saturated == 1.0)
    assert roc_auc_score(y, saturated) == 0.5  # all tied
    # By hand: pairs (pos, neg) with pos above neg: 0.9991>0.9990; 0.9993>0.9990,0.9992; 0.9995>all three = 6 of 9
    assert roc_auc_score(y, ranking_score(prob, 0.05)) == pytest.approx(6 / 9)
    assert roc_auc_score(y, prob) == pytest.approx(6 / 9)


def test_a_noisy_small_set_gets_a_temperature_inside_its_bounds():
    # One negative above one positive (not separated), very confident otherwise: without the prior toward T = 1
    # the fit would go far below 0.1.
    y = np.array([0] * 6 + [1] * 6)
    prob = np.array([1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 0.9] + [0.1, 1 - 1e-6, 1 - 2e-6, 1 - 3e-6, 1 - 4e-6, 1 - 5e-6])
    from glomeruli.evaluation.calibration import TEMPERATURE_BOUNDS

    temperature = fit_temperature(y, prob)
    assert TEMPERATURE_BOUNDS[0] * 1.01 < temperature < TEMPERATURE_BOUNDS[1]
