"""Small inputs written by hand whose every expected value is known: flat grey PNGs and labelled folders built
from them, a stand-in model file with its metadata, and the grey model (its probability a known function of
an image's grey value)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from glomeruli.model.metadata import CLASS_NAMES, ModelMetadata, file_sha256, write_metadata

GS, NON_GS = "globally_sclerotic_glomeruli", "non_globally_sclerotic_glomeruli"
CLASS_DIRS = {GS: 1, NON_GS: 0}


def grey_png(path: Path, value: int, size: int = 32) -> None:
    """A flat `size` x `size` RGB PNG of grey `value` at `path` (its folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", np.full((size, size, 3), value, np.uint8))[1].tobytes())


def labelled_folder(root: Path, images: dict[str, int], labels_csv: str | None = None, *, size: int = 32) -> Path:
    """`root` holding a grey PNG per `images` entry (path inside root -> grey value) and, when given, the text of
    public.csv beside them."""
    for relpath, value in images.items():
        grey_png(root / relpath, value, size)
    if labels_csv is not None:
        (root / "public.csv").write_text(labels_csv, encoding="utf-8")
    return root


def stand_in_model(path: Path) -> Path:
    """A file where a model would be (its bytes only hashed, never loaded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"model bytes")
    return path


def model_metadata(model: Path, **changes) -> ModelMetadata:
    """Valid metadata for the model file at `model` (its checksum), with `changes` applied."""
    values = dict(image_size=64, fill=(0, 0, 0), threshold=0.7, threshold_rule="max_f1", class_names=CLASS_NAMES,
                  model_sha256=file_sha256(model), max_pixels=10**6)
    return ModelMetadata(**{**values, **changes})


def save_grey_model(path: Path, **metadata) -> Path:
    """probability = sigmoid(0.02 * (R + G + B mean) - 7.68) = sigmoid(0.06 * v - 7.68) for a flat grey image of
    value v: 0.5 at v = 128. Saved at `path` with its metadata (32 px, black fill, threshold 0.5 fixed, and
    `metadata`)."""
    import keras

    inputs = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([np.full((3, 1), 0.02, np.float32), np.array([-7.68], np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    write_metadata(path, model_metadata(path, **{"image_size": 32, "threshold": 0.5, "threshold_rule": "fixed",
                                                 **metadata}))
    return path
