"""Issue 11: fine-tuning from scratch (BatchNormalization trains), online augmentation, the learning-rate
schedule, and the head in float32 under mixed precision."""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path

import keras
import numpy as np
import pytest

from glomeruli.data.augment import OnlineAugment
from glomeruli.model.backend import configure
from glomeruli.model.inference import ArrayRows
from glomeruli.model.efficientnet import base_of, build_model, head_of, unfreeze_top_blocks
from glomeruli.core.params import FinetuneParams
from glomeruli.model.batches import Batches, OnlineRows
from glomeruli.model.checkpoints import Resume
from glomeruli.model.training import PhaseData, finetune, fit, learning_rate


def _small_phase(tiny_data, store) -> PhaseData:
    """32 training images of the tiny set, 16 of each class (two steps an epoch), and up to 16 validation ones."""
    from glomeruli.model.training import load_phase_data

    data = load_phase_data(store, tiny_data.split, 1.0)
    train = np.concatenate([np.flatnonzero(data.y_train == label)[:16] for label in (0, 1)])
    val = np.arange(min(16, len(data.y_val)))
    return PhaseData(ArrayRows(data.x_train.read(train)), data.y_train[train],
                     ArrayRows(data.x_val.read(val)), data.y_val[val])


def _bn_state(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(w) for w in layer.get_weights()]
            for layer in base_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)}


class _AtEpochEnd(keras.callbacks.Callback):
    """Records the model's BatchNormalization state and a kernel as training left them, before early stopping
    may hand back the starting weights (fine-tuning keeps the start when no epoch beats it on validation)."""

    def __init__(self, model: keras.Model):
        super().__init__()
        self.watched, self.bn, self.kernel = model, None, None

    def on_epoch_end(self, epoch, logs=None):
        self.bn, self.kernel = _bn_state(self.watched), _kernel(self.watched, "block7a_project_conv")


def _finetune_top_block(tiny_data, model: keras.Model, *, from_scratch: bool, caplog) -> _AtEpochEnd:
    p = tiny_data.params
    trained = _AtEpochEnd(model)
    params = replace(p.finetune, unfreeze_blocks=1, epochs=1, batch_size=16, lr=1e-3, lr_schedule="constant",
                     online_augment=False)
    with tiny_data.store() as store, caplog.at_level(logging.INFO, logger="glomeruli.model.training"):
        finetune(model, _small_phase(tiny_data, store), params, replace(p.runtime, cache_features=True), seed=3,
                 callbacks=[trained], from_scratch=from_scratch)
    return trained


def _kernel(model: keras.Model, layer: str) -> np.ndarray:
    return keras.ops.convert_to_numpy(base_of(model).get_layer(layer).kernel)


@pytest.mark.slow
def test_batchnorm_trains_from_scratch_and_stays_fixed_over_pretrained_weights(tiny_data, tmp_path, caplog):
    """The top block fine-tuned (a small backward graph; the learning test trains every layer from scratch)."""
    configure(3, "float32", "auto")
    scratch = build_model(32, "none", 0.3)
    before_bn, before_kernel = _bn_state(scratch), _kernel(scratch, "block7a_project_conv")
    trained = _finetune_top_block(tiny_data, scratch, from_scratch=True, caplog=caplog)
    after_bn = trained.bn
    for name in ("block7a_bn", "top_bn"):  # gamma, beta, moving mean, moving variance all trained
        assert all(not np.allclose(a, b) for a, b in zip(before_bn[name], after_bn[name])), name
    # A frozen block's BatchNormalization is not trained (gamma, beta), but its statistics are set once from data.
    gamma, beta, mean, variance = (np.array_equal(a, b) for a, b in zip(before_bn["block1a_bn"], after_bn["block1a_bn"]))
    assert gamma and beta and not mean and not variance
    assert not np.allclose(before_kernel, trained.kernel)
    assert "activation cache off" in caplog.text and "from scratch the base runs in training mode" in caplog.text
    assert scratch.get_layer("backbone").get_config()["train_statistics"] is True  # saved with the model

    # "Pretrained": weights from a file, as model.weights may name one (no download needed).
    weights = tmp_path / "b3.weights.h5"
    base_of(build_model(32, "none", 0.3)).save_weights(weights)
    pretrained = build_model(32, str(weights), 0.3)
    before_bn, before_kernel = _bn_state(pretrained), _kernel(pretrained, "block7a_project_conv")
    caplog.clear()
    trained = _finetune_top_block(tiny_data, pretrained, from_scratch=False, caplog=caplog)
    after_bn = trained.bn
    assert all(np.array_equal(a, b) for name in before_bn for a, b in zip(before_bn[name], after_bn[name]))
    assert not np.allclose(before_kernel, trained.kernel), "the top block did not train"
    assert "activation cache off" not in caplog.text  # everything below the top block is fixed: cached

    # unfreeze_blocks: all trains the stem too; BatchNormalization only from scratch.
    for from_scratch in (False, True):
        unfreeze_top_blocks(pretrained, "all", train_statistics=from_scratch)
        layers = base_of(pretrained).layers
        assert base_of(pretrained).get_layer("stem_conv").trainable
        assert all(l.trainable == from_scratch for l in layers if isinstance(l, keras.layers.BatchNormalization))
        assert all(l.trainable for l in layers if isinstance(l, keras.layers.Conv2D))


def test_head_is_float32_under_mixed_bfloat16():
    try:
        configure(0, "mixed_bfloat16", "auto")
        model = build_model(32, "none", 0.3)
        assert base_of(model).get_layer("stem_conv").compute_dtype == "bfloat16"  # the policy is on
        layers = head_of(model).layers
        assert [layer.name for layer in layers] == ["head_norm", "head_dropout", "probability"]
        for layer in layers:
            assert layer.compute_dtype == "float32", layer.name
            # Normalization's sample count is an integer variable; every floating one is float32.
            assert all(w.dtype == "float32" for w in layer.weights if "float" in str(w.dtype)), layer.name
            assert layer.weights or layer.name == "head_dropout"
        features = np.random.default_rng(0).normal(size=(4, head_of(model).input_shape[-1])).astype(np.float32)
        assert keras.ops.convert_to_numpy(head_of(model).layers[0](features)).dtype == np.float32
    finally:
        configure(0, "float32", "auto")


def _augment_settings(tiny_data, seed: int = 5) -> OnlineAugment:
    p = tiny_data.params
    return OnlineAugment(p.augment, p.preprocess.fill, seed)


def _epoch(images: np.ndarray, augment: OnlineAugment, epoch: int, *, shuffle_seed: int = 1,
           batch_size: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One epoch's batches from fresh objects; y is the record number, so every image can be traced back."""
    batches = Batches(OnlineRows(ArrayRows(images), augment), np.arange(len(images)), batch_size, seed=shuffle_seed,
                      epoch=epoch)
    drawn = [batches[i] for i in range(len(batches))]
    return [x for x, _ in drawn], [y.astype(int) for _, y in drawn]


def test_online_augmentation_draws_the_same_batches_for_the_same_seed_and_epoch(tiny_data):
    with tiny_data.store() as store:
        images = store.read(np.arange(24))
    first, first_records = _epoch(images, _augment_settings(tiny_data, 5), 0)
    again, again_records = _epoch(images, _augment_settings(tiny_data, 5), 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(a, b) for a, b in zip(first_records, again_records))
    # Every record once per epoch, in a shuffled order.
    assert sorted(np.concatenate(first_records).tolist()) == list(range(24))
    assert np.concatenate(first_records).tolist() != list(range(24))
    # Epoch 1 reached by running through epoch 0 equals epoch 1 started directly (a resumed run).
    running = Batches(OnlineRows(ArrayRows(images), _augment_settings(tiny_data, 5)), np.arange(24), 8, seed=1)
    running.on_epoch_end()
    second, _ = _epoch(images, _augment_settings(tiny_data, 5), 1)
    assert all(np.array_equal(running[i][0], b) for i, b in enumerate(second))
    # Fresh variants of every record each epoch and for another seed, the same record order for another
    # augmentation seed; pixels stay integers 0-255.
    by_record = lambda xs, ys: {int(r): x for batch, rs in zip(xs, ys) for x, r in zip(batch, rs)}  # noqa: E731
    epoch0, epoch1 = by_record(first, first_records), by_record(*_epoch(images, _augment_settings(tiny_data, 5), 1))
    other_seed, other_records = _epoch(images, _augment_settings(tiny_data, 6), 0)
    assert all(np.array_equal(a, b) for a, b in zip(first_records, other_records))
    other_seed = by_record(other_seed, other_records)
    assert not any(np.array_equal(epoch0[r], epoch1[r]) or np.array_equal(epoch0[r], other_seed[r]) for r in range(24))
    assert not any(np.array_equal(epoch0[r], images[r]) for r in range(24))
    assert all(np.array_equal(b, np.round(b)) and b.min() >= 0 and b.max() <= 255 for b in first)


@pytest.mark.parametrize("op", ["flip", "rotate90"])
def test_online_augmentation_turned_down_to_one_op_gives_that_op_of_each_record(tiny_data, op):
    """No scale, shift or noise: each drawn image is the record's own pixels, flipped left-right or not (or turned
    by a multiple of 90 degrees), and over the records of an epoch every variant occurs."""
    with tiny_data.store() as store:
        images = store.read(np.arange(24))
    shipped = tiny_data.params.augment
    off = {f.name: 0.0 for f in fields(shipped) if isinstance(getattr(shipped, f.name), float)}  # shift, noise, colour
    params = replace(shipped, **off, scale=(1.0, 1.0), flip=op == "flip", rotate90=op == "rotate90")
    variants = {"flip": lambda image: [image, image[:, ::-1]],
                "rotate90": lambda image: [image, np.rot90(image, 1), np.rot90(image, 2), np.rot90(image, 3)]}[op]
    for epoch in (0, 1):
        xs, ys = _epoch(images, OnlineAugment(params, (0, 0, 0), seed=5), epoch)
        seen = []
        for batch, records in zip(xs, ys):
            for x, record in zip(batch, records):
                candidates = variants(images[record])
                assert not any(np.array_equal(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1:])
                matches = [k for k, candidate in enumerate(candidates) if np.array_equal(x, candidate)]
                assert len(matches) == 1, (epoch, record)
                seen += matches
        assert sorted(set(seen)) == list(range(len(variants(images[0]))))


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_online_augmented_cosine_run_resumes_to_identical_weights(tiny_data, tmp_path):
    """Online augmentation drawn by prefetching threads, warm-up + cosine: killed after an epoch, a rerun
    ends with the weights of an uninterrupted run (the kill/resume pattern of test_robustness)."""
    with tiny_data.store() as store:
        images = store.read(np.arange(48))
    labels = np.arange(48) % 2  # both classes in every batch (balanced weights need both)
    params = FinetuneParams(epochs=4, batch_size=8, lr=1e-2, class_weight="balanced", patience=4, unfreeze_blocks=1,
                            online_augment=True, lr_schedule="cosine", warmup_epochs=1)

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise _Killed

    def train(folder: Path, kill: bool = False):
        configure(3, "float32", "auto")
        model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                                  keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.3),
                                  keras.layers.Dense(1, activation="sigmoid")])
        data = PhaseData(OnlineRows(ArrayRows(images), _augment_settings(tiny_data)), labels,
                         ArrayRows(images[:16]), labels[:16])
        try:
            fit(model, data, params, seed=3, callbacks=[Resume(folder), *([Kill()] if kill else [])], workers=2)
        except _Killed:
            return None
        return model.get_weights(), int(model.optimizer.iterations)

    expected, steps = train(tmp_path / "uninterrupted")
    assert steps == 4 * 6
    assert train(tmp_path / "killed", kill=True) is None
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["epoch-0002"]
    weights, _ = train(tmp_path / "killed")
    assert all(np.array_equal(a, b) for a, b in zip(weights, expected))


def test_learning_rate_schedule_warms_up_then_decays():
    base = dict(batch_size=8, lr=1e-3, class_weight="balanced", patience=3, unfreeze_blocks=2, online_augment=False)
    constant = FinetuneParams(epochs=5, lr_schedule="constant", warmup_epochs=1, **base)
    assert learning_rate(constant, 10) == 1e-3
    cosine = learning_rate(FinetuneParams(epochs=5, lr_schedule="cosine", warmup_epochs=1, **base), 10)
    at = {step: float(cosine(step)) for step in (0, 5, 10, 30, 50)}
    # Warm-up: 0 -> lr over the first epoch's 10 steps; then half a cosine over the 40 steps left.
    assert at[0] == 0.0 and at[5] == pytest.approx(5e-4) and at[10] == pytest.approx(1e-3)
    assert at[30] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 20 / 40))) and at[50] == pytest.approx(0.0)
    # warmup_epochs >= epochs: clamped to the run, all warm-up, lr reached on the last step.
    clamped = learning_rate(FinetuneParams(epochs=2, lr_schedule="cosine", warmup_epochs=5, **base), 10)
    assert float(clamped(10)) == pytest.approx(5e-4) and float(clamped(20)) == pytest.approx(1e-3)
    no_warmup = learning_rate(FinetuneParams(epochs=2, lr_schedule="cosine", warmup_epochs=0, **base), 10)
    assert float(no_warmup(0)) == pytest.approx(1e-3) and float(no_warmup(10)) == pytest.approx(5e-4)
