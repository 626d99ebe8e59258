"""Prediction on a folder: same preprocessing as training, bad files skipped by name, never a crash."""

import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from glomeruli.commands import cli
from glomeruli.data.h5store import ImageStore
from glomeruli.model.metadata import DatasetLayout, write_metadata
from glomeruli.model.efficientnet import build_model
from glomeruli.commands.predict import predict_folder

from handmade import GS, NON_GS, grey_png, labelled_folder, model_metadata, save_grey_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    folder = tmp_path_factory.mktemp("model")
    model = build_model(32, "none", 0.3)
    path = folder / "model.keras"
    model.save(path)
    write_metadata(path, model_metadata(path, image_size=32, threshold=0.5, threshold_rule="fixed", max_pixels=10**8))
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


@pytest.mark.slow  # loads and runs EfficientNetB3
def test_bad_files_are_skipped_by_name(trained, messy_folder):
    folder, good = messy_folder
    predictions, skipped = predict_folder(trained[0], folder, batch_size=3, workers=2)
    assert [p.name for p in predictions] == good
    assert sorted(s.name for s in skipped) == ["empty.png", "notes.txt", "truncated.png"]
    assert all(s.reason for s in skipped)


def _model_inputs_recorded(monkeypatch) -> list[np.ndarray]:
    """Every array predict hands the model, in order."""
    import glomeruli.commands.predict

    fed, real = [], glomeruli.commands.predict.predict_batch

    def recording(model, x, batch_size):
        fed.append(np.array(x))
        return real(model, x, batch_size)

    monkeypatch.setattr(glomeruli.commands.predict, "predict_batch", recording)
    return fed


@pytest.mark.slow  # loads and runs EfficientNetB3
def test_probabilities_use_the_training_preprocessing(trained, messy_folder, tiny_data, monkeypatch):
    """The model gets exactly the pixels the preprocess stage stored for training from the same files."""
    path, model = trained
    folder, good = messy_folder
    fed = _model_inputs_recorded(monkeypatch)
    predictions, _ = predict_folder(path, folder, batch_size=4, workers=1)
    with ImageStore(tiny_data.preprocessed) as store:
        assert store.image_size == 32 and tuple(store.attrs["fill"]) == (0, 0, 0)  # as the model's metadata says
        row_of = {str(record_id).rsplit("/", 1)[-1]: row for row, record_id in enumerate(store.meta.ids)}
        stored = store.read(np.array([row_of[name] for name in good]))
    assert [p.name for p in predictions] == good
    np.testing.assert_array_equal(np.concatenate(fed), stored.astype(np.float32))
    expected = model.predict(stored.astype("float32"), verbose=0).ravel()
    np.testing.assert_allclose([p.probability for p in predictions], expected, rtol=1e-5, atol=1e-6)
    assert all(p.label == int(p.probability >= 0.5) for p in predictions)


@pytest.mark.slow  # loads and runs EfficientNetB3
def test_predict_pads_with_the_models_fill_and_composites_transparency_over_it(trained, tmp_path, monkeypatch):
    """A 16x32 image whose longer side is the model's 32: no resampling, so every input pixel is known."""
    from PIL import Image

    from badfiles import encode_pil

    model_path = tmp_path / "model" / "model.keras"
    model_path.parent.mkdir()
    shutil.copy(trained[0], model_path)
    fill = (10, 200, 30)
    write_metadata(model_path, model_metadata(model_path, image_size=32, fill=fill, threshold=0.5,
                                              threshold_rule="fixed"))
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[..., 0] = np.arange(32) * 8  # red grows to the right, green down, blue constant: orientation shows
    rgba[..., 1] = np.arange(16)[:, None] * 16
    rgba[..., 2] = 77
    rgba[..., 3] = 255
    rgba[3, 5, 3] = 0  # one transparent pixel
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "wide.png").write_bytes(encode_pil(Image.fromarray(rgba, "RGBA"), "PNG"))
    fed = _model_inputs_recorded(monkeypatch)
    (prediction,), _ = predict_folder(model_path, folder, batch_size=2, workers=1)
    expected = np.empty((32, 32, 3), np.float32)
    expected[:] = fill  # 8 rows of fill above and below
    expected[8:24] = rgba[..., :3]
    expected[8 + 3, 5] = fill
    np.testing.assert_array_equal(fed[0][0], expected)
    assert prediction.probability == pytest.approx(float(trained[1].predict(expected[None], verbose=0)[0, 0]),
                                                   rel=1e-5, abs=1e-6)


@pytest.mark.slow  # loads and runs EfficientNetB3
def test_cli_writes_a_csv_scorable_against_public_csv(trained, messy_folder, tmp_path_factory):
    folder, good = messy_folder
    out = tmp_path_factory.mktemp("out") / "evaluation.csv"
    assert cli.main(["predict", str(folder), "--model", str(trained[0]), "-o", str(out), "--batch-size", "2"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["name", "ground truth", "probability"]
    assert [r[0] for r in rows[1:]] == good
    assert all(r[1] in ("0", "1") and 0.0 <= float(r[2]) <= 1.0 for r in rows[1:])


def test_cli_refuses_a_model_without_metadata(tmp_path, grey_model, messy_folder, capfd):
    shutil.copy(grey_model, tmp_path / "other.keras")
    assert cli.main(["predict", str(messy_folder[0]), "--model", str(tmp_path / "other.keras")]) == 1
    assert "other.meta.json not found" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------- folders, scoring

@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    """probability = sigmoid(0.02 * (R + G + B mean) - 7.68): a flat grey image of value v is called
    globally sclerotic (threshold 0.5) exactly when v > 128, so every score below is known by hand."""
    return save_grey_model(tmp_path_factory.mktemp("grey") / "model.keras")


@pytest.fixture()
def labelled_batch(tmp_path):
    """The training layout: class folders, a public.csv beside them, one loose and one unsorted image, junk."""
    # g220 and n180 agree with their folders; loose.png is labelled by the csv only; n90 contradicts its folder
    root = labelled_folder(tmp_path / "batch", {
        f"{GS}/g220.png": 220, f"{GS}/g200.png": 200, f"{GS}/g60.png": 60, f"{NON_GS}/n180.png": 180,
        f"{NON_GS}/n70.png": 70, f"{NON_GS}/n50.png": 50, f"{NON_GS}/n40.png": 40, f"{NON_GS}/n90.png": 90,
        "loose.png": 230, "unsorted/u100.png": 100}, "name,ground truth\ng220.png,1\nn180.png,0\nloose.png,0\nn90.png,1\n")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._g220.png").write_bytes(b"\x00\x05\x16\x07")
    (root / ".DS_Store").write_bytes(b"junk")
    return root


def test_labelled_folder_is_predicted_recursively_and_scores_itself(grey_model, labelled_batch, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the grey model's metadata records no layout: the CMIL names apply, with a warning
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
    # Scored, as ingest labels them: GS 220, 200, 60 and non-GS 180, 70, 50, 40 (n90's row contradicts its folder,
    # loose.png and u100 are outside the class folders); predicted GS when > 128.
    # tp = 220, 200; fp = 180; fn = 60; tn = 70, 50, 40.
    m = report["metrics"]
    assert report["n_scored"] == 7 and report["n_predicted"] == 10 and report["threshold"] == 0.5
    assert m["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 2}
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert m["roc_auc"] == pytest.approx(10 / 12)  # 220 and 200 beat 4 negatives each, 60 beats 50 and 40
    outside = f"outside the class folders (only files directly inside {GS}, {NON_GS} are used)"
    assert report["not_scored"] == [
        {"name": "loose.png", "reason": outside},
        {"name": f"{NON_GS}/n90.png",
         "reason": f"label conflict: folder '{NON_GS}' says 0, {labelled_batch}/public.csv says 1; fix one of them"},
        {"name": "unsorted/u100.png", "reason": outside}]
    assert report["labels_from"] == ["class folders", "public.csv"]
    assert (tmp_path / "out" / "evaluation.confusion_matrix.png").stat().st_size > 0
    printed = capsys.readouterr()
    assert "score on 7 of 10 predicted images" in printed.out and "actual 1 (GS)" in printed.out
    assert f"{grey_model.with_name('model.meta.json')} records no dataset layout" in printed.err
    assert "CMIL layout" in printed.err


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


def test_the_sample_datas_marker_is_not_reported_as_skipped(grey_model, tmp_path, monkeypatch, capfd):
    """A folder `glomeruli sample-data` wrote holds its SYNTHETIC_DATA.txt marker: predict passes over it in
    silence, and still names any other file that is no image."""
    from glomeruli.data.layout import MARKER_FILE
    from glomeruli.data.sample_data import generate_sample_dataset

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "sample"
    generate_sample_dataset(folder, 6, seed=0, size_range=(32, 48), workers=1, progress=False)
    assert (folder / MARKER_FILE).is_file()
    (folder / "notes.txt").write_text("not an image")
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert len(images) == 6
    out = tmp_path / "evaluation.csv"
    assert cli.main(["predict", str(folder), "-r", "--model", str(grey_model), "-o", str(out), "--workers", "1"]) == 0
    with open(out, newline="") as f:
        assert sorted(row["name"] for row in csv.DictReader(f)) == images
    err = capfd.readouterr().err
    assert MARKER_FILE not in err and "1 skipped" in err, err
    assert "skipped notes.txt: notes.txt: not an image file" in err, err


# ---------------------------------------------------------------------------------------- model and metadata only

@pytest.fixture()
def sick_or_healthy_model(grey_model, tmp_path):
    """The grey model, trained (its metadata says) on `sick/` = 1, `healthy/` = 0 and `truth.csv`, the biopsy id
    being the first letter of a name."""
    path = tmp_path / "models" / "model.keras"
    path.parent.mkdir()
    shutil.copy(grey_model, path)
    layout = DatasetLayout(class_dirs={"sick": 1, "healthy": 0}, labels_csv="truth.csv",
                           group_regex=r"^(?P<group>[a-z])\d")
    write_metadata(path, model_metadata(path, image_size=32, threshold=0.5, threshold_rule="fixed",
                                        dataset_layout=layout))
    return path


@pytest.mark.parametrize("checkout", ["params.yaml naming a missing weights file", "no params.yaml"])
def test_predict_needs_only_the_model_and_its_metadata(sick_or_healthy_model, tmp_path, monkeypatch, capfd, checkout):
    from conftest import shipped_params_raw
    from glomeruli.core.params import ParamsError, load_params

    here = tmp_path / "checkout"
    here.mkdir()
    if checkout != "no params.yaml":
        raw = shipped_params_raw()
        raw["model"]["weights"] = "weights/not-here.h5"
        (here / "params.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError, match="no such file"):  # what stopped predict before it read an image
            load_params(here / "params.yaml")
    monkeypatch.chdir(here)
    batch = tmp_path / "batch"
    for name, value in {"sick/a220.png": 220, "sick/a60.png": 60, "healthy/b180.png": 180, "healthy/b40.png": 40,
                        f"{GS}/a200.png": 200}.items():
        grey_png(batch / name, value)
    (batch / "truth.csv").write_text("name,ground truth\na220.png,1\nb40.png,0\n")
    out, by_biopsy = here / "evaluation.csv", here / "biopsies.csv"
    assert cli.main(["predict", str(batch), "--recursive", "--model", str(sick_or_healthy_model), "-o", str(out),
                     "--by-biopsy", str(by_biopsy), "--workers", "1"]) == 0, capfd.readouterr().err
    with open(out, newline="") as f:
        assert [r[0] for r in csv.reader(f)][1:] == [f"{GS}/a200.png", "healthy/b180.png", "healthy/b40.png",
                                                      "sick/a220.png", "sick/a60.png"]  # truth.csv is not predicted
    report = json.loads((here / "evaluation.metrics.json").read_text())
    # the class folders of the metadata, not params.yaml's: GS/ is outside them; tp 220, fn 60, fp 180, tn 40
    assert report["labels_from"] == ["class folders", "truth.csv"] and report["n_scored"] == 4
    assert report["metrics"]["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    assert [n["name"] for n in report["not_scored"]] == [f"{GS}/a200.png"]
    with open(by_biopsy, newline="") as f:  # biopsy = first letter, the metadata's group_regex
        rows = [(r["biopsy"], r["glomeruli"], r["predicted_pct"]) for r in csv.DictReader(f)]
    assert rows == [("a", "3", "66.67"), ("b", "2", "50.00")]
    assert "records no dataset layout" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------- hostile files

GREY_MODEL_IMAGE_CAP = 10**6 * 8 + 16 * 2**20  # the grey model's max_pixels at 8 bytes a pixel, plus 16 MiB


def _hostile(kind: str, path) -> None:
    """A file predict must skip with a reason instead of reading: a device, or a sparse file over the cap."""
    if kind == "device":
        path.symlink_to("/dev/zero")  # read whole, it fills memory
    else:
        with open(path, "wb") as f:
            f.truncate(GREY_MODEL_IMAGE_CAP + 1)  # sparse: costs no disk, read whole it costs every worker


@pytest.mark.parametrize("kind", ["fifo", "device", "oversized"])
def test_recursive_predict_skips_what_is_not_a_regular_file_under_the_cap(grey_model, tmp_path, kind):
    import contextlib

    from badfiles import fifo

    folder = tmp_path / "batch"
    grey_png(folder / "sub" / "ok.png", 200)
    hostile = folder / "sub" / "hostile.png"
    with contextlib.ExitStack() as stack:
        if kind == "fifo":
            stack.enter_context(fifo(hostile))  # read, it blocks predict for ever
        else:
            _hostile(kind, hostile)
        predictions, skipped = predict_folder(grey_model, folder, recursive=True, workers=1, batch_size=2)
    assert [p.name for p in predictions] == ["sub/ok.png"]
    assert [s.name for s in skipped] == ["sub/hostile.png"]
    expected = {"fifo": "not a regular file", "device": "not a regular file",
                "oversized": f"{GREY_MODEL_IMAGE_CAP + 1} bytes, more than the {GREY_MODEL_IMAGE_CAP} allowed"}[kind]
    assert expected in skipped[0].reason


def test_a_labels_csv_over_its_cap_stops_predict_naming_it(grey_model, labelled_batch, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    cap = 16 * 2**20  # sources.LABELS_CSV_MAX_BYTES, written out
    with open(labelled_batch / "public.csv", "wb") as f:
        f.truncate(cap + 1)
    out = tmp_path / "evaluation.csv"
    assert cli.main(["predict", str(labelled_batch), "--recursive", "--model", str(grey_model), "-o", str(out),
                     "--workers", "1"]) == 1
    err = capfd.readouterr().err
    assert f"public.csv: {cap + 1} bytes, more than the {cap} allowed" in err and "Traceback" not in err
    assert not out.exists()


def test_predict_into_a_folder_refuses_before_predicting(grey_model, labelled_batch, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "work.txt").write_text("keep")
    assert cli.main(["predict", str(labelled_batch), "--recursive", "--model", str(grey_model), "-o", str(precious),
                     "--workers", "1"]) == 1
    err = capfd.readouterr().err
    assert "precious" in err and "is a folder" in err and "Traceback" not in err and "predicting" not in err
    assert (precious / "work.txt").read_text() == "keep"
