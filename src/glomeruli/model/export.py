"""The export stage: models/model.keras -> models/export/model.onnx, carrying its contract (onnxmodel.py).

Through Keras 3's own `model.export(format="onnx")`: on TensorFlow it converts with tf2onnx, on JAX with jax2onnx
(both pinned in the requirements, both work offline). A model trained in mixed precision is rebuilt in float32
(the export requires it), Normalization statistics are pinned as constants, and the contract (the model's
metadata, onnxmodel.contract_props) is written into the file's metadata_props. The file is checked against the
Keras model on onnxruntime before it is renamed into place, so a converter that changed the arithmetic fails the
stage instead of shipping.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from glomeruli.core.atomic import atomic_path
from glomeruli.core.errors import UserError
from glomeruli.model.metadata import ModelMetadata, read_metadata
from glomeruli.model.onnxmodel import OnnxModel, contract_props

log = logging.getLogger(__name__)

# Converters Keras calls per backend, and their pins (requirements-common.txt, requirements.txt).
CONVERTERS = {"tensorflow": ("tf2onnx", "tf2onnx==1.17.0"), "jax": ("jax2onnx", "jax2onnx==0.17.1")}
# The exported file must give the Keras model's probabilities on these random inputs within this tolerance.
CHECK_IMAGES, CHECK_TOLERANCE = 4, 1e-4
# jax2onnx 0.17 writes opset-18 operators (ReduceMean with its axes as an input) whatever opset it is asked for:
# below 18 its file fails onnx's checker.
MIN_OPSET_JAX = 18


class ExportError(UserError, RuntimeError):
    """The model cannot be exported (backend, converter, precision) or the export disagrees with it."""


def export_onnx(model_path: Path, out_path: Path, opset: int) -> ModelMetadata:
    """Export `model_path` with its metadata (model.meta.json, checked against its checksum) to `out_path`,
    written atomically; returns the contract written."""
    import keras

    meta = read_metadata(model_path)  # refuses metadata of another model file: the contract must match the model
    backend = keras.backend.backend()
    converter = _converter(backend)
    if backend == "jax" and opset < MIN_OPSET_JAX:
        raise ExportError(f"export.opset = {opset}: on JAX, jax2onnx writes opset {MIN_OPSET_JAX} operators whatever it "
                          f"is asked, so its file would be invalid; set export.opset to {MIN_OPSET_JAX} (params.yaml) or "
                          "export on TensorFlow (KERAS_BACKEND=tensorflow)")
    from glomeruli.model.efficientnet import load_model

    model = _float32(load_model(model_path))
    x = np.random.default_rng(0).uniform(0, 255, (CHECK_IMAGES, meta.image_size, meta.image_size, 3)).astype(np.float32)
    expected = _prepare(model, x)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="glomeruli-export-") as scratch:  # not beside the output: DVC's folder
        raw = Path(scratch) / "raw.onnx"
        for converter_log in ("tf2onnx", "jax2onnx", "onnx_ir"):  # their per-pass notes drown the stage's log
            logging.getLogger(converter_log).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            # Keras' tf2onnx patch probes `np.object`, which NumPy 2 warns about: not ours to act on
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*np.object.*")
            model.export(str(raw), format="onnx", verbose=False, opset_version=opset)
        import onnx

        proto = onnx.load(str(raw))
    exported_with = f"keras {keras.__version__} on {backend}, {converter}, opset {opset}"
    props = contract_props(meta, exported_with)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"Glomerulus classifier (EfficientNetB3), exported from a Keras model with sha256 "
                        f"{meta.model_sha256}. Contract: metadata_props glomeruli.*; input: {props['glomeruli.input']}; "
                        f"output: {props['glomeruli.output']}")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{exported_with} wrote an invalid ONNX graph ({str(err).splitlines()[0]}); nothing was "
                          f"written to {out_path}: try another export.opset (13-18) or the other backend") from err
    with atomic_path(out_path) as tmp:  # renamed into place only after the check below passed
        onnx.save(proto, str(tmp))
        difference = _check_against_keras(expected, x, tmp)
    log.info("wrote %s (%s; onnxruntime vs Keras on %d random images: max |diff| %.2g)", out_path, exported_with,
             CHECK_IMAGES, difference)
    return meta


def _converter(backend: str) -> str:
    """The converter Keras uses on `backend`, with its version; refused in one line when missing."""
    if backend not in CONVERTERS:
        raise ExportError(f"ONNX export runs on the tensorflow or jax backend, not {backend}: set KERAS_BACKEND")
    module, pin = CONVERTERS[backend]
    try:
        __import__(module)
    except ImportError as err:
        raise ExportError(f"exporting on {backend} needs {module}, which is not installed ({err}): "
                          f"pip install {pin} (or bash scripts/setup.sh)") from err
    from importlib.metadata import version

    return f"{module} {version(module)}"


def _float32(model):
    """The model computing in float32: Keras' ONNX export requires it, and a model trained in mixed precision
    (GPU runs) keeps its layers' bfloat16/float16 policies in its file. Its variables are float32 already, so a
    float32 rebuild from its config takes them unchanged."""
    import keras

    config = keras.saving.serialize_keras_object(model)
    mixed = _set_float32(config)
    if not mixed:
        return model
    log.info("the model computes in %s: exported as float32 (its variables are float32 already)", ", ".join(sorted(mixed)))
    from glomeruli.model.efficientnet import sync_normalization

    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    sync_normalization(copy)  # set_weights leaves Normalization computing with its build-time statistics
    return copy


def _set_float32(node) -> set[str]:
    """Replace every non-float32 dtype policy in a serialized config by float32; returns the policies replaced."""
    found: set[str] = set()
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
            name = node["config"].get("name")
            if name != "float32":
                found.add(str(name))
                node["config"]["name"] = "float32"
        for value in node.values():
            found |= _set_float32(value)
    elif isinstance(node, list):
        for value in node:
            found |= _set_float32(value)
    return found


def _prepare(model, x: np.ndarray) -> np.ndarray:
    """Make the model exportable; returns its probabilities of `x`, for the check of the written file.

    It must have been called (Keras refuses to export a model it never called, and `predict` does not count on
    JAX): the call on `x` is that call. Every Normalization's mean and variance become NumPy constants: Keras derives
    them as tensors at build time, and tf2onnx turns such captured tensors into extra graph inputs the file cannot
    run without."""
    import keras

    from glomeruli.model.efficientnet import _all_layers

    expected = np.asarray(model(x, training=False), dtype=np.float64).reshape(-1)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.Normalization) and layer.built:
            layer.mean, layer.variance = np.asarray(layer.mean), np.asarray(layer.variance)
    return expected


def _check_against_keras(expected: np.ndarray, x: np.ndarray, onnx_path: Path) -> float:
    """Max |probability difference| between onnxruntime on the written file and the Keras model (`expected`, its
    probabilities of the random 0-255 images `x`); more than CHECK_TOLERANCE fails the export."""
    exported = OnnxModel(onnx_path)
    got = exported.predict_batch(x, len(x)).astype(np.float64).reshape(-1)
    difference = float(np.max(np.abs(got - expected)))
    if not difference <= CHECK_TOLERANCE:
        raise ExportError(f"the exported model disagrees with the Keras model by {difference:.3g} in probability "
                          f"(tolerance {CHECK_TOLERANCE}) on random inputs: the converter changed the arithmetic; "
                          f"nothing was written. Report it with the versions: {json.dumps(exported.props.get('glomeruli.exported_with'))}")
    return difference
