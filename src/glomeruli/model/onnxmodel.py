"""An exported model (models/export/model.onnx) and the contract it carries in its ONNX metadata_props.

The contract is what `glomeruli predict` needs to run the file on onnxruntime alone: input size and fill, the
preprocessing (decode to 0-255 RGB, fit, pad, stain normalisation and its reference), threshold and rule,
calibration temperature, class names, dataset layout, max_pixels, and the sha256 of the Keras model it was
exported from. `parse_contract` checks it with metadata.parse_metadata, the checks of model.meta.json; a
`--meta` file given instead is checked against the recorded Keras checksum.

Prediction without TensorFlow: `glomeruli predict --model model.onnx` picks `OnnxModel` by the suffix (one
interface with the Keras model: `image_size`, `predict_batch`). This module imports neither TensorFlow, JAX nor
Keras, and on that route Keras, TensorFlow, JAX, h5py and scikit-image are imported only late, on paths it never
takes (tests/model/test_export.py checks it with them made unimportable); requirements-predict.txt is that
environment (requirements-predict-score.txt adds scikit-learn and matplotlib to score a labelled folder). The
export itself lives in export.py.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from glomeruli.core.errors import UserError
from glomeruli.model.metadata import MetadataError, ModelMetadata, parse_metadata

log = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"
PREFIX = "glomeruli."
# Bumped whenever a key changes meaning or a reader would need a new one; readers refuse other versions.
FORMAT_VERSION = 1
FORMAT_KEY = PREFIX + "format_version"
KERAS_SHA256_KEY = PREFIX + "keras_model_sha256"
# Written for people (Netron, onnx.load) and other runtimes; this reader uses only the JSON keys.
INPUT_DESCRIPTION = ("float32 [batch, S, S, 3]: RGB, 0-255 (8-bit pixels cast to float, no scaling: the model "
                     "normalises internally). Each image decoded (grey, palette, 16-bit, alpha over `fill` all to "
                     "8-bit RGB), its longer side scaled to S keeping the aspect ratio (OpenCV INTER_AREA to "
                     "shrink, INTER_CUBIC to enlarge, sides rounded half up), stain-normalised as "
                     "`stain_normalization` says (before padding), then padded centred to S x S with `fill`. "
                     "S = image_size. Reference implementation: glomeruli.data.images.load_model_input")
OUTPUT_DESCRIPTION = ("float32 [batch, 1]: uncalibrated probability p of globally sclerotic (class 1). Calibrated: "
                      "sigmoid(logit(p) / temperature); predicted class 1 when the calibrated probability >= "
                      "threshold (chosen on validation by threshold_rule)")
_DESCRIPTIONS = {"input": INPUT_DESCRIPTION, "output": OUTPUT_DESCRIPTION}
_EXPORT_FIX = "export it with `dvc repro export` (or `python stages/export.py`)"


class OnnxModelError(UserError, ValueError):
    """An ONNX file that cannot be read, run or understood as one of our exported models."""


def is_onnx(path: Path | str) -> bool:
    """Whether `path` names an ONNX export (by its suffix, as predict chooses the runtime)."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def contract_props(meta: ModelMetadata, exported_with: str) -> dict[str, str]:
    """The metadata_props an export writes: every ModelMetadata field as JSON under `glomeruli.<field>` (the
    model's checksum as keras_model_sha256: it is the Keras file's, not the ONNX file's), the format version,
    and plain-text descriptions of input and output."""
    fields = asdict(meta)
    props = {FORMAT_KEY: str(FORMAT_VERSION), KERAS_SHA256_KEY: fields.pop("model_sha256"),
             PREFIX + "exported_with": exported_with}
    props.update({PREFIX + key: json.dumps(value) for key, value in fields.items()})
    props.update({PREFIX + key: text for key, text in _DESCRIPTIONS.items()})
    return props


def parse_contract(props: dict[str, str], source: str) -> ModelMetadata:
    """ModelMetadata from an export's metadata_props, checked as model.meta.json is (metadata.parse_metadata)."""
    if FORMAT_KEY not in props:
        raise OnnxModelError(f"{source} carries no glomeruli contract (no {FORMAT_KEY} in its ONNX metadata): it was "
                             f"not written by this pipeline's export stage; {_EXPORT_FIX}")
    if props[FORMAT_KEY] != str(FORMAT_VERSION):
        raise OnnxModelError(f"{source} carries contract format {props[FORMAT_KEY]}, this glomeruli reads format "
                             f"{FORMAT_VERSION}: {_EXPORT_FIX} with this version, or predict with the glomeruli "
                             "version that exported it")
    raw: dict = {}
    not_fields = {FORMAT_KEY, PREFIX + "exported_with", *(PREFIX + key for key in _DESCRIPTIONS)}
    for key, value in props.items():
        if key == KERAS_SHA256_KEY:
            raw["model_sha256"] = value
        elif key.startswith(PREFIX) and key not in not_fields:
            try:
                raw[key.removeprefix(PREFIX)] = json.loads(value)
            except ValueError as err:
                raise OnnxModelError(f"{source}: contract entry {key} is not JSON ({err}); {_EXPORT_FIX}") from err
    return parse_metadata(raw, f"{source} (its ONNX metadata)", _EXPORT_FIX)


class OnnxModel:
    """An exported model on onnxruntime (CPU): its contract, its input size, and probabilities of a batch."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"model file {self.path} not found; {_EXPORT_FIX}, or pass --model PATH")
        self.session = _session(str(self.path.resolve()), self.path.stat().st_mtime_ns, self.path.stat().st_size)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1:
            raise OnnxModelError(f"{self.path} takes {[(i.name, i.shape) for i in inputs]} and gives "
                                 f"{[(o.name, o.shape) for o in outputs]}, not one image batch [batch, S, S, 3] to one "
                                 f"probability each: it is not one of our exported models; {_EXPORT_FIX}")
        self.input_name = inputs[0].name
        self.image_size = tuple(inputs[0].shape[1:3])
        self.props = dict(self.session.get_modelmeta().custom_metadata_map)

    def metadata(self) -> ModelMetadata:
        """The contract the file carries."""
        meta = parse_contract(self.props, str(self.path))
        if self.image_size != (meta.image_size, meta.image_size):
            raise MetadataError(f"{self.path} takes {self.image_size} inputs but its contract says {meta.image_size}; "
                                f"{_EXPORT_FIX}")
        return meta

    def predict_batch(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities of a batch [n, S, S, 3] of 0-255 floats, shape [n, 1] (any n: the batch axis is free)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


@functools.lru_cache(maxsize=2)
def _session(path: str, mtime_ns: int, size: int):
    """One onnxruntime session per file version: predict reads the contract and then runs the same file."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise OnnxModelError(f"predicting with {path} needs onnxruntime, which is not installed: "
                             "pip install -r requirements-predict.txt") from err
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's business
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types for a bad file
        raise OnnxModelError(f"{path} could not be read as an ONNX model ({type(err).__name__}: {err}); "
                             f"{_EXPORT_FIX}") from err


def read_contract(path: Path | str) -> ModelMetadata:
    """The contract of the ONNX export at `path` (its metadata_props), checked."""
    return OnnxModel(path).metadata()
