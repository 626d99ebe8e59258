"""The two training phases and the stage body that runs one (`run_phase`).

Both phases train on cached activations where the network below the trained part is fixed.
Frozen phase: the base runs in inference mode with fixed weights and augmentation is offline, so
its pooled features per record never change: compute them once, then train only the head.
Fine-tune phase: the blocks below the unfrozen ones are just as fixed: cache the activations
entering the first unfrozen block once, then train only the top. `runtime.cache_features: false`
trains the whole graph instead (same result, much slower; kept for comparison). `finetune.epochs: 0`
skips fine-tuning: the frozen model is the model.

`fit` is the one fit loop of both (batches from glomeruli.model.batches, callbacks and resume state from
glomeruli.model.checkpoints); `run_phase` takes every path it reads and writes (`PhasePaths`).

Fine-tuning starts by measuring the incoming model's validation loss (`starting_point`); `EarlyStoppingFrom`
counts it as a candidate, so a phase that never beats it hands the frozen model back unchanged (and says so)
instead of its least bad epoch. The activation cache is off, with a log line saying why, when nothing below the
trained layers is fixed: `unfreeze_blocks: all`, from scratch (BatchNormalization trains, after
`calibrate_batchnorm` set its statistics from one training-mode pass) or `finetune.online_augment`.
`finetune.lr_schedule: cosine` is Keras' `CosineDecay` with linear warm-up, a function of the optimizer's
iteration count, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np

from glomeruli.core.atomic import OutputWriteError, atomic_path, is_out_of_space
from glomeruli.core.params import FinetuneParams, Params, RuntimeParams, TrainParams
from glomeruli.data.augment import OnlineAugment
from glomeruli.data.h5store import ImageStore, close_h5
from glomeruli.data.split import Split, read_split
from glomeruli.model import distribute
from glomeruli.model.batches import Batches, OnlineRows, sample_weights
from glomeruli.model.checkpoints import (EarlyStoppingFrom, LiveLogger, Resume, checkpoint_dir, open_live,
                                         write_empty_curves)
from glomeruli.model.distribute import Engine
from glomeruli.model.efficientnet import (adapt_head, calibrate_batchnorm, compile_model, feature_model, freeze_base,
                                          head_of, reset_head_standardisation, split_at_block, unfreeze_top_blocks)
from glomeruli.model.inference import GB, ArrayRows, H5Rows, Rows, image_rows, predict_batch, predict_rows
from glomeruli.model.recipes import FROM_SCRATCH_MIN_IMAGE_SIZE

log = logging.getLogger(__name__)


BN_CALIBRATION_IMAGES = 128  # one training-mode pass sets BatchNormalization's statistics before fine-tuning from scratch


@dataclass(frozen=True)
class PhaseData:
    x_train: Rows
    y_train: np.ndarray
    x_val: Rows
    y_val: np.ndarray


def learning_rate(params: TrainParams, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`finetune.lr_schedule: cosine`: linear warm-up from 0 to lr over `warmup_epochs` (clamped to the run),
    then cosine decay to 0 by the last step (Keras' CosineDecay). A function of the optimizer's iteration
    count, which Resume saves, so a resumed run continues on the same curve. Otherwise the constant lr."""
    if getattr(params, "lr_schedule", "constant") != "cosine":
        return params.lr
    total = params.epochs * steps_per_epoch
    warmup = min(params.warmup_epochs, params.epochs) * steps_per_epoch
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(params.lr, decay_steps=total)
    # All warm-up (warmup_epochs >= epochs): the decay never starts (CosineDecay needs decay_steps >= 1).
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, total - warmup), warmup_target=params.lr,
                                                  warmup_steps=warmup)


def starting_point(model: keras.Model, x_val: Rows, y_val: np.ndarray, batch_size: int) -> tuple[float, list]:
    """Validation loss (binary cross-entropy, as fit reports it) and weights of `model` as it is now."""
    prob = np.clip(predict_rows(model, x_val, batch_size).reshape(-1).astype(np.float64), 1e-7, 1 - 1e-7)
    y = y_val.astype(np.float64)
    return float(-np.mean(y * np.log(prob) + (1 - y) * np.log1p(-prob))), model.get_weights()


def fit(model: keras.Model, data: PhaseData, params: TrainParams, *, seed: int, callbacks: list,
        workers: int = 1, start: tuple[float, list] | None = None,
        engine: Engine | None = None) -> keras.callbacks.History:
    """Compile and train `model` on `data`, early stopping on val_loss, resumable (a `Resume` in `callbacks`).

    `workers` > 1: that many threads prepare training batches ahead of the model (online augmentation).
    `start`: the starting model's (val loss, weights), kept if no epoch beats it (see EarlyStoppingFrom).
    `engine`: the devices to train on (default: those `distribute.start` set up).
    """
    engine = engine or distribute.current()
    steps_per_epoch = math.ceil(len(data.y_train) / params.batch_size)
    compile_model(model, learning_rate(params, steps_per_epoch))
    stop = EarlyStoppingFrom(start, patience=params.patience)
    resume = next((c for c in callbacks if isinstance(c, Resume)), None)
    first_epoch = resume.restore(model, stop, params.epochs) if resume is not None else 0
    prefetch = {"workers": workers, "use_multiprocessing": False, "max_queue_size": 2 * workers} if workers > 1 else {}
    train = Batches(data.x_train, data.y_train, params.batch_size,
                    weights=sample_weights(data.y_train.astype(int), params.class_weight), seed=seed, epoch=first_epoch,
                    engine=engine, **prefetch)
    val = Batches(data.x_val, data.y_val, params.batch_size, engine=engine)
    # The snapshot goes last: it records the early-stopping decision and the curves of the epoch just ended.
    ordered = [stop, *(c for c in callbacks if c is not resume), *([resume] if resume is not None else [])]
    # shuffle=False: Batches reshuffles from (seed, epoch) itself. Keras would also reorder the batches with
    # Python's global `random`, whose state a resumed process does not share with the run it continues.
    return model.fit(train, validation_data=val, epochs=params.epochs, initial_epoch=first_epoch, callbacks=ordered,
                     shuffle=False, verbose=2 if log.isEnabledFor(logging.INFO) else 0)


def load_phase_data(store: ImageStore, split: Split, memory_budget_gb: float, *, originals: bool = False) -> PhaseData:
    """`originals`: each training record reads its original image instead (online augmentation draws every
    copy afresh from the original, so the augment stage's copies only keep their oversampling)."""
    labels = store.meta.labels
    train = split.train
    if originals:
        index_of = {record_id: i for i, record_id in enumerate(store.meta.ids)}
        train = np.array([index_of[source] for source in store.meta.source_ids[split.train]], dtype=np.int64)
    return PhaseData(image_rows(store, train, memory_budget_gb), labels[split.train],
                     image_rows(store, split.val, memory_budget_gb), labels[split.val])


def train_frozen(model: keras.Model, data: PhaseData, params: TrainParams, runtime: RuntimeParams, *,
                 seed: int, callbacks: list) -> keras.callbacks.History:
    """Train the head with the base frozen (on cached base features unless runtime.cache_features is off)."""
    freeze_base(model)
    extractor = feature_model(model)
    log.info("computing base features of %d train records", len(data.x_train))
    train_features = predict_rows(extractor, data.x_train, params.batch_size)
    adapt_head(model, train_features)
    if not runtime.cache_features:
        return fit(model, data, params, seed=seed, callbacks=callbacks)
    log.info("computing base features of %d val records; the head trains on these cached features", len(data.x_val))
    cached = PhaseData(ArrayRows(train_features), data.y_train,
                       ArrayRows(predict_rows(extractor, data.x_val, params.batch_size)), data.y_val)
    return fit(head_of(model), cached, params, seed=seed, callbacks=callbacks)


def _cache_activations(bottom: keras.Model, rows: Rows, batch_size: int, budget_bytes: float,
                       spill_dir: Path) -> tuple[Rows, float]:
    shape = bottom.output.shape[1:]
    nbytes = len(rows) * int(np.prod(shape)) * 4
    if nbytes <= budget_bytes:
        return ArrayRows(predict_rows(bottom, rows, batch_size)), nbytes
    log.info("activations (%.1f GB) exceed runtime.memory_budget_gb: spilling to %s", nbytes / GB, spill_dir)
    h5 = h5py.File(spill_dir / f"activations-{id(rows)}.h5", "w")
    try:
        dataset = h5.create_dataset("x", shape=(len(rows), *shape), dtype="f4", chunks=(1, *shape))
        for i in range(0, len(rows), batch_size):
            idx = np.arange(i, min(i + batch_size, len(rows)))
            dataset[i:idx[-1] + 1] = predict_batch(bottom, rows.read(idx), batch_size)
        h5.flush()  # a full disk shows here, not later at close
    except Exception as err:
        with contextlib.suppress(Exception):
            close_h5(h5)
        if is_out_of_space(err):
            raise OutputWriteError(errno.ENOSPC, f"no space left for the activation cache in {spill_dir} "
                                   f"({nbytes / GB:.1f} GB): free space there, point TMPDIR at a larger disk, or "
                                   "raise runtime.memory_budget_gb to keep it in memory") from err
        raise
    return H5Rows(dataset), 0.0


def finetune(model: keras.Model, data: PhaseData, params: FinetuneParams, runtime: RuntimeParams, *,
             seed: int, callbacks: list, from_scratch: bool = False,
             augment: OnlineAugment | None = None) -> keras.callbacks.History | None:
    """Unfreeze the top blocks (`all`: every layer) and train at a lower rate; `params.epochs` 0: leave
    `model` as it is (no fine-tuning: the frozen model is the model) and return None.

    `from_scratch` (model.weights: none): BatchNormalization trains too, and fit runs the base in training mode;
    over pretrained weights it stays frozen. `params.online_augment` needs `augment` and `data` read with
    `load_phase_data(..., originals=True)`. The activation cache is used only when everything below the
    trained layers gives fixed activations; otherwise the log says why it is off.
    """
    if params.epochs == 0:
        log.info("finetune.epochs: 0: no fine-tuning, the frozen-phase model is the model")
        return None
    # Fine-tuning must never hand back a model worse on validation than the frozen phase's (a short run, or
    # from scratch, where recalibrated BatchNormalization first moves every feature under the trained head).
    start = starting_point(model, data.x_val, data.y_val, params.batch_size)
    unfrozen = unfreeze_top_blocks(model, params.unfreeze_blocks, train_statistics=from_scratch)
    log.info("fine-tuning %d layers (unfreeze_blocks: %s)%s", len(unfrozen), params.unfreeze_blocks,
             ", BatchNormalization included (from scratch)" if from_scratch else "")
    if from_scratch and model.inputs[0].shape[1] < FROM_SCRATCH_MIN_IMAGE_SIZE:
        log.warning("training EfficientNetB3 from scratch at %d px: below %d px it memorises the training images "
                    "instead of learning their structure (bench/RESULTS.md); set preprocess.image_size to %d or more, "
                    "or use pretrained weights (model.weights)", model.inputs[0].shape[1], FROM_SCRATCH_MIN_IMAGE_SIZE,
                    FROM_SCRATCH_MIN_IMAGE_SIZE)
    if from_scratch:
        # Training-mode and inference-mode activations must agree from the first step (see calibrate_batchnorm);
        # the head's standardisation steps aside while the base learns its features (reset_head_standardisation).
        sample = np.sort(np.random.default_rng([seed, 11]).permutation(len(data.x_train))[:BN_CALIBRATION_IMAGES])
        n_bn = calibrate_batchnorm(model, data.x_train.read(sample))
        reset_head_standardisation(model)
        log.info("BatchNormalization: moving statistics of %d layers set from %d training images; head "
                 "standardisation set to the identity", n_bn, len(sample))
    workers = 1
    if params.online_augment:
        if augment is None:
            raise ValueError("finetune.online_augment needs the augment settings (augment=OnlineAugment(...))")
        workers = max(2, min(8, runtime.workers or (os.cpu_count() or 2)))
        data = PhaseData(OnlineRows(data.x_train, augment), data.y_train, data.x_val, data.y_val)
        log.info("online augmentation: fresh variants of every training image each epoch, drawn by %d threads "
                 "ahead of the model", workers)
    not_fixed = [reason for reason, applies in (
        ("every layer trains (unfreeze_blocks: all)", params.unfreeze_blocks == "all"),
        ("from scratch the base runs in training mode (drop-connect on, BatchNormalization statistics updated)",
         from_scratch),
        ("online augmentation draws new images every epoch", params.online_augment)) if applies]
    if runtime.cache_features and not_fixed:
        log.info("activation cache off, nothing below the trained layers is fixed: %s", "; ".join(not_fixed))
    if not runtime.cache_features or not_fixed:
        return fit(model, data, params, seed=seed, callbacks=callbacks, workers=workers, start=start)
    bottom, top = split_at_block(model, params.unfreeze_blocks)
    spill_dir = Path(tempfile.mkdtemp(prefix="glomeruli-activations-"))
    try:
        budget = runtime.memory_budget_gb * GB
        x_train, used = _cache_activations(bottom, data.x_train, params.batch_size, budget, spill_dir)
        x_val, _ = _cache_activations(bottom, data.x_val, params.batch_size, budget - used, spill_dir)
        cached = PhaseData(x_train, data.y_train, x_val, data.y_val)
        return fit(top, cached, params, seed=seed, callbacks=callbacks,
                    start=(start[0], top.get_weights()))
    finally:
        for rows in (locals().get("x_train"), locals().get("x_val")):
            if isinstance(rows, H5Rows):
                rows.dataset.file.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


@dataclass(frozen=True)
class PhasePaths:
    """What a training phase reads and writes (the stages pass glomeruli.core.paths')."""

    store: Path  # the augmented image store
    split: Path
    manifest: Path  # stands for the store's content in the resume key (checkpoints.store_content_key)
    checkpoints: Path  # the resume states' folder
    model: Path  # the trained model
    live: Path  # the dvclive folder: curves and metrics.json
    start_model: Path | None = None  # the model the phase starts from (fine-tuning: the frozen phase's)


def run_phase(phase: str, params: Params, make_model: Callable[[int], keras.Model], paths: PhasePaths) -> None:
    """Stage body shared by train_frozen and finetune: data in, curves and model out, resumable."""
    if phase == "finetune" and params.finetune.epochs == 0:
        _hand_on_start_model(paths)
        return
    phase_params = params.train_frozen if phase == "train_frozen" else params.finetune
    train = train_frozen if phase == "train_frozen" else finetune
    engine = distribute.current()
    distribute.check_batch_size(f"{phase}.batch_size", phase_params.batch_size, engine)
    # TensorFlow builds, compiles and fits in its strategy's scope (no-op on JAX and on one device).
    with engine.scope(), ImageStore(paths.store) as store:
        split = read_split(paths.split, len(store.meta))
        model = make_model(store.image_size)
        online = phase == "finetune" and params.finetune.online_augment
        data = load_phase_data(store, split, params.runtime.memory_budget_gb, originals=online)
        checkpoint = checkpoint_dir(phase, params, paths.checkpoints, split=paths.split, manifest=paths.manifest,
                                    start_model=paths.start_model)
        # A killed run resumes from its last completed epoch, curves included (see Resume).
        resume = Resume(checkpoint)
        with atomic_path(paths.live) as tmp_live:
            if resume.live_snapshot is not None:
                shutil.copytree(resume.live_snapshot, tmp_live)
            resume.live_dir = tmp_live
            with open_live(tmp_live, resume.completed if resume.live_snapshot is not None else 0) as live:
                # The frozen model's weights came from model.weights: from scratch, fine-tuning trains BatchNormalization.
                extra = {} if phase != "finetune" else {
                    "from_scratch": params.model.weights == "none",
                    "augment": OnlineAugment(params.augment, params.preprocess.fill, params.seed)}
                train(model, data, phase_params, params.runtime, seed=params.seed,
                      callbacks=[LiveLogger(live), resume], **extra)
    with atomic_path(paths.model) as tmp:
        model.save(tmp)
    # Done: drop this phase's resume state, and any a run with other settings left behind.
    for state in [checkpoint, *paths.checkpoints.glob(f"{phase}-*")]:
        shutil.rmtree(state, ignore_errors=True)
    for empty in (paths.checkpoints, paths.checkpoints.parent):  # leave no scratch folders behind
        with contextlib.suppress(OSError):
            empty.rmdir()


def _hand_on_start_model(paths: PhasePaths) -> None:
    """`finetune.epochs: 0`: a copy of the model the phase starts from as its model, and the curves of no
    epoch (dvclive's empty metrics.json, header-only curve files), so every output dvc.yaml declares exists."""
    if paths.start_model is None:
        raise ValueError("finetune.epochs: 0 hands on the frozen-phase model: PhasePaths.start_model names it")
    log.info("finetune.epochs: 0: no fine-tuning, the frozen-phase model is the model")
    with atomic_path(paths.live) as tmp_live:
        with open_live(tmp_live):
            pass
        write_empty_curves(tmp_live)
    with atomic_path(paths.model) as tmp:
        shutil.copyfile(paths.start_model, tmp)
