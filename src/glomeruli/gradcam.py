"""Grad-CAM (Selvaraju et al. 2017): where in the image the last convolutional layer found the evidence
for the class the model predicted. Gradients come from glomeruli.backend, so it runs on every backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import keras
import numpy as np
from keras import ops

from glomeruli.backend import score_gradients
from glomeruli.inference import ArrayRows, predict_rows
from glomeruli.model import POOL_NAME, InferenceMode, base_of, head_of

LAST_CONV = "top_activation"  # EfficientNet's last convolutional activation (7x7 cells at 224 px)


@dataclass(frozen=True)
class CamParts:
    """The network split at its last convolutional layer: image -> activations, activations -> logit."""

    features: keras.Model
    logit: Callable  # batch of activations (backend tensor) -> one logit per image (backend tensor)


def efficientnet_cam_parts(model: keras.Model) -> CamParts:
    """Split our model at EfficientNet's `top_activation`, as the fine-tune cache splits at a block.

    The score is the logit before the final sigmoid: a float32 sigmoid saturates at 1.0 for confident
    predictions, and its gradient would then be zero everywhere.
    """
    base = base_of(model)
    last_conv = base.get_layer(LAST_CONV).output
    image = keras.Input(model.inputs[0].shape[1:], name="image")
    features = keras.Model(image, InferenceMode(keras.Model(base.inputs, last_conv), name="cam_base")(image),
                           name="cam_features")
    # everything after the last conv layer in the base (nothing, for include_top=False without pooling)
    rest = None if base.output is last_conv else InferenceMode(keras.Model(last_conv, base.output))
    pool, head = model.get_layer(POOL_NAME), head_of(model)
    norm, dense = head.get_layer("head_norm"), head.get_layer("probability")

    def logit(activations):
        pooled = pool(activations if rest is None else rest(activations))
        return ops.squeeze(ops.matmul(norm(pooled), dense.kernel) + dense.bias, -1)

    return CamParts(features, logit)


def gradcam(parts: CamParts, images: np.ndarray, *, towards_positive: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1] at the images' size.

    `towards_positive[i]`: explain class 1 (globally sclerotic) for image i, else class 0 (the logit's
    negative). Channel weights are the spatially averaged gradients of that score; the map is
    ReLU(sum of weighted channels), scaled so each image's maximum is 1 (an all-zero map stays zero).
    """
    activations = predict_rows(parts.features, ArrayRows(np.asarray(images, dtype=np.float32)), batch_size)
    _, grads = score_gradients(parts.logit, activations)
    sign = np.where(np.asarray(towards_positive, dtype=bool), 1.0, -1.0)[:, None]
    weights = grads.mean(axis=(1, 2)) * sign  # (N, C)
    cams = np.maximum(np.einsum("nhwc,nc->nhw", activations, weights), 0.0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    cams = np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)
    height, width = images.shape[1:3]
    return np.stack([cv2.resize(c.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
                     for c in cams]).clip(0.0, 1.0)
