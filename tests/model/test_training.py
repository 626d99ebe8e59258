"""Training phases: cached phases give the same weights as full-graph training, the model learns, and a
fine-tuning that never beats the frozen model (or has no epoch) hands it back."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import keras
import numpy as np
import pytest

from conftest import build_tiny_data
from glomeruli.model.backend import configure
from glomeruli.evaluation.metrics import binary_metrics, choose_threshold
from glomeruli.model.efficientnet import build_model, head_of, load_model
from glomeruli.model.inference import StoreRows, predict_rows
from glomeruli.model.training import finetune, load_phase_data, train_frozen
from glomeruli.model.recipes import FROM_SCRATCH_OVERRIDES


FROZEN_SEED = 7


def _frozen_model(tiny_data, cache: bool) -> keras.Model:
    p = tiny_data.params
    configure(FROZEN_SEED, "float32", "auto")
    model = build_model(32, "none", 0.3)
    with tiny_data.store() as store:
        data = load_phase_data(store, tiny_data.split, 1.0)
        train_frozen(model, data, replace(p.train_frozen, epochs=3, batch_size=8),
                     replace(p.runtime, cache_features=cache), seed=FROZEN_SEED, callbacks=[])
    return model


@pytest.fixture(scope="module")
def frozen_file(tiny_data, tmp_path_factory):
    """The frozen phase on the tiny set (cached features), trained once for this module's tests: read it,
    never write it."""
    path = tmp_path_factory.mktemp("frozen") / "frozen.keras"
    _frozen_model(tiny_data, True).save(path)
    return path


@pytest.mark.slow
def test_cached_frozen_phase_equals_full_graph_training(tiny_data, frozen_file):
    cached, full = load_model(frozen_file), _frozen_model(tiny_data, False)
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
def test_cached_finetune_equals_full_graph_training(tiny_data, frozen_file):
    p = tiny_data.params
    results, final = [], []
    for cache in (True, False):
        configure(11, "float32", "auto")
        model = load_model(frozen_file)
        trained = _WeightsAtEpochEnd(model)
        with tiny_data.store() as store:
            data = load_phase_data(store, tiny_data.split, 1.0)
            # memory budget 0 forces the activation cache through the temporary HDF5 path too
            runtime = replace(p.runtime, cache_features=cache, memory_budget_gb=0.0 if cache else 1.0)
            finetune(model, data, replace(p.finetune, epochs=2, batch_size=8, unfreeze_blocks=1, lr=1e-3),
                     runtime, seed=11, callbacks=[trained])
        results.append(trained.weights)
        final.append(model.get_weights())
    before = load_model(frozen_file).get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(results[0], before)), "fine-tuning changed nothing"
    for a, b in [*zip(*results), *zip(*final)]:  # every epoch's weights, and the model handed back
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


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


@pytest.mark.slow
@pytest.mark.parametrize("from_scratch", [False, True], ids=["top-block", "from-scratch"])
def test_finetune_that_never_beats_the_frozen_model_hands_it_back(tiny_data, frozen_file, caplog, from_scratch):
    """Weights and predictions: from scratch, fine-tuning resets the head's standardisation before it starts,
    and a model handed back must predict as the frozen one did, not with the reset statistics."""
    p = tiny_data.params
    configure(11, "float32", "auto")
    model = load_model(frozen_file)
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
        frozen = load_model(frozen_file)
        for got, expected in zip(model.get_weights(), frozen.get_weights()):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(predict_rows(model, rows, 16), predict_rows(frozen, rows, 16), rtol=1e-5, atol=1e-6)
    assert "no epoch beat the starting model's validation loss" in caplog.text


def test_finetune_with_no_epochs_leaves_the_frozen_model_as_it_is(tiny_data, frozen_file, caplog):
    p = tiny_data.params
    model = load_model(frozen_file)
    with tiny_data.store() as store, caplog.at_level(logging.INFO, logger="glomeruli.model.training"):
        data = load_phase_data(store, tiny_data.split, 1.0)
        history = finetune(model, data, replace(p.finetune, epochs=0), p.runtime, seed=11, callbacks=[])
    assert history is None
    assert getattr(model, "optimizer", None) is None, "no fine-tune graph was compiled"
    for got, expected in zip(model.get_weights(), load_model(frozen_file).get_weights()):
        np.testing.assert_array_equal(got, expected)
    assert [r.message for r in caplog.records if "finetune.epochs: 0" in r.message] == [
        "finetune.epochs: 0: no fine-tuning, the frozen-phase model is the model"]


def test_finetune_stage_with_no_epochs_writes_every_declared_output(tmp_path, caplog):
    """The frozen model, copied byte for byte as the model; the dvclive folder with its metrics.json and
    every curve file dvc.yaml plots for the phase (header only); no model is built and no resume state left."""
    from pathlib import Path

    import yaml

    from conftest import small_params
    from glomeruli.model.training import PhasePaths, run_phase

    frozen = tmp_path / "frozen.keras"
    frozen.write_bytes(b"the frozen-phase model")
    paths = PhasePaths(store=tmp_path / "no-store.h5", split=tmp_path / "no-split.json",
                       manifest=tmp_path / "no-manifest.csv", checkpoints=tmp_path / "checkpoints",
                       model=tmp_path / "model.keras", live=tmp_path / "metrics" / "finetune", start_model=frozen)

    def make_model(image_size: int):
        raise AssertionError("no model is built without fine-tuning")

    with caplog.at_level(logging.INFO, logger="glomeruli.model.training"):
        run_phase("finetune", small_params(**{"finetune.epochs": 0}), make_model, paths)
    assert paths.model.read_bytes() == b"the frozen-phase model"
    assert json.loads((paths.live / "metrics.json").read_text()) == {}
    root = Path(__file__).resolve().parents[2]
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    plotted = [file for plot in dvc_yaml["plots"] if isinstance(plot, dict) for spec in plot.values()
               for file in spec.get("y", {}) if file.startswith("metrics/finetune/")]
    assert len(plotted) == 4
    for file in plotted:
        metric = Path(file).stem
        assert (tmp_path / file).read_text() == f"step\t{metric}\n"
    assert not paths.checkpoints.exists()
    assert "finetune.epochs: 0: no fine-tuning" in caplog.text
