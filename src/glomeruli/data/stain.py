"""Stain and colour: the augmentation that varies them (HED stain jitter, brightness, contrast, saturation, hue)
and the normalisation that removes them (Macenko, Reinhard) to a fixed reference.

Colour deconvolution is scikit-image's (`rgb2hed`/`hed2rgb`, Ruifrok and Johnston's H-E-DAB vectors);
normalisation is torchstain's NumPy backend. Neither is re-implemented here: this module adds the draws, the
units, the reference that travels with a model, and the guards for images those methods cannot handle
(blank and white tiles, flat colours: left unchanged rather than blown up into a colour cast).

`jitter_colour` is called by `augment.augment_image`, for the augment stage and fine-tuning's online variants
alike; the padding keeps its fill. `normalize_stain` is applied by `images.load_model_input`, so training,
evaluation and predict see the same pixels; the method and its reference are recorded in the preprocessed
store's attributes and in the model's metadata (`model.meta.json`, the ONNX contract), and predict applies
the recorded one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

# scikit-image (augmentation) and torchstain (normalisation) are imported where used: prediction imports this
# module, and the prediction-only environment (requirements-predict.txt) has no scikit-image.
from glomeruli.core.params import STAIN_NORMALIZATION_METHODS

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- augmentation

# scikit-image (>= 0.19) returns stain concentrations as optical density divided by -log(1e-6) (its
# `separate_stains`), where Tellez et al. 2019 shift concentrations in optical density itself. `augment.hed_shift`
# is in optical density, as in the paper, and is converted here.
SKIMAGE_OD_PER_UNIT = -np.log(1e-6)
# Rec. 601 luma, the grey that contrast and saturation jitter blend towards (as torchvision's ColorJitter).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# One fixed block of uniform draws in [-1, 1] whenever any colour setting is on: HED scale (3), HED shift (3),
# brightness, contrast, saturation, hue. Switching one part off then leaves the other parts' values alone.
_N_COLOUR_DRAWS = 10


def colour_jitter_on(params: Any) -> bool:
    """Whether any colour setting of `params` (AugmentParams) is above 0."""
    return any(v > 0 for v in (params.hed_scale, params.hed_shift, params.brightness, params.contrast,
                               params.saturation, params.hue))


def jitter_colour(image: np.ndarray, rng: np.random.Generator, params: Any,
                  fill: tuple[int, int, int]) -> np.ndarray:
    """Random stain and colour variation of one HxWx3 uint8 RGB image; the padding comes out as `fill`.

    In order, each skipped at 0: HED jitter (each stain's concentration times U(1-hed_scale, 1+hed_scale) plus
    U(-hed_shift, hed_shift) optical density), brightness (times U(1-b, 1+b)), contrast (distance from the mean
    grey of the tissue times U(1-c, 1+c)), saturation (distance from each pixel's grey times U(1-s, 1+s)), hue
    (turned by U(-h, h) of the colour circle). Padding is every pixel exactly equal to `fill`: the fitted image's
    border and what a warp with borderValue=fill uncovered (a tissue pixel of exactly that colour is kept too).
    With every setting 0 it draws nothing and returns `image` itself.
    """
    if not colour_jitter_on(params):
        return image
    u = [float(v) for v in rng.uniform(-1.0, 1.0, size=_N_COLOUR_DRAWS)]  # Python floats keep float32 float32
    image = np.ascontiguousarray(image)  # a flipped or turned view
    padding = cv2.inRange(image, fill, fill) > 0  # exactly the fill colour
    if padding.all():
        return image
    x = image.astype(np.float32) / 255.0
    if params.hed_scale > 0 or params.hed_shift > 0:
        x = _jitter_hed(x, 1.0 + params.hed_scale * np.array(u[0:3]), params.hed_shift * np.array(u[3:6]))
    if params.brightness > 0:
        x = np.clip(x * (1.0 + params.brightness * u[6]), 0.0, 1.0)
    if params.contrast > 0:
        mean_grey = float((x[~padding] @ LUMA).mean())
        x = np.clip((x - mean_grey) * (1.0 + params.contrast * u[7]) + mean_grey, 0.0, 1.0)
    if params.saturation > 0:
        grey = (x @ LUMA)[..., None]
        x = np.clip(grey + (x - grey) * (1.0 + params.saturation * u[8]), 0.0, 1.0)
    if params.hue > 0:
        hsv = cv2.cvtColor(np.ascontiguousarray(x, dtype=np.float32), cv2.COLOR_RGB2HSV)  # float: H in degrees
        hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * params.hue * u[9], 360.0)
        x = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)
    out = np.rint(x * 255.0).astype(np.uint8)
    out[padding] = fill
    return out


def _jitter_hed(rgb: np.ndarray, scale: np.ndarray, shift_od: np.ndarray) -> np.ndarray:
    """Scale and shift each stain's concentration (Tellez et al. 2019), RGB floats in [0, 1] in and out.

    Applied as the ratio of the jittered to the unjittered reconstruction: `rgb2hed` clips negative
    concentrations (colours outside the H-E-DAB cone, e.g. saturated magenta), so a plain round trip would
    move those pixels by tens of levels even at zero jitter; the ratio changes them by the jitter alone.
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    jittered = hed * scale + shift_od / SKIMAGE_OD_PER_UNIT
    ratio = hed2rgb(jittered) / hed2rgb(hed)  # exp of a bounded optical density: never 0 in float64
    return np.clip(rgb * ratio, 0.0, 1.0).astype(np.float32)


# -------------------------------------------------------------------------------------------- normalisation

NORMALIZATION_METHODS = STAIN_NORMALIZATION_METHODS

# Macenko et al. 2009: the image's own two stain vectors and 99th-percentile concentrations are mapped onto a
# reference's. The reference is torchstain's built-in one (the H&E reference of Macenko's original code), with
# torchstain's default transmitted light Io, angle percentile alpha and optical density threshold beta.
MACENKO_REFERENCE = {
    "stain_matrix": [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]],  # RGB optical density x (H, E)
    "max_concentrations": [1.9705, 1.0308],
    "io": 240.0, "alpha": 1.0, "beta": 0.15,
}
# Reinhard et al. 2001: each CIELAB channel's mean and standard deviation (L* 0-100, a*, b*) set to the target's.
# The target is the appearance Macenko's reference gives, so both methods aim at one reference: the mean statistics
# of 24 synthetic PAS crops (sample_data, seed 3, difficulty 0.6, 300 px) after Macenko normalisation.
REINHARD_REFERENCE = {"lab_means": [68.2, 19.6, -5.5], "lab_stds": [17.2, 9.8, 4.9]}

_REFERENCES = {"none": {}, "macenko": MACENKO_REFERENCE, "reinhard": REINHARD_REFERENCE}

# Which pixels are tissue: optical density above beta in every channel at Io (torchstain's Macenko rule).
TISSUE_IO, TISSUE_BETA = 240.0, 0.15
# Fewer tissue pixels than this (count and share) and the statistics both methods need are noise: blank tiles,
# white background. Real PAS crops hold 5-50 % by this rule (pink and magenta pass it only where dark).
MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION = 100, 0.01
# Macenko needs the tissue's optical densities to spread (variance above MIN_OD_VARIANCE) over a plane, two stains,
# that stands out of the scanner noise: the second principal variance at least MIN_SECOND_VARIANCE and
# PLANE_OVER_NOISE times the third. A single colour, with or without noise, has none (noise is isotropic: ratio
# 1-3); synthetic PAS crops have variances of 0.2-0.6 and 0.016-0.05, with a ratio of 75 or more.
MIN_OD_VARIANCE, MIN_SECOND_VARIANCE, PLANE_OVER_NOISE = 0.01, 1e-3, 10.0
# Reinhard scales each CIELAB channel to the target's standard deviation: a channel that barely varies would have
# its noise blown up into a colour cast. Noise of 8 grey levels gives L* 3 and a*, b* 5-7 around a flat colour;
# PAS crops have L* 11 or more. A grey image (a*, b* flat) is left too.
MIN_LIGHTNESS_STD, MIN_CHROMA_STD = 5.0, 1.0


@dataclass(frozen=True)
class StainNormalization:
    """A stain normalisation method and the fixed reference it maps every image onto (JSON-ready: it is stored
    in the preprocessed images' attributes and the model's metadata, and predict applies that one)."""

    method: str = "none"
    reference: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "reference": self.reference}

    @classmethod
    def from_json(cls, raw: Any) -> StainNormalization:
        """Checked: a method this code knows and a reference of the shape that method needs (else ValueError)."""
        if not isinstance(raw, dict) or raw.get("method") not in NORMALIZATION_METHODS:
            raise ValueError(f"stain normalisation {raw!r}: expected a method among {', '.join(NORMALIZATION_METHODS)}")
        method, reference = raw["method"], raw.get("reference") or {}
        expected = _REFERENCES[method]
        if not isinstance(reference, dict) or set(reference) != set(expected):
            raise ValueError(f"stain normalisation {method}: reference {reference!r} does not have the keys "
                             f"{sorted(expected)}")
        checked = {}
        for key, value in reference.items():
            try:
                array = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                array = np.array(np.nan)
            if array.shape != np.shape(expected[key]) or not np.all(np.isfinite(array)):
                raise ValueError(f"stain normalisation {method}: reference {key} = {value!r}, expected finite "
                                 f"numbers shaped like {expected[key]!r}")
            checked[key] = array.tolist()
        return cls(method, checked)


NO_NORMALIZATION = StainNormalization()


def stain_normalization(method: str) -> StainNormalization:
    """`method` (preprocess.stain_normalization) with this code's fixed reference."""
    return StainNormalization.from_json({"method": method, "reference": _REFERENCES.get(method)})


def normalize_stain(image: np.ndarray, normalization: StainNormalization) -> np.ndarray:
    """HxWx3 uint8 RGB in, the same shape and dtype out, mapped onto the reference's stain appearance.

    Apply it to the image content, before padding: the padding is not tissue. An image the method cannot
    handle (too little tissue, one colour, a flat channel) comes back unchanged: that is a property of the
    image, not an error, so it is logged at debug level only.
    """
    if normalization.method == "none":
        return image
    tissue = _tissue_optical_density(image)
    if len(tissue) < max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * image.shape[0] * image.shape[1]):
        log.debug("stain normalisation skipped: %d tissue pixels of %d", len(tissue), image.shape[0] * image.shape[1])
        return image
    if normalization.method == "macenko":
        return _macenko(image, tissue, normalization.reference)
    return _reinhard(image, normalization.reference)


def _tissue_optical_density(image: np.ndarray) -> np.ndarray:
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1.0) / TISSUE_IO)
    return od[np.all(od >= TISSUE_BETA, axis=1)]


def _macenko(image: np.ndarray, tissue: np.ndarray, reference: dict) -> np.ndarray:
    third, second, first = np.linalg.eigvalsh(np.cov(tissue.T))  # ascending
    if first < MIN_OD_VARIANCE or second < max(MIN_SECOND_VARIANCE, PLANE_OVER_NOISE * third):
        log.debug("Macenko skipped: the tissue's optical densities span no stain plane (principal variances "
                  "%.2g, %.2g, %.2g)", first, second, third)
        return image
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    normalizer = NumpyMacenkoNormalizer()
    normalizer.HERef = np.asarray(reference["stain_matrix"], dtype=float)
    normalizer.maxCRef = np.asarray(reference["max_concentrations"], dtype=float)
    try:
        with np.errstate(divide="raise", invalid="raise", over="raise"):  # a NaN would otherwise cast to 0
            out, _, _ = normalizer.normalize(np.ascontiguousarray(image), Io=reference["io"], alpha=reference["alpha"],
                                             beta=reference["beta"], stains=False)
    except (FloatingPointError, np.linalg.LinAlgError) as err:
        log.debug("Macenko skipped: %s", err)
        return image
    return np.ascontiguousarray(out, dtype=np.uint8)


def _reinhard(image: np.ndarray, reference: dict) -> np.ndarray:
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer
    from torchstain.numpy.utils import get_mean_std, lab_split, rgb2lab

    lightness, a, b = (get_mean_std(channel)[1] for channel in lab_split(rgb2lab(image.astype(np.float32) / 255.0)))
    if lightness < MIN_LIGHTNESS_STD or min(a, b) < MIN_CHROMA_STD:
        log.debug("Reinhard skipped: a CIELAB channel barely varies (standard deviations L* %.2g, a* %.2g, b* %.2g)",
                  lightness, a, b)
        return image
    normalizer = NumpyReinhardNormalizer()
    normalizer.target_means = np.asarray(reference["lab_means"], dtype=np.float32)
    normalizer.target_stds = np.asarray(reference["lab_stds"], dtype=np.float32)
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        return np.ascontiguousarray(normalizer.normalize(image), dtype=np.uint8)


def stored_normalization(attribute: str | bytes | None) -> StainNormalization:
    """The normalisation an image store's `stain_normalization` attribute records (JSON); a store written before
    it was recorded holds unnormalised images."""
    return NO_NORMALIZATION if attribute is None else StainNormalization.from_json(json.loads(attribute))
