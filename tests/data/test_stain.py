"""Stain and colour: colour augmentation (one path for the augment stage and online augmentation) and stain
normalisation (inside the one preprocessing path, travelling with the model to predict)."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import shipped_params_raw
from glomeruli.data.augment import OnlineAugment, augment_image, write_examples
from glomeruli.data.h5store import ImageStore
from glomeruli.data.images import load_model_input
from glomeruli.data.ingest import IngestConfig, ingest_dataset
from glomeruli.model.metadata import CLASS_NAMES, MetadataError, ModelMetadata, file_sha256, read_metadata, write_metadata
from glomeruli.core.params import AugmentParams, ParamsError, parse_params
from glomeruli.data.preprocess import preprocess_images
from glomeruli.data.stain import (NO_NORMALIZATION, StainNormalization, jitter_colour, normalize_stain,
                             stain_normalization, stored_normalization)

FILL = (5, 6, 7)  # not black: a padding colour no test image holds by chance
# Optical density per unit stain (R, G, B): scikit-image's Ruifrok-Johnston hematoxylin row, and a magenta
# PAS-like stain; a second, shifted pair for "another hospital".
HEMATOXYLIN, PAS = [0.65, 0.70, 0.29], [0.18, 0.65, 0.10]
HEMATOXYLIN_2, PAS_2 = [0.55, 0.75, 0.35], [0.10, 0.70, 0.25]


def augment_params(**settings) -> AugmentParams:
    """Geometric settings as shipped, every colour setting 0 unless given."""
    base = dict(copies_per_class={0: 1, 1: 4}, scale=(0.9, 1.1), translate=0.08, noise_std=4.0, flip=True,
                rotate90=True, hed_scale=0.0, hed_shift=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    return AugmentParams(**{**base, **settings})


COLOUR_ON = dict(hed_scale=0.2, hed_shift=0.2, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)


class FixedDraws:
    """Stands in for the generator in jitter_colour: its one block of draws in [-1, 1] is given, in its order
    (HED scale H, E, D; HED shift H, E, D; brightness; contrast; saturation; hue)."""

    ORDER = ("scale_h", "scale_e", "scale_d", "shift_h", "shift_e", "shift_d", "brightness", "contrast", "saturation",
             "hue")

    def __init__(self, **draws: float):
        self.values = np.array([draws.get(name, 0.0) for name in self.ORDER])

    def uniform(self, low, high, size):
        assert (low, high, size) == (-1.0, 1.0, len(self.ORDER))
        return self.values.copy()


def stained_tile(vectors, intensity: float = 1.0, size: int = 96, seed: int = 0, white_columns: int = 0) -> np.ndarray:
    """Beer-Lambert by hand: round nuclei of the first stain over a wavy background of the second."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    nuclei = np.zeros((size, size))
    for _ in range(30):
        cy, cx, radius = int(rng.integers(size)), int(rng.integers(size)), int(rng.integers(3, 8))
        nuclei += 1.2 * ((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2)
    matrix = 0.6 + 0.4 * np.sin(xx / 7.0) * np.cos(yy / 9.0)
    nuclei[:, :white_columns] = matrix[:, :white_columns] = 0
    od = intensity * (nuclei[..., None] * np.asarray(vectors[0]) + matrix[..., None] * np.asarray(vectors[1]))
    return np.clip(np.rint(255 * np.exp(-od)), 0, 255).astype(np.uint8)


def padded(content: np.ndarray, border: int) -> np.ndarray:
    return cv2.copyMakeBorder(content, border, border, border, border, cv2.BORDER_CONSTANT, value=FILL)


# ------------------------------------------------------------------------------------------------ augmentation

def _geometric_and_noise_as_before(image, rng, p, fill):
    """augment_image as written before colour jitter existed (the expectation, written out)."""
    size = image.shape[0]
    scale = rng.uniform(*p.scale)
    shift = rng.uniform(-p.translate, p.translate, size=2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), 0.0, scale)
    matrix[:, 2] += shift
    out = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=fill)
    if p.flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if p.rotate90:
        out = np.rot90(out, k=int(rng.integers(4)))
    if p.noise_std > 0:
        noise = rng.normal(0.0, p.noise_std, out.shape).astype(np.float32)
        out = np.clip(np.rint(out.astype(np.float32) + noise), 0, 255)
    return out.astype(np.uint8)


@pytest.mark.parametrize("noise_std", [4.0, 0.0])
def test_every_colour_setting_0_gives_the_variants_made_before_colour_jitter(noise_std):
    image = padded(stained_tile([HEMATOXYLIN, PAS], size=40), 4)
    p = augment_params(noise_std=noise_std)
    for record in range(6):
        expected = _geometric_and_noise_as_before(image, np.random.default_rng([42, record, 1]), p, FILL)
        np.testing.assert_array_equal(augment_image(image, np.random.default_rng([42, record, 1]), p, FILL), expected)


def test_colour_augmentation_is_seeded_keeps_dtype_shape_and_leaves_padding_as_padding():
    image = padded(stained_tile([HEMATOXYLIN, PAS], size=40), 6)
    geometric_only, coloured = augment_params(noise_std=0.0), augment_params(noise_std=0.0, **COLOUR_ON)
    for record in range(5):
        out = augment_image(image, np.random.default_rng([7, record, 1]), coloured, FILL)
        assert out.dtype == np.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(out, augment_image(image, np.random.default_rng([7, record, 1]), coloured, FILL))
        assert not np.array_equal(out, augment_image(image, np.random.default_rng([7, record, 2]), coloured, FILL))
        # The colour draws come after the geometric ones: the same warp, so its padding is known without colour.
        warped = augment_image(image, np.random.default_rng([7, record, 1]), geometric_only, FILL)
        padding = np.all(warped == FILL, axis=-1)
        assert padding.sum() > 4 * 48  # the fitted image's border and the warp's
        np.testing.assert_array_equal(out[padding], np.broadcast_to(FILL, (padding.sum(), 3)))
        assert np.abs(out[~padding].astype(int) - warped[~padding]).mean() > 1  # the tissue did change colour


def test_online_augmentation_draws_the_same_colours_per_seed_epoch_and_record():
    images = np.stack([padded(stained_tile([HEMATOXYLIN, PAS], size=24, seed=s), 4) for s in range(3)])
    online = OnlineAugment(augment_params(noise_std=0.0, **COLOUR_ON), FILL, seed=3)
    first = online.images(images, np.array([10, 11, 12]), epoch=2)
    np.testing.assert_array_equal(first, online.images(images, np.array([10, 11, 12]), epoch=2))
    assert not np.array_equal(first, online.images(images, np.array([10, 11, 12]), epoch=3))
    for variant in first:
        corner = variant[0, 0] if np.all(variant[0, 0] == FILL) else variant[-1, -1]
        assert tuple(corner) == FILL  # a 4-pixel border stays padding whatever the warp


def test_brightness_alone_scales_pixel_values_by_hand():
    image = np.array([[[100, 100, 100], [200, 200, 200], [240, 120, 60], list(FILL)]], np.uint8)
    out = jitter_colour(image, FixedDraws(brightness=1.0, hue=1.0, contrast=-1.0), augment_params(brightness=0.1),
                        FILL)
    # x 1.1, clipped at 255; the hue and contrast draws do nothing while their settings are 0; padding untouched
    np.testing.assert_array_equal(out, [[[110, 110, 110], [220, 220, 220], [255, 132, 66], list(FILL)]])


def test_contrast_alone_stretches_around_the_tissues_mean_grey_padding_left_out():
    image = np.array([[[100] * 3, [200] * 3, list(FILL), list(FILL), list(FILL)]], np.uint8)
    out = jitter_colour(image, FixedDraws(contrast=1.0), augment_params(contrast=0.5), FILL)
    # mean grey of the tissue 150 (the padding would pull it down): 100 -> 150 - 75, 200 -> 150 + 75
    np.testing.assert_array_equal(out, [[[75] * 3, [225] * 3, list(FILL), list(FILL), list(FILL)]])


def test_saturation_and_hue_leave_grey_alone_and_turn_colour():
    grey = np.array([[[30] * 3, [128] * 3, [250] * 3]], np.uint8)
    p = augment_params(saturation=0.5, hue=0.25)
    np.testing.assert_array_equal(jitter_colour(grey, FixedDraws(saturation=1.0, hue=1.0), p, FILL), grey)
    red = np.array([[[200, 0, 0]]], np.uint8)
    # hue + 0.25 of the circle: 0 -> 90 degrees, a chartreuse green of the same value and saturation
    np.testing.assert_array_equal(jitter_colour(red, FixedDraws(hue=1.0), augment_params(hue=0.25), FILL),
                                  [[[100, 200, 0]]])


def test_zero_draws_are_the_identity_even_outside_the_hed_cone():
    """Saturated magenta has green 0: its H-E-DAB concentrations are negative, which rgb2hed clips, so a plain
    rgb2hed -> hed2rgb round trip moves it; zero jitter must not."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image[:4, :, 1] = 0
    out = jitter_colour(image, FixedDraws(), augment_params(**COLOUR_ON), FILL)
    np.testing.assert_array_equal(out, image)


def test_a_hematoxylin_shift_darkens_by_the_hematoxylin_vector_in_optical_density():
    concentration = np.linspace(0.1, 1.2, 64).reshape(8, 8, 1)
    image = np.clip(np.rint(255 * np.exp(-concentration * np.asarray(HEMATOXYLIN))), 0, 255).astype(np.uint8)
    out = jitter_colour(image, FixedDraws(shift_h=1.0), augment_params(hed_shift=0.2), FILL)
    # Beer-Lambert: 0.2 more hematoxylin optical density multiplies each channel by exp(-0.2 * its absorbance)
    expected = image * np.exp(-0.2 * np.asarray(HEMATOXYLIN))
    assert np.abs(out.astype(float) - expected).max() <= 1.0
    assert (out <= image).all() and (out < image).any()


def test_augment_examples_sheet_is_a_deterministic_png(tiny_data, tmp_path):
    p = augment_params(**COLOUR_ON)
    write_examples(tiny_data.preprocessed, tmp_path / "a.png", p, seed=1, per_class=1)
    write_examples(tiny_data.preprocessed, tmp_path / "b.png", p, seed=1, per_class=1)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    picture = cv2.imread(str(tmp_path / "a.png"))
    assert picture is not None and picture.shape[0] > 200 and picture.shape[1] > 800  # 2 rows of 5 tiles


# ------------------------------------------------------------------------------------------------ normalisation

def _flat(colour, noise: float = 0.0, seed: int = 1) -> np.ndarray:
    image = np.full((64, 64, 3), colour, np.float64) + np.random.default_rng(seed).normal(0, noise, (64, 64, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
@pytest.mark.parametrize("name, image", [
    ("white", _flat(255)), ("white with scanner noise", _flat(250, 4)), ("light grey background", _flat(230, 4)),
    ("black", _flat(0)), ("black with noise", _flat(3, 4)), ("one colour", _flat((180, 90, 200))),
    ("one colour with noise", _flat((180, 90, 200), 4)), ("dark grey with noise", _flat(30, 8)),
])
def test_blank_white_black_and_single_colour_tiles_come_back_unchanged(method, name, image):
    out = normalize_stain(image, stain_normalization(method))
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image, err_msg=name)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_padding_stays_the_fill_through_load_model_input(method):
    content = stained_tile([HEMATOXYLIN_2, PAS_2], size=64)[:32]  # 32 x 64: 16 rows of padding above and below
    data = cv2.imencode(".png", cv2.cvtColor(content, cv2.COLOR_RGB2BGR))[1].tobytes()
    out = load_model_input(data, "wide.png", 64, FILL, 10**6, stain_normalization(method))
    plain = load_model_input(data, "wide.png", 64, FILL, 10**6)
    np.testing.assert_array_equal(plain[16:48], content)
    for rows in (out[:16], out[48:]):
        np.testing.assert_array_equal(rows, np.broadcast_to(FILL, rows.shape))
    assert np.abs(out[16:48].astype(int) - content).mean() > 3  # the content was normalised


def test_macenko_keeps_white_background_white():
    tile = stained_tile([HEMATOXYLIN, PAS], white_columns=48)
    out = normalize_stain(tile, stain_normalization("macenko"))
    assert (tile[:, :48] == 255).all() and (out[:, :48] >= 245).all()
    assert np.abs(out[:, 48:].astype(int) - tile[:, 48:]).mean() > 5


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalisation_brings_another_stain_close_to_the_first(method):
    first = stained_tile([HEMATOXYLIN, PAS])
    other_hospital = stained_tile([HEMATOXYLIN_2, PAS_2], intensity=1.3)
    normalization = stain_normalization(method)
    before = np.abs(first.astype(float) - other_hospital).mean()
    after = np.abs(normalize_stain(first, normalization).astype(float) - normalize_stain(other_hospital, normalization)).mean()
    assert before > 15 and after < before / 4, (before, after)


def test_the_reference_travels_in_the_models_metadata(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"stands for a model: the metadata only hashes it")
    base = dict(image_size=32, fill=(0, 0, 0), threshold=0.5, threshold_rule="fixed", class_names=CLASS_NAMES,
                model_sha256=file_sha256(model), max_pixels=10**6)
    write_metadata(model, ModelMetadata(**base, stain_normalization=stain_normalization("macenko")))
    raw = json.loads((tmp_path / "model.meta.json").read_text())
    assert raw["stain_normalization"]["method"] == "macenko"
    assert raw["stain_normalization"]["reference"]["stain_matrix"] == [[0.5626, 0.2159], [0.7201, 0.8012],
                                                                        [0.4062, 0.5581]]
    assert read_metadata(model).stain_normalization == stain_normalization("macenko")
    del raw["stain_normalization"]  # metadata written before normalisation existed: the images were not normalised
    (tmp_path / "model.meta.json").write_text(json.dumps(raw))
    assert read_metadata(model).stain_normalization == NO_NORMALIZATION
    for bad in ({"method": "vahadane", "reference": {}}, {"method": "reinhard", "reference": {"lab_means": [1, 2]}},
                {"method": "reinhard", "reference": {"lab_means": [1, 2, "x"], "lab_stds": [1, 1, 1]}}):
        (tmp_path / "model.meta.json").write_text(json.dumps({**raw, "stain_normalization": bad}))
        with pytest.raises(MetadataError, match="stain normalisation"):
            read_metadata(model)


def test_stored_normalization_reads_a_store_attribute_and_a_store_without_one():
    assert stored_normalization(None) == NO_NORMALIZATION
    attribute = json.dumps(stain_normalization("reinhard").to_json())
    assert stored_normalization(attribute) == StainNormalization("reinhard", {"lab_means": [68.2, 19.6, -5.5],
                                                                              "lab_stds": [17.2, 9.8, 4.9]})


@pytest.mark.parametrize("key, value, message", [
    ("augment.hed_scale", -0.1, "augment.hed_scale"), ("augment.hed_scale", 1.0, "augment.hed_scale"),
    ("augment.hed_shift", "light", "augment.hed_shift"), ("augment.hue", 0.6, "augment.hue"),
    ("augment.brightness", True, "augment.brightness"),
    ("preprocess.stain_normalization", "vahadane", "none, macenko, reinhard"),
])
def test_colour_and_stain_settings_are_validated_by_name(key, value, message):
    raw = shipped_params_raw()
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        parse_params(raw)
    del raw[section][name]
    with pytest.raises(ParamsError, match=f"`{key}` is missing"):
        parse_params(raw)


def test_training_and_predict_feed_the_model_identical_normalised_pixels(tiny_data, tmp_path, monkeypatch):
    """The preprocess stage's stored rows (what training and evaluation read) against what `predict` hands the
    model for the same files, with Macenko on: the metadata carries the reference from the store to predict."""
    import keras

    import glomeruli.commands.predict
    from glomeruli.commands.predict import predict_folder

    size, p = 48, tiny_data.params
    config = IngestConfig(class_dirs=p.ingest.class_dirs, labels_csv=p.ingest.labels_csv,
                          group_regex=p.ingest.group_regex, max_pixels=p.ingest.max_pixels,
                          max_unreadable_fraction=p.ingest.max_unreadable_fraction, workers=1)
    rows = ingest_dataset(tiny_data.raw, config).rows[:10]
    store_path = tmp_path / "preprocessed.h5"
    preprocess_images(tiny_data.raw, rows, store_path, size=size, fill=(0, 0, 0), max_pixels=10**8, workers=1,
                      stain=stain_normalization("macenko"))
    with ImageStore(store_path) as store:
        stored, ids = store.read(np.arange(len(rows))), list(store.meta.ids)
        stain = stored_normalization(store.attrs["stain_normalization"])
    assert stain.method == "macenko"
    unnormalised = [load_model_input((tiny_data.raw / r.path).read_bytes(), r.path, size, (0, 0, 0), 10**8)
                    for r in rows]
    assert sum(not np.array_equal(a, b) for a, b in zip(stored, unnormalised)) >= len(rows) // 2

    inputs = keras.Input((size, size, 3))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs)))
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    write_metadata(model_path, ModelMetadata(image_size=size, fill=(0, 0, 0), threshold=0.5, threshold_rule="fixed",
                                             class_names=CLASS_NAMES, model_sha256=file_sha256(model_path),
                                             max_pixels=10**8, stain_normalization=stain))
    folder = tmp_path / "to_predict"
    folder.mkdir()
    for row in rows:
        shutil.copy(tiny_data.raw / row.path, folder / row.name)
    fed, real = [], glomeruli.commands.predict.predict_batch
    monkeypatch.setattr(glomeruli.commands.predict, "predict_batch",
                        lambda m, x, batch_size: fed.append(np.array(x)) or real(m, x, batch_size))
    predictions, skipped = predict_folder(model_path, folder, batch_size=4, workers=1)
    assert not skipped
    row_of = {str(record_id).rsplit("/", 1)[-1]: i for i, record_id in enumerate(ids)}
    np.testing.assert_array_equal(np.concatenate(fed), stored[[row_of[pr.name] for pr in predictions]].astype(np.float32))
