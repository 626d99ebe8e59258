"""Training: cached phases give the same weights as full-graph training, and the model learns."""

from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest

from conftest import build_tiny_data
from glomeruli.model.backend import configure
from glomeruli.evaluation.evaluate import binary_metrics, choose_threshold
from glomeruli.model.efficientnet import build_model, head_of, load_model
from glomeruli.model.inference import ArrayRows, StoreRows, predict_rows
from glomeruli.model.training import (Batches, finetune, load_phase_data,
                                sample_weights, train_frozen)
from glomeruli.model.recipes import FROM_SCRATCH_OVERRIDES


def _frozen_model(tiny_data, cache: bool, seed: int = 7, epochs: int = 3) -> keras.Model:
    p = tiny_data.params
    configure(seed, "float32", "auto")
    model = build_model(32, "none", 0.3)
    with tiny_data.store() as store:
        data = load_phase_data(store, tiny_data.split, 1.0)
        train_frozen(model, data, replace(p.train_frozen, epochs=epochs, batch_size=8),
                     replace(p.runtime, cache_features=cache), seed=seed, callbacks=[])
    return model


@pytest.mark.slow
def test_cached_frozen_phase_equals_full_graph_training(tiny_data):
    cached, full = _frozen_model(tiny_data, True), _frozen_model(tiny_data, False)
    cached_w, full_w = head_of(cached).get_weights(), head_of(full).get_weights()
    assert len(cached_w) == len(full_w) > 0
    for a, b in zip(cached_w, full_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    initial = head_of(build_model(32, "none", 0.3)).get_weights()
    assert not np.allclose(cached_w[-2], initial[-2]), "the head did not train"


class _WeightsAtEpochEnd(keras.callbacks.Callback):
    """The whole model's weights as the last epoch left them, before early stopping may hand back the start
    (the cached path fits only the top of the model; its variables are the model's own)."""

    def __init__(self, model: keras.Model):
        super().__init__()
        self.watched, self.weights = model, None

    def on_epoch_end(self, epoch, logs=None):
        self.weights = self.watched.get_weights()


@pytest.mark.slow
def test_cached_finetune_equals_full_graph_training(tiny_data, tmp_path):
    p = tiny_data.params
    _frozen_model(tiny_data, True, epochs=1).save(tmp_path / "frozen.keras")
    results, final = [], []
    for cache in (True, False):
        configure(11, "float32", "auto")
        model = load_model(tmp_path / "frozen.keras")
        trained = _WeightsAtEpochEnd(model)
        with tiny_data.store() as store:
            data = load_phase_data(store, tiny_data.split, 1.0)
            # memory budget 0 forces the activation cache through the temporary HDF5 path too
            runtime = replace(p.runtime, cache_features=cache, memory_budget_gb=0.0 if cache else 1.0)
            finetune(model, data, replace(p.finetune, epochs=2, batch_size=8, unfreeze_blocks=1, lr=1e-3),
                     runtime, seed=11, callbacks=[trained])
        results.append(trained.weights)
        final.append(model.get_weights())
    before = load_model(tmp_path / "frozen.keras").get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(results[0], before)), "fine-tuning changed nothing"
    for a, b in [*zip(*results), *zip(*final)]:  # every epoch's weights, and the model handed back
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batches_reshuffle_per_epoch_and_repeat_exactly():
    x = ArrayRows(np.arange(10, dtype=np.float32)[:, None])
    y = np.arange(10) % 2
    a, b = Batches(x, y, 4, seed=1), Batches(x, y, 4, seed=1)
    first = [a[i][1].tolist() for i in range(len(a))]
    assert first == [b[i][1].tolist() for i in range(len(b))] and len(a) == 3
    a.on_epoch_end()
    assert [a[i][0].ravel().tolist() for i in range(3)] != [b[i][0].ravel().tolist() for i in range(3)]
    assert sorted(np.concatenate([a[i][0].ravel() for i in range(3)]).tolist()) == list(range(10))


def test_balanced_sample_weights():
    labels = np.array([0] * 8 + [1] * 2)
    w = sample_weights(labels, "balanced")
    # n / (2 * n_class): 10 / 16 for each of the 8 negatives, 10 / 4 for each of the 2 positives
    np.testing.assert_allclose(w, [0.625] * 8 + [2.5] * 2)
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())
    assert sample_weights(labels, "none") is None


@pytest.mark.slow
def test_model_learns_on_synthetic_data(tmp_path):
    """Within a CPU budget, balanced accuracy on held-out test images clearly beats the majority class."""
    data = build_tiny_data(tmp_path, n_images=400, size=64, seed=5)
    p = data.params
    configure(0, "float32", "auto")
    model = build_model(64, "none", p.model.dropout)
    with data.store() as store:
        phase = load_phase_data(store, data.split, 1.0)
        train_frozen(model, phase, replace(p.train_frozen, epochs=20, lr=1e-3, patience=4, batch_size=32),
                     p.runtime, seed=0, callbacks=[])
        finetune(model, phase, replace(p.finetune, epochs=3, lr=1e-4, unfreeze_blocks=1, batch_size=32),
                 p.runtime, seed=0, callbacks=[])
        val = predict_rows(model, StoreRows(store, data.split.val), 64).ravel()
        test = predict_rows(model, StoreRows(store, data.split.test), 64).ravel()
        labels = store.meta.labels
    threshold = choose_threshold(labels[data.split.val], val, "max_f1")
    metrics = binary_metrics(labels[data.split.test], test, threshold)
    majority_rate = max(np.mean(labels[data.split.test]), 1 - np.mean(labels[data.split.test]))
    assert metrics["balanced_accuracy"] >= 0.85, metrics
    assert metrics["roc_auc"] >= 0.9, metrics
    assert metrics["accuracy"] > majority_rate, metrics


def _pooled_roc_auc(model, store, split) -> float:
    """ROC-AUC over validation and test together (the test set alone is a few dozen images)."""
    from sklearn.metrics import roc_auc_score

    rows = np.concatenate([split.val, split.test])
    return float(roc_auc_score(store.meta.labels[rows], predict_rows(model, StoreRows(store, rows), 64).ravel()))


@pytest.mark.learning
def test_from_scratch_recipe_learns_the_hard_set_where_the_frozen_random_base_cannot(tmp_path):
    """The hard set: colour, brightness and nucleus count do not separate the classes, only the tuft's structure.
    A head on the frozen random base (recipe a) stays at chance; the recommended offline recipe (every layer and
    BatchNormalization trained from scratch, FROM_SCRATCH_OVERRIDES) learns the structure. 4-7 min on 2 cores;
    alone: `bash scripts/test.sh -m learning`."""
    size = FROM_SCRATCH_OVERRIDES["preprocess.image_size"]
    data = build_tiny_data(tmp_path, n_images=400, size=size, seed=0, difficulty=0.3, group_by="biopsy",
                           structure_only=True, sclerotic_fraction=0.5, n_biopsies=100, size_range=(64, 160),
                           **FROM_SCRATCH_OVERRIDES, **{"split.val_fraction": 0.2, "runtime.memory_budget_gb": 2})
    p = data.params
    configure(p.seed, "float32", "auto")
    model = build_model(size, p.model.weights, p.model.dropout)
    with data.store() as store:
        phase = load_phase_data(store, data.split, 2.0)
        train_frozen(model, phase, replace(p.train_frozen, batch_size=32), p.runtime, seed=p.seed, callbacks=[])
        frozen_auc = _pooled_roc_auc(model, store, data.split)
        # Fewer epochs than the recipe's, for time; every other fine-tuning setting is the recipe's.
        finetune(model, phase, replace(p.finetune, epochs=5, patience=5, batch_size=32), p.runtime, seed=p.seed,
                 callbacks=[], from_scratch=True)
        scratch_auc = _pooled_roc_auc(model, store, data.split)
    print(f"hard set, validation + test ROC-AUC: head on the frozen random base {frozen_auc:.3f}, "
          f"from scratch {scratch_auc:.3f}")
    assert frozen_auc < 0.6, f"the head on the frozen random base should not separate the hard set: {frozen_auc:.3f}"
    assert scratch_auc >= 0.65, f"from scratch: ROC-AUC {scratch_auc:.3f} (frozen random base: {frozen_auc:.3f})"


def test_resume_key_follows_the_store_content_not_its_size(tmp_path, monkeypatch):
    """Changed pixels in one source image: a store of the same size, other bytes, and another resume key."""
    from badfiles import rgba_png, write_clean_dataset
    from conftest import small_params
    from glomeruli.data.augment import augment_store
    from glomeruli.data.ingest import IngestConfig, ingest_dataset, write_manifest
    from glomeruli.core.paths import AUGMENTED, MANIFEST, PREPROCESSED, SPLIT
    from glomeruli.data.preprocess import preprocess_images
    from glomeruli.model.training import _checkpoint_dir

    monkeypatch.chdir(tmp_path)
    params = small_params(**{"preprocess.image_size": 32})
    files = write_clean_dataset(tmp_path / "raw")
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=None, group_regex=params.ingest.group_regex,
                          max_pixels=params.ingest.max_pixels, max_unreadable_fraction=0.0, workers=1)

    builds = iter(range(3))

    def build_store() -> tuple[Path, bytes]:
        for path in (MANIFEST, AUGMENTED):
            path.parent.mkdir(parents=True, exist_ok=True)
        rows = ingest_dataset(tmp_path / "raw", config).rows
        write_manifest(rows, MANIFEST)
        # a new preprocessed file each time: a one-worker augment keeps its input open in this process
        preprocessed = PREPROCESSED.with_name(f"preprocessed-{next(builds)}.h5")
        preprocess_images(tmp_path / "raw", rows, preprocessed, size=32, fill=(0, 0, 0), max_pixels=10**6, workers=1)
        augment_store(preprocessed, AUGMENTED, params.augment, seed=params.seed, workers=1)
        SPLIT.write_text('{"same": "split"}\n')
        return _checkpoint_dir("train_frozen", params), AUGMENTED.read_bytes()

    key, store = build_store()
    assert build_store() == (key, store)  # same inputs: same store, same key
    first = next(iter(files))
    (tmp_path / "raw" / first).write_bytes(rgba_png(20, 26, seed=4242))  # same size, other pixels
    changed_key, changed_store = build_store()
    assert len(changed_store) == len(store) and changed_store != store
    assert changed_key != key


def test_resume_key_hashes_the_code_dvc_yaml_lists(monkeypatch):
    """The code in the resume key is the code DVC reruns the stage for: the phase's own deps in dvc.yaml, and
    those of preprocess and augment for the store's content; inference.py (the caches) among them."""
    from pathlib import Path

    import yaml

    from conftest import small_params
    from glomeruli.model import training

    root = Path(__file__).resolve().parents[2]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for phase in ("train_frozen", "finetune"):
        hashed: list[Path] = []
        monkeypatch.setattr(training, "file_sha256", lambda path: hashed.append(Path(path).resolve()) or "0")
        training._checkpoint_dir(phase, small_params())
        declared = {root / d for s in (phase, "preprocess", "augment") for d in stages[s]["deps"] if d.endswith(".py")}
        assert {p for p in hashed if p.suffix == ".py"} == declared
        assert root / "src/glomeruli/model/inference.py" in declared


@pytest.mark.slow
@pytest.mark.parametrize("from_scratch", [False, True], ids=["top-block", "from-scratch"])
def test_finetune_that_never_beats_the_frozen_model_hands_it_back(tiny_data, tmp_path, caplog, from_scratch):
    """Weights and predictions: from scratch, fine-tuning resets the head's standardisation before it starts,
    and a model handed back must predict as the frozen one did, not with the reset statistics."""
    p = tiny_data.params
    _frozen_model(tiny_data, True).save(tmp_path / "frozen.keras")
    configure(11, "float32", "auto")
    model = load_model(tmp_path / "frozen.keras")
    with tiny_data.store() as store:
        data = load_phase_data(store, tiny_data.split, 1.0)
        rows = StoreRows(store, tiny_data.split.val)

        class PredictEachEpoch(keras.callbacks.Callback):  # traces predict while the head is reset
            def on_epoch_end(self, epoch, logs=None):
                predict_rows(model, rows, 16)

        # A learning rate this large wrecks every epoch: the starting model must come back unchanged. One block
        # trains: the reset and the hand-back do not depend on how many, and a smaller graph traces faster.
        finetune(model, data, replace(p.finetune, epochs=1, batch_size=8, unfreeze_blocks=1, lr=5.0,
                                      lr_schedule="constant", warmup_epochs=0), p.runtime, seed=11,
                 callbacks=[PredictEachEpoch()], from_scratch=from_scratch)
        frozen = load_model(tmp_path / "frozen.keras")
        for got, expected in zip(model.get_weights(), frozen.get_weights()):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(predict_rows(model, rows, 16), predict_rows(frozen, rows, 16), rtol=1e-5, atol=1e-6)
    assert "no epoch beat the starting model's validation loss" in caplog.text
