"""Prediction on a folder: same preprocessing as training, bad files skipped by name, never a crash."""

import csv
import shutil

import numpy as np
import pytest

from glomeruli import cli
from glomeruli.images import load_model_input
from glomeruli.metadata import CLASS_NAMES, ModelMetadata, file_sha256, write_metadata
from glomeruli.model import build_model
from glomeruli.predict import predict_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    folder = tmp_path_factory.mktemp("model")
    model = build_model(32, "none", 0.3)
    path = folder / "model.keras"
    model.save(path)
    write_metadata(path, ModelMetadata(image_size=32, fill=(0, 0, 0), threshold=0.5, threshold_rule="fixed",
                                       class_names=CLASS_NAMES, model_sha256=file_sha256(path), max_pixels=10**8))
    return path, model


@pytest.fixture()
def messy_folder(tmp_path, tiny_data):
    images = sorted((tiny_data.raw / "globally_sclerotic_glomeruli").glob("*.png"))[:3]
    images += sorted((tiny_data.raw / "non_globally_sclerotic_glomeruli").glob("*.png"))[:4]
    for image in images:
        shutil.copy(image, tmp_path / image.name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    data = images[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    return tmp_path, sorted(p.name for p in images)


def test_bad_files_are_skipped_by_name(trained, messy_folder):
    folder, good = messy_folder
    predictions, skipped = predict_folder(trained[0], folder, batch_size=3, workers=2)
    assert [p.name for p in predictions] == good
    assert sorted(s.name for s in skipped) == ["empty.png", "notes.txt", "truncated.png"]
    assert all(s.reason for s in skipped)


def test_probabilities_use_the_training_preprocessing(trained, messy_folder):
    path, model = trained
    folder, good = messy_folder
    predictions, _ = predict_folder(path, folder, batch_size=4, workers=1)
    x = np.stack([load_model_input((folder / n).read_bytes(), n, 32, (0, 0, 0), 10**8) for n in good])
    expected = model.predict(x.astype("float32"), verbose=0).ravel()
    np.testing.assert_allclose([p.probability for p in predictions], expected, rtol=1e-5, atol=1e-6)
    assert all(p.label == int(p.probability >= 0.5) for p in predictions)


def test_cli_writes_a_csv_scorable_against_public_csv(trained, messy_folder, tmp_path_factory):
    folder, good = messy_folder
    out = tmp_path_factory.mktemp("out") / "evaluation.csv"
    assert cli.main(["predict", str(folder), "--model", str(trained[0]), "-o", str(out), "--batch-size", "2"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["name", "ground truth", "probability"]
    assert [r[0] for r in rows[1:]] == good
    assert all(r[1] in ("0", "1") and 0.0 <= float(r[2]) <= 1.0 for r in rows[1:])


def test_cli_refuses_a_model_without_metadata(tmp_path, trained, messy_folder, capfd):
    shutil.copy(trained[0], tmp_path / "other.keras")
    assert cli.main(["predict", str(messy_folder[0]), "--model", str(tmp_path / "other.keras")]) == 1
    assert "other.meta.json not found" in capfd.readouterr().err
