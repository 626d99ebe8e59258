#!/usr/bin/env python
"""Why EfficientNetB3 from scratch needs 128 px on the hard set (issue 11): the same images, three learners.

    .venv/bin/python bench/scratch_resolution.py        # ~10 min on 2 cores

The hard set at 64 px (400 images, half sclerotic, 100 biopsies, split by biopsy; built by bench/recipes.py's
`build_data`), then, each from random initialisation with plain Keras (no pipeline head, Adam 1e-3, batch 32):

  cnn   four 3x3 conv + BatchNormalization + ReLU + max-pool blocks, 20 epochs: is the set learnable at 64 px?
  b3    EfficientNetB3 (BatchNormalization momentum 0.9, as the pipeline's from-scratch path), 10 epochs
  b3up  the same EfficientNetB3 on the same images upsampled to 128 px (bicubic: no new detail), 6 epochs

Prints ROC-AUC on train, validation and test after every epoch (inference mode). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipes  # noqa: E402  (bench/recipes.py: the hard set, built with the package's own functions)

import keras  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from glomeruli.data.h5store import ImageStore  # noqa: E402
from glomeruli.model.inference import StoreRows  # noqa: E402


def small_cnn(shape) -> keras.Model:
    layers = keras.layers
    inputs = keras.Input(shape)
    x = layers.Rescaling(1 / 255)(inputs)
    for filters in (32, 64, 128, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = layers.MaxPool2D()(x)
    outputs = layers.Dense(1, activation="sigmoid")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def efficientnet(shape) -> keras.Model:
    base = keras.applications.EfficientNetB3(include_top=False, weights=None, input_shape=shape)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    inputs = keras.Input(shape)
    pooled = keras.layers.GlobalAveragePooling2D()(base(inputs))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/glomeruli-scratch-resolution"))
    ap.add_argument("--learners", default="cnn,b3,b3up")
    args = ap.parse_args()
    data_args = argparse.Namespace(n_images=400, size=64, sclerotic_fraction=0.5, n_biopsies=100, seed=0)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    params = recipes.make_params(data_args)
    augmented, split = recipes.build_data(data_args, params, args.work)
    with ImageStore(augmented) as store:
        y = store.meta.labels
        parts = {name: (StoreRows(store, idx).read(np.arange(len(idx))), y[idx])
                 for name, idx in (("train", split.train), ("val", split.val), ("test", split.test))}
    epochs = {"cnn": 20, "b3": 10, "b3up": 6}
    for learner in args.learners.split(","):
        data = parts
        if learner == "b3up":
            data = {k: (np.stack([cv2.resize(im, (128, 128), interpolation=cv2.INTER_CUBIC) for im in x]), yy)
                    for k, (x, yy) in parts.items()}
        keras.utils.set_random_seed(0)
        shape = data["train"][0].shape[1:]
        model = small_cnn(shape) if learner == "cnn" else efficientnet(shape)
        model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
        start = time.perf_counter()
        for epoch in range(epochs[learner]):
            model.fit(*data["train"], batch_size=32, epochs=1, verbose=0)
            auc = {k: round(float(roc_auc_score(yy, model.predict(x, verbose=0).ravel())), 3)
                   for k, (x, yy) in data.items()}
            print(f"{learner} epoch {epoch + 1}: ROC-AUC {auc} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
