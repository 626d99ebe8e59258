"""Grad-CAM (Selvaraju et al. 2017): where in the image the last convolutional layer found the evidence
for the class the model predicted. Gradients come from glomeruli.model.backend, so it runs on every backend.

`efficientnet_cam_parts` splits the model at EfficientNet's `top_activation`, the way
`efficientnet.split_at_block` splits it for the fine-tune cache, and `gradcam` differentiates the pre-sigmoid
logit with respect to those activations through `backend.score_gradients`, the package's one gradient path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import keras
import numpy as np
from keras import ops

from glomeruli.model.backend import score_gradients
from glomeruli.model.inference import ArrayRows, predict_rows
from glomeruli.model.efficientnet import POOL_NAME, InferenceMode, base_of, head_of

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


# Background: bright and nearly grey (glass, the white around a crop). HSV value above this and saturation below.
WHITE_VALUE, WHITE_SATURATION = 0.86, 0.12
CENTRE_SIDE = 0.5  # the central square, half the side (a quarter of the area), where a centred crop's tuft lies


@dataclass(frozen=True)
class Focus:
    """Per image: share of the Grad-CAM heat on tissue and on the central square (NaN for an all-zero map),
    and the share of the area each covers (what a heat map spread evenly would score)."""

    tissue: np.ndarray
    centre: np.ndarray
    tissue_area: np.ndarray
    centre_area: float


def tissue_mask(image: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """True where an RGB uint8 image shows tissue: neither the padding's exact fill colour nor white background."""
    padding = np.all(image == np.asarray(fill, dtype=image.dtype), axis=-1)
    hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2HSV)
    white = (hsv[..., 2] > WHITE_VALUE * 255) & (hsv[..., 1] < WHITE_SATURATION * 255)
    return ~padding & ~white


def centre_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    top, left = round(height * (1 - CENTRE_SIDE) / 2), round(width * (1 - CENTRE_SIDE) / 2)
    mask[top:height - top, left:width - left] = True
    return mask


def gradcam_focus(heatmaps: np.ndarray, images: np.ndarray, fill: tuple[int, int, int]) -> Focus:
    """Where the heat of each map (N, H, W) falls on its image (N, H, W, 3): a model that looks at corners,
    padding or glass scores low on both, whatever its accuracy."""
    heatmaps = np.asarray(heatmaps, dtype=np.float64)
    centre = centre_mask(*heatmaps.shape[1:3])
    tissue = np.stack([tissue_mask(image, fill) for image in images]) if len(images) else np.zeros(heatmaps.shape, bool)
    total = heatmaps.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        on_tissue = np.where(total > 0, (heatmaps * tissue).sum(axis=(1, 2)) / total, np.nan)
        on_centre = np.where(total > 0, (heatmaps * centre).sum(axis=(1, 2)) / total, np.nan)
    return Focus(on_tissue, on_centre, tissue.mean(axis=(1, 2)), float(centre.mean()))
