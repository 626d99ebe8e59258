"""The export stage's ONNX file: its contract, the same probabilities as the Keras model on both backends, and
`glomeruli predict` on it without TensorFlow, JAX or Keras."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from glomeruli.model.metadata import CLASS_NAMES, DatasetLayout, MetadataError, ModelMetadata, read_metadata
from glomeruli.model.onnxmodel import FORMAT_KEY, OnnxModelError, contract_props, parse_contract
from glomeruli.core.params import ParamsError
from glomeruli.commands.predict import model_metadata, predict_folder
from glomeruli.data.stain import stain_normalization

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # max |probability difference| between onnxruntime and Keras
MIN_IMAGES = 32

# Everything the ONNX path must not load: the Keras backends, Keras, and what only training uses (HDF5 stores,
# scikit-image's colour deconvolution, the ONNX converters). A sitecustomize makes them unimportable.
NOT_ON_THE_ONNX_PATH = ("tensorflow", "keras", "jax", "jaxlib", "h5py", "skimage", "onnx", "tf2onnx", "jax2onnx")
BLOCKER = f"""
import sys

class NotOnTheOnnxPath:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_THE_ONNX_PATH!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the ONNX prediction path)")

sys.meta_path.insert(0, NotOnTheOnnxPath())
"""


def _meta(**changes) -> ModelMetadata:
    meta = ModelMetadata(image_size=64, fill=(255, 250, 240), threshold=0.37, threshold_rule="max_f1",
                         class_names=CLASS_NAMES, model_sha256="ab" * 32, max_pixels=12_345_678, temperature=1.7,
                         dataset_layout=DatasetLayout({"sick": 1, "healthy": 0}, "truth.csv", r"^(?P<group>[a-z])\d"),
                         stain_normalization=stain_normalization("macenko"))
    return replace(meta, **changes)


# ---------------------------------------------------------------------------------------- the contract

def test_the_contract_carries_every_field_of_the_model_metadata():
    meta = _meta()
    props = contract_props(meta, "keras 3 on tensorflow, tf2onnx")
    assert props[FORMAT_KEY] == "1" and props["glomeruli.keras_model_sha256"] == "ab" * 32
    assert json.loads(props["glomeruli.stain_normalization"])["method"] == "macenko"
    assert "0-255" in props["glomeruli.input"] and "temperature" in props["glomeruli.output"]
    assert parse_contract(props, "model.onnx") == meta


@pytest.mark.parametrize("broken, message", [
    ({FORMAT_KEY: None}, "carries no glomeruli contract"),
    ({FORMAT_KEY: "2"}, "carries contract format 2, this glomeruli reads format 1"),
    ({"glomeruli.threshold": "0.3x"}, "contract entry glomeruli.threshold is not JSON"),
    ({"glomeruli.threshold": "1.5"}, "impossible values"),
    ({"glomeruli.image_size": None}, "incomplete or malformed"),
])
def test_a_broken_contract_is_refused_naming_the_file_and_the_way_out(broken, message):
    props = contract_props(_meta(), "test")
    for key, value in broken.items():
        if value is None:
            del props[key]
        else:
            props[key] = value
    with pytest.raises((OnnxModelError, MetadataError), match=message) as caught:
        parse_contract(props, "models/export/model.onnx")
    assert "models/export/model.onnx" in str(caught.value) and "dvc repro export" in str(caught.value)


def test_export_opset_is_validated():
    from conftest import small_params

    assert small_params().export.opset == 18
    with pytest.raises(ParamsError, match="export.opset"):
        small_params(**{"export.opset": 23})


def test_a_mixed_precision_model_is_exported_as_float32():
    """Rebuilt in float32 with the same variables, the head's adapted standardisation included."""
    import keras

    from glomeruli.model.export import _float32

    x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4)).astype(np.float32)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((4,))
        norm = keras.layers.Normalization(dtype="float32")
        norm.adapt(x)
        model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dense(3)(norm(inputs))))
    finally:
        keras.config.set_dtype_policy(previous)
    assert {layer.dtype_policy.name for layer in model.layers[2:]} == {"mixed_bfloat16"}
    copy = _float32(model)
    assert {layer.dtype_policy.name for layer in copy.layers[1:]} == {"float32"}
    for ours, theirs in zip(copy.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    standardised = keras.Model(copy.inputs, copy.layers[1].output).predict(x, verbose=0)
    np.testing.assert_allclose(standardised.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(standardised.std(axis=0), 1, atol=1e-3)


# ---------------------------------------------------------------------------------------- parity

@pytest.fixture(scope="module")
def exported(pipeline_repo):
    """The tiny pipeline's Keras model and the export stage's ONNX file of it (exported on TensorFlow)."""
    keras_model, onnx_model = pipeline_repo / "models" / "model.keras", pipeline_repo / "models" / "export" / "model.onnx"
    assert onnx_model.is_file(), "dvc repro did not run the export stage"
    return keras_model, onnx_model, pipeline_repo / "data" / "raw"


def _compare(keras_preds, onnx_preds) -> float:
    assert [p.name for p in onnx_preds] == [p.name for p in keras_preds] and len(keras_preds) >= MIN_IMAGES
    assert [p.label for p in onnx_preds] == [p.label for p in keras_preds]
    return float(np.max(np.abs(np.array([p.probability for p in onnx_preds])
                                - np.array([p.probability for p in keras_preds]))))


def test_onnx_predicts_what_keras_predicts_on_tensorflow(exported):
    keras_model, onnx_model, images = exported
    meta = model_metadata(onnx_model)
    assert meta == read_metadata(keras_model)  # the contract is models/model.meta.json, checksum included
    kwargs = dict(recursive=True, workers=1, batch_size=40, ignore=frozenset({"public.csv"}))
    keras_preds, _ = predict_folder(keras_model, images, **kwargs)
    onnx_preds, _ = predict_folder(onnx_model, images, **kwargs)
    assert _compare(keras_preds, onnx_preds) <= TOLERANCE


_JAX_PARITY = """
import json, sys
from pathlib import Path
import keras
from glomeruli.model.export import export_onnx
from glomeruli.model.onnxmodel import OnnxModel
from glomeruli.commands.predict import predict_folder

keras_model, images, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
export_onnx(keras_model, out, opset=18)
kwargs = dict(recursive=True, workers=1, batch_size=40, ignore=frozenset({"public.csv"}))
keras_preds, _ = predict_folder(keras_model, images, **kwargs)
onnx_preds, _ = predict_folder(out, images, **kwargs)
print(json.dumps({"backend": keras.backend.backend(), "tensorflow": "tensorflow" in sys.modules,
                  "exported_with": OnnxModel(out).props["glomeruli.exported_with"],
                  "keras": [[p.name, p.label, p.probability] for p in keras_preds],
                  "onnx": [[p.name, p.label, p.probability] for p in onnx_preds]}))
"""


@pytest.mark.slow
def test_onnx_predicts_what_keras_predicts_on_jax(exported, tmp_path):
    """Exported on JAX (jax2onnx), with TensorFlow made unimportable, as on our JAX boxes."""
    from jaxrun import jax_env

    keras_model, _, images = exported
    result = subprocess.run([sys.executable, "-c", _JAX_PARITY, str(keras_model), str(images),
                             str(tmp_path / "export" / "model.onnx")], cwd=ROOT, env=jax_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax" and not report["tensorflow"] and "jax2onnx" in report["exported_with"]
    keras_preds, onnx_preds = report["keras"], report["onnx"]
    assert [row[:2] for row in onnx_preds] == [row[:2] for row in keras_preds] and len(keras_preds) >= MIN_IMAGES
    assert max(abs(a[2] - b[2]) for a, b in zip(keras_preds, onnx_preds)) <= TOLERANCE


# ---------------------------------------------------------------------------------------- predict without TensorFlow

_PREDICT_ON_ONNX = """
import sys
from glomeruli.commands import cli
code = cli.main(sys.argv[1:])
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(%r))
print("LOADED", ",".join(loaded))
sys.exit(code)
""" % (NOT_ON_THE_ONNX_PATH,)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_on_the_onnx_file_needs_no_tensorflow_and_matches_keras(exported, tmp_path):
    """The whole command on a labelled folder (CSV, --by-biopsy, the score) with TensorFlow, JAX, Keras and h5py
    unimportable; its outputs are the Keras model's."""
    keras_model, onnx_model, images = exported
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{ROOT / 'src'}")
    args = ["predict", str(images), "--recursive", "--workers", "1"]
    onnx_out, keras_out = tmp_path / "onnx" / "predictions.csv", tmp_path / "keras" / "predictions.csv"
    result = subprocess.run([sys.executable, "-c", _PREDICT_ON_ONNX, *args, "--model", str(onnx_model),
                             "-o", str(onnx_out), "--by-biopsy", str(onnx_out.with_name("biopsies.csv"))],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "LOADED \n" in result.stdout, result.stdout  # none of them was imported
    assert "score on" in result.stdout

    from glomeruli.commands import cli

    keras_args = [*args, "--model", str(keras_model), "-o", str(keras_out), "--by-biopsy",
                  str(keras_out.with_name("biopsies.csv"))]
    assert cli.main(keras_args) == 0
    onnx_rows, keras_rows = _rows(onnx_out), _rows(keras_out)
    assert len(onnx_rows) >= MIN_IMAGES
    assert [(r["name"], r["ground truth"]) for r in onnx_rows] == [(r["name"], r["ground truth"]) for r in keras_rows]
    assert max(abs(float(a["probability"]) - float(b["probability"])) for a, b in zip(onnx_rows, keras_rows)) <= TOLERANCE
    onnx_score = json.loads(onnx_out.with_name("predictions.metrics.json").read_text())
    keras_score = json.loads(keras_out.with_name("predictions.metrics.json").read_text())
    assert onnx_score["metrics"]["confusion_matrix"] == keras_score["metrics"]["confusion_matrix"]
    assert onnx_score["n_scored"] == keras_score["n_scored"] >= MIN_IMAGES
    assert [r["biopsy"] for r in _rows(onnx_out.with_name("biopsies.csv"))] == \
        [r["biopsy"] for r in _rows(keras_out.with_name("biopsies.csv"))]


def test_recalibrated_metadata_applies_to_the_onnx_file_and_another_models_is_refused(exported, tmp_path):
    keras_model, onnx_model, _ = exported
    raw = json.loads(keras_model.with_name("model.meta.json").read_text())
    recalibrated = tmp_path / "model.recalibrated-site_b.meta.json"
    recalibrated.write_text(json.dumps({**raw, "threshold": 0.123, "temperature": 2.5}))
    meta = model_metadata(onnx_model, recalibrated)
    assert (meta.threshold, meta.temperature) == (0.123, 2.5)
    other = tmp_path / "other.meta.json"
    other.write_text(json.dumps({**raw, "model_sha256": "0" * 64}))
    with pytest.raises(MetadataError, match="written for another version of model.onnx"):
        model_metadata(onnx_model, other)


def test_predict_refuses_devices_for_an_onnx_file(exported, tmp_path, capfd):
    from glomeruli.commands import cli

    _, onnx_model, images = exported
    assert cli.main(["predict", str(images), "-r", "--model", str(onnx_model), "--devices", "2",
                     "-o", str(tmp_path / "p.csv")]) == 1
    assert "onnxruntime's CPU provider" in capfd.readouterr().err


def test_an_onnx_file_without_our_contract_is_refused(exported, tmp_path, capfd):
    import onnx

    from glomeruli.commands import cli

    _, onnx_model, images = exported
    proto = onnx.load(str(onnx_model))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    assert cli.main(["predict", str(images), "-r", "--model", str(bare), "-o", str(tmp_path / "p.csv")]) == 1
    err = capfd.readouterr().err
    assert "bare.onnx carries no glomeruli contract" in err and "dvc repro export" in err
    assert not (tmp_path / "p.csv").exists()


def test_a_labelled_folder_without_the_scoring_libraries_is_refused_before_predicting(exported, tmp_path):
    """The environment of requirements-predict.txt alone: scikit-learn and matplotlib missing. A labelled folder stops
    with one line naming the way out; --no-score writes the predictions."""
    _, onnx_model, images = exported
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER.replace(repr(NOT_ON_THE_ONNX_PATH),
                                                                        repr((*NOT_ON_THE_ONNX_PATH, "sklearn",
                                                                              "matplotlib", "scipy"))))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{ROOT / 'src'}")
    command = [sys.executable, "-m", "glomeruli.commands.cli", "predict", str(images), "-r", "--model", str(onnx_model),
               "--workers", "1", "-o", str(tmp_path / "p.csv")]
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and not (tmp_path / "p.csv").exists()
    assert "needs scikit-learn and matplotlib (not installed): pip install -r requirements-predict-score.txt, or " \
           "pass --no-score" in refused.stderr and "predicting" not in refused.stderr
    alone = subprocess.run([*command, "--no-score"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert len(_rows(tmp_path / "p.csv")) >= MIN_IMAGES and not (tmp_path / "p.metrics.json").exists()
