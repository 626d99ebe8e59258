"""The model: freezing, unfreezing whole top blocks with BatchNormalization frozen, splitting, safe loading."""

import urllib.error

import keras
import numpy as np
import pytest

from glomeruli.model import efficientnet as M

X = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return M.build_model(32, "none", 0.3)


def test_frozen_base_leaves_only_the_head_trainable(model):
    M.freeze_base(model)
    trainable = {w.path for w in model.trainable_weights}
    assert trainable and all(p.startswith("head/") for p in trainable), trainable


def test_unfreezing_whole_top_blocks_keeps_batchnorm_frozen(model):
    names = M.unfreeze_top_blocks(model, 2)
    assert names and all(n.startswith(("block6", "block7", "top_")) for n in names)
    base = M.base_of(model)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
        if layer.name.startswith("block5"):
            assert not layer.trainable
    assert any(n.startswith("block6") for n in names) and any(n.startswith("top_") for n in names)
    assert not any(n.startswith("block6") for n in M.unfreeze_top_blocks(model, 1))
    M.freeze_base(model)


@pytest.mark.slow
def test_split_at_block_reproduces_the_model(model):
    bottom, top = M.split_at_block(model, 2)
    activations = bottom.predict(X, verbose=0)
    np.testing.assert_allclose(top.predict(activations, verbose=0), model.predict(X, verbose=0), rtol=1e-5, atol=1e-6)
    features = M.feature_model(model).predict(X, verbose=0)
    np.testing.assert_allclose(M.head_of(model).predict(features, verbose=0), model.predict(X, verbose=0), rtol=1e-5)


@pytest.mark.slow
def test_reset_head_standardisation_passes_the_features_through_unscaled():
    """From scratch the head must see the base's features as they are, also in an already traced predict."""
    keras.utils.set_random_seed(1)
    fresh = M.build_model(32, "none", 0.3)
    features = M.feature_model(fresh).predict(X, verbose=0)
    M.adapt_head(fresh, 0.1 * np.random.default_rng(1).normal(size=(16, features.shape[1])))  # spread 0.1: x10
    fresh.predict(X, verbose=0)  # traces the predict function with the adapted statistics
    M.reset_head_standardisation(fresh)
    kernel, bias = M.head_of(fresh).get_layer("probability").get_weights()
    expected = 1 / (1 + np.exp(-(features.astype(np.float64) @ kernel + bias)))
    np.testing.assert_allclose(fresh.predict(X, verbose=0), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_save_and_safe_load_round_trip(model, tmp_path):
    model.save(tmp_path / "m.keras")
    loaded = M.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0), rtol=1e-6)


def test_a_model_asking_for_arbitrary_code_is_refused(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda t: t * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "evil.keras")
    with pytest.raises(M.ModelLoadError, match="arbitrary code"):
        M.load_model(tmp_path / "evil.keras")


def test_corrupt_or_missing_model_file(tmp_path):
    (tmp_path / "bad.keras").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(M.ModelLoadError, match="dvc repro"):
        M.load_model(tmp_path / "bad.keras")
    with pytest.raises(M.ModelLoadError, match="not found"):
        M.load_model(tmp_path / "none.keras")


def test_offline_imagenet_names_the_three_ways_out(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("keras.src.applications.efficientnet.file_utils.get_file", offline)
    with pytest.raises(M.WeightsError) as err:
        M.build_model(32, "imagenet", 0.3)
    message = str(err.value)
    assert "~/.keras/models/" in message and M.IMAGENET_FILE in message and "model.weights" in message
    assert "none" in message
