"""Prediction on a folder: same preprocessing as training, bad files skipped by name, never a crash."""

import csv
import json
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


# ---------------------------------------------------------------------------------------- folders, scoring

GS, NON_GS = "globally_sclerotic_glomeruli", "non_globally_sclerotic_glomeruli"


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    """probability = sigmoid(0.02 * (R + G + B mean) - 7.68): a flat grey image of value v is called
    globally sclerotic (threshold 0.5) exactly when v > 128, so every score below is known by hand."""
    import keras

    inputs = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([np.full((3, 1), 0.02, np.float32), np.array([-7.68], np.float32)])
    path = tmp_path_factory.mktemp("grey") / "model.keras"
    model.save(path)
    write_metadata(path, ModelMetadata(image_size=32, fill=(0, 0, 0), threshold=0.5, threshold_rule="fixed",
                                       class_names=CLASS_NAMES, model_sha256=file_sha256(path), max_pixels=10**6))
    return path


def _grey_png(path, value: int) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", np.full((32, 32, 3), value, np.uint8))[1].tobytes())


@pytest.fixture()
def labelled_batch(tmp_path):
    """The training layout: class folders, a public.csv beside them, one loose and one unsorted image, junk."""
    root = tmp_path / "batch"
    for name, value in {f"{GS}/g220.png": 220, f"{GS}/g200.png": 200, f"{GS}/g60.png": 60,
                        f"{NON_GS}/n180.png": 180, f"{NON_GS}/n70.png": 70, f"{NON_GS}/n50.png": 50,
                        f"{NON_GS}/n40.png": 40, f"{NON_GS}/n90.png": 90, "loose.png": 230,
                        "unsorted/u100.png": 100}.items():
        _grey_png(root / name, value)
    # g220 and n180 agree with their folders; loose.png is labelled by the csv only; n90 contradicts its folder
    (root / "public.csv").write_text("name,ground truth\ng220.png,1\nn180.png,0\nloose.png,0\nn90.png,1\n")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._g220.png").write_bytes(b"\x00\x05\x16\x07")
    (root / ".DS_Store").write_bytes(b"junk")
    return root


def test_labelled_folder_is_predicted_recursively_and_scores_itself(grey_model, labelled_batch, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the CMIL class folder names and public.csv apply
    out = tmp_path / "out" / "evaluation.csv"
    assert cli.main(["predict", str(labelled_batch), "--recursive", "--model", str(grey_model), "-o", str(out),
                     "--workers", "1", "--batch-size", "4"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    expected_names = sorted([f"{GS}/g200.png", f"{GS}/g220.png", f"{GS}/g60.png", "loose.png", f"{NON_GS}/n180.png",
                             f"{NON_GS}/n40.png", f"{NON_GS}/n50.png", f"{NON_GS}/n70.png", f"{NON_GS}/n90.png",
                             "unsorted/u100.png"])
    assert [r[0] for r in rows[1:]] == expected_names  # names relative to the folder; csv and junk not predicted

    report = json.loads((tmp_path / "out" / "evaluation.metrics.json").read_text())
    # Scored: GS 220, 200, 60 and non-GS 180, 70, 50, 40 (folders) + 230 (csv); predicted GS when > 128.
    # tp = 220, 200; fp = 180, 230; fn = 60; tn = 70, 50, 40.
    m = report["metrics"]
    assert report["n_scored"] == 8 and report["n_predicted"] == 10 and report["threshold"] == 0.5
    assert m["confusion_matrix"] == {"tn": 3, "fp": 2, "fn": 1, "tp": 2}
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    assert m["roc_auc"] == pytest.approx(10 / 15)  # 220 and 200 beat 4 negatives each, 60 beats 50 and 40
    assert report["label_conflicts"] == [{"name": f"{NON_GS}/n90.png", "folder_label": 0, "csv_label": 1}]
    assert report["unlabelled"] == ["unsorted/u100.png"]
    assert report["labels_from"] == ["class folders", "public.csv"]
    assert (tmp_path / "out" / "evaluation.confusion_matrix.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "score on 8 of 10 predicted images" in printed and "actual 1 (GS)" in printed


def test_subfolders_without_recursive_stop_with_one_line(grey_model, labelled_batch, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "evaluation.csv"
    assert cli.main(["predict", str(labelled_batch), "--model", str(grey_model), "-o", str(out)]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if "subfolders" in line]
    assert len(errors) == 1 and f"{GS}/, {NON_GS}/, unsorted/" in errors[0] and "--recursive" in errors[0]
    assert "__MACOSX" not in errors[0] and not out.exists()


def test_nothing_predicted_exits_non_zero_and_keeps_decoder_noise_off(grey_model, tmp_path, monkeypatch, capfd):
    from badfiles import png_with_bad_filter

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "bad_filter.png").write_bytes(png_with_bad_filter())
    out = tmp_path / "evaluation.csv"
    assert cli.main(["predict", str(folder), "--model", str(grey_model), "-o", str(out), "--workers", "1"]) == 1
    err = capfd.readouterr().err
    assert "no image of" in err and "could be predicted" in err and not out.exists()
    assert "bad_filter.png: corrupt or truncated image (OpenCV could not decode it: bad adaptive filter value)" in err
    assert not [line for line in err.splitlines() if "libpng" in line], err
