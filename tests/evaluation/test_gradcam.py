"""Grad-CAM is right, not just present: on images whose class evidence sits in a known region, the heat
falls there; on both backends (JAX in a subprocess, without TensorFlow, as on our GPU boxes)."""

import keras
import numpy as np
import pytest
from keras import ops

from glomeruli.evaluation.gallery import correct_sections, error_sections
from glomeruli.evaluation.gradcam import CamParts, efficientnet_cam_parts, gradcam
from glomeruli.model.efficientnet import build_model

SIZE, PATCH = 24, 6


def evidence_model() -> tuple[keras.Model, CamParts]:
    """conv (stride 2, so the map is upsampled) -> global average -> logit, weights set by hand:
    channel 0 fires on red patches (evidence for class 1), channel 1 on green ones (evidence for class 0)."""
    image = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(2, 3, strides=2, padding="same", activation="relu", name="last_conv")
    pool = keras.layers.GlobalAveragePooling2D()
    dense = keras.layers.Dense(1)
    model = keras.Model(image, dense(pool(conv(image))))
    kernel = np.zeros((3, 3, 3, 2), np.float32)
    kernel[..., :, 0] = np.array([1.0, -1.0, -1.0]) / 9  # red minus the rest
    kernel[..., :, 1] = np.array([-1.0, 1.0, -1.0]) / 9  # green minus the rest
    conv.set_weights([kernel, np.full(2, -0.2, np.float32)])
    dense.set_weights([np.array([[5.0], [-5.0]], np.float32), np.zeros(1, np.float32)])
    features = keras.Model(image, conv.output)
    return model, CamParts(features, lambda a: ops.squeeze(dense(pool(a)), -1))


def evidence_images(n: int, seed: int = 0) -> np.ndarray:
    """Grey noise, a red patch in the top-right quadrant and a green patch in the bottom-left one."""
    rng = np.random.default_rng(seed)
    x = np.clip(0.5 + 0.1 * rng.standard_normal((n, SIZE, SIZE, 3)), 0, 1).astype(np.float32)
    for i in range(n):
        r, c = rng.integers(1, SIZE // 2 - PATCH, 2)
        x[i, r:r + PATCH, SIZE // 2 + c:SIZE // 2 + c + PATCH] = (1.0, 0.0, 0.0)
        r, c = rng.integers(1, SIZE // 2 - PATCH, 2)
        x[i, SIZE // 2 + r:SIZE // 2 + r + PATCH, c:c + PATCH] = (0.0, 1.0, 0.0)
    return x


def share_of_heat(heat: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return heat[:, rows, cols].sum(axis=(1, 2)) / heat.sum(axis=(1, 2))


def test_gradcam_localises_the_evidence_of_either_class():
    _, parts = evidence_model()
    images = evidence_images(6)
    top_right, bottom_left = (slice(0, SIZE // 2), slice(SIZE // 2, SIZE)), (slice(SIZE // 2, SIZE), slice(0, SIZE // 2))
    towards_1 = gradcam(parts, images, towards_positive=np.ones(6, bool), batch_size=4)
    towards_0 = gradcam(parts, images, towards_positive=np.zeros(6, bool), batch_size=4)
    assert towards_1.shape == (6, SIZE, SIZE) and 0 <= towards_1.min() and towards_1.max() == pytest.approx(1.0)
    assert (share_of_heat(towards_1, *top_right) > 0.8).all(), share_of_heat(towards_1, *top_right)
    assert (share_of_heat(towards_0, *bottom_left) > 0.8).all(), share_of_heat(towards_0, *bottom_left)
    # the hottest pixel sits on the red patch itself
    for heat, image in zip(towards_1, images):
        r, c = np.unravel_index(heat.argmax(), heat.shape)
        assert image[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2, 0].max() == 1.0


@pytest.mark.slow
def test_efficientnet_split_reproduces_the_model():
    """sigmoid(the score Grad-CAM differentiates) is the model's own probability."""
    model = build_model(32, "none", 0.3)
    dense = model.get_layer("head").get_layer("probability")
    rng = np.random.default_rng(0)
    dense.set_weights([rng.normal(0, 0.5, dense.kernel.shape).astype(np.float32), np.array([0.3], np.float32)])
    parts = efficientnet_cam_parts(model)
    x = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    logit = np.asarray(parts.logit(ops.convert_to_tensor(parts.features.predict(x, verbose=0))))
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), model.predict(x, verbose=0).ravel(), rtol=1e-4, atol=1e-5)
    heat = gradcam(parts, x, towards_positive=np.array([True, False, True]))
    assert heat.shape == (3, 32, 32) and np.isfinite(heat).all()


def test_sheets_pick_every_error_and_spread_correct_cases():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1])
    prob = np.array([0.9, 0.2, 0.4, 0.7, 0.1, 0.3, 0.95, 0.8, 0.05, 0.6])
    fn, fp = error_sections(labels, prob, 0.5, max_tiles=10)
    assert fn.indices.tolist() == [1, 2] and fp.indices.tolist() == [6, 3]  # most confidently wrong first
    fn, fp = error_sections(labels, prob, 0.5, max_tiles=2)
    assert len(fn.indices) == 1 and len(fp.indices) == 1 and "1 shown of 2" in fn.title
    gs, non_gs = correct_sections(labels, prob, 0.5, per_class=2)
    assert gs.indices.tolist() == [0, 9] and non_gs.indices.tolist() == [5, 8]  # highest and lowest probability


@pytest.mark.slow
def test_gradcam_under_jax_without_tensorflow(tmp_path):
    from jaxrun import pytest_under_jax

    result = pytest_under_jax(tmp_path, "tests/evaluation/test_gradcam.py", "-k", "localises")
    assert "1 passed" in result.stdout


def test_gradcam_focus_shares_by_hand():
    from glomeruli.evaluation.gradcam import gradcam_focus, tissue_mask

    # 8x8 image: left half padding (fill 0,0,0), top-right quarter white glass, bottom-right quarter pink tissue.
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4, 4:] = 245
    image[4:, 4:] = (200, 120, 180)
    expected_tissue = np.zeros((8, 8), bool)
    expected_tissue[4:, 4:] = True
    assert np.array_equal(tissue_mask(image, (0, 0, 0)), expected_tissue)
    heat = np.zeros((3, 8, 8))
    heat[0, 4:, 4:] = 1.0  # all on tissue; the central 4x4 square (rows/cols 2..5) holds a 2x2 of it
    heat[1, 0, 0] = 1.0  # all in a padded corner
    images = np.stack([image] * 3)  # map 2 is all zero: no evidence
    focus = gradcam_focus(heat, images, (0, 0, 0))
    assert focus.tissue[0] == 1.0 and focus.centre[0] == pytest.approx(4 / 16)
    assert focus.tissue[1] == 0.0 and focus.centre[1] == 0.0
    assert np.isnan(focus.tissue[2]) and np.isnan(focus.centre[2])
    assert focus.centre_area == 16 / 64 and focus.tissue_area[0] == 16 / 64


def test_focus_summary_leaves_out_maps_without_heat():
    from glomeruli.evaluation.gallery import focus_sample, focus_summary
    from glomeruli.evaluation.gradcam import Focus

    summary = focus_summary(Focus(np.array([1.0, 0.5, np.nan]), np.array([0.2, 0.4, np.nan]),
                                  np.array([0.5, 0.5, 0.5]), 0.25))
    assert summary == {"images": 2, "images_without_heat": 1, "heat_on_tissue": 0.75, "tissue_area": 0.5,
                       "heat_on_centre": pytest.approx(0.3), "centre_area": 0.25}
    assert focus_sample(5, 0).tolist() == [0, 1, 2, 3, 4] and focus_sample(10, 3).tolist() == [0, 4, 9]
