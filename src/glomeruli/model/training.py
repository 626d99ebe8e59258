"""The two training phases, on cached activations where the network below the trained part is fixed.

Frozen phase: the base runs in inference mode with fixed weights and augmentation is offline, so
its pooled features per record never change: compute them once, then train only the head.
Fine-tune phase: the blocks below the unfrozen ones are just as fixed: cache the activations
entering the first unfrozen block once, then train only the top. `runtime.cache_features: false`
trains the whole graph instead (same result, much slower; kept for comparison).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import h5py
import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from glomeruli.model import distribute
from glomeruli.core.atomic import OutputWriteError, atomic_path, is_out_of_space
from glomeruli.data.augment import OnlineAugment
from glomeruli.core.errors import UserError
from glomeruli.data.h5store import ImageStore, close_h5
from glomeruli.model.inference import GB, ArrayRows, H5Rows, Rows, image_rows, predict_batch, predict_rows
from glomeruli.model.metadata import file_sha256
from glomeruli.model.efficientnet import (adapt_head, calibrate_batchnorm, compile_model, feature_model, freeze_base, head_of,
                             reset_head_standardisation, split_at_block, sync_normalization, unfreeze_top_blocks)
from glomeruli.model.recipes import FROM_SCRATCH_MIN_IMAGE_SIZE
from glomeruli.core.params import (FinetuneParams, Params, RuntimeParams, TrainParams,
                              as_dict)
from glomeruli.core.paths import AUGMENTED, CHECKPOINTS, FROZEN_MODEL, MANIFEST, SPLIT
from glomeruli.data.split import Split, read_split
from glomeruli.core.stage_deps import stage_code

log = logging.getLogger(__name__)


BN_CALIBRATION_IMAGES = 128  # one training-mode pass sets BatchNormalization's statistics before fine-tuning from scratch


class Batches(keras.utils.PyDataset):
    """(x, y, sample_weight) batches, reshuffled every epoch from (seed, epoch) so runs repeat exactly."""

    def __init__(self, x: Rows, y: np.ndarray, batch_size: int, *, weights: np.ndarray | None = None,
                 seed: int | None = None, epoch: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size, self.seed = x, y.astype(np.float32), batch_size, seed
        self.weights = weights
        self.epoch = epoch  # the first epoch's order; a resumed run starts at its first epoch left
        self._order = self._permutation()
        self._sync_rows()

    def _sync_rows(self) -> None:
        if isinstance(self.x, OnlineRows):  # its images are drawn for this epoch
            self.x.epoch = self.epoch

    def _permutation(self) -> np.ndarray:
        if self.seed is None:
            return np.arange(len(self.y))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.y))

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, index: int):
        idx = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        engine = distribute.current()
        if engine.distributed:
            return self._share(idx, engine)
        x, y = self.x.read(idx), self.y[idx]
        return (x, y) if self.weights is None else (x, y, self.weights[idx])

    def _share(self, idx: np.ndarray, engine: distribute.Engine):
        """This process's part of the batch, padded so every replica gets as many rows (weight 0 on padding;
        real rows scaled by padded/real, so the mean loss and its gradient equal the unpadded batch's)."""
        rows, pad = engine.share(len(idx))
        local = idx[rows]
        weights = (np.ones(len(idx), np.float32) if self.weights is None else self.weights[idx])[rows]
        x = self.x.read(local) if len(local) else self.x.read(idx[:1])[:0]
        scale = np.float32(engine.padded(len(idx)) / len(idx))
        return (distribute.pad_rows(x, pad), distribute.pad_rows(self.y[local], pad),
                distribute.pad_rows(weights * scale, pad))

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._permutation()
        self._sync_rows()


class OnlineRows:
    """Training rows augmented afresh every epoch (finetune.online_augment), drawn inside the input pipeline.

    Row r of epoch e is `augment.augment_image` of the original image with a generator seeded by (seed, e, r),
    so a batch is a function of (seed, epoch, rows) alone: prefetching threads may draw batches in any order,
    and a resumed run (Batches starts at its first epoch left) sees the images the killed one would have.
    """

    def __init__(self, rows: Rows, augment: OnlineAugment):
        self.rows, self.augment, self.epoch = rows, augment, 0

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: np.ndarray) -> np.ndarray:
        # Rows hold the store's uint8 pixels as float32: the cast back is exact.
        images = self.rows.read(indices).astype(np.uint8)
        return self.augment.images(images, np.asarray(indices), self.epoch).astype(np.float32)


def sample_weights(labels: np.ndarray, rule: str) -> np.ndarray | None:
    """`balanced`: weight each class by n / (2 * n_class), scikit-learn's rule."""
    if rule == "none":
        return None
    classes = np.array([0, 1])
    per_class = compute_class_weight("balanced", classes=classes, y=labels)
    return per_class[labels].astype(np.float32)


class LiveLogger(keras.callbacks.Callback):
    """Logs epoch metrics to dvclive on every backend (dvclive's own Keras callback needs TensorFlow)."""

    def __init__(self, live):
        super().__init__()
        self.live = live

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            name = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self.live.log_metric(name, float(value))
        self.live.next_step()


class Resume(keras.callbacks.Callback):
    """Resume state saved after every epoch, so a killed run continues exactly where it stopped.

    A snapshot `epoch-NNNN/` holds every variable of the model being fitted (dropout seed states included,
    which Keras' BackupAndRestore leaves out) and of its optimizer, the early-stopping state, and a copy of
    the dvclive folder. It appears by a rename (atomic_path), so a kill leaves the previous snapshot or this
    one, never half of one, and weights, epoch count and curves always agree.
    """

    def __init__(self, folder: Path, live_dir: Path | None = None):
        super().__init__()
        self.folder, self.live_dir = Path(folder), live_dir
        snapshots = sorted(self.folder.glob("epoch-[0-9][0-9][0-9][0-9]"))
        self.latest: Path | None = snapshots[-1] if snapshots else None
        self.state: dict = {}
        if self.latest is not None:
            try:
                self.state = json.loads((self.latest / "state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable resume state %s (%s): training from the first epoch", self.latest, err)
                self.latest = None
        self.completed = int(self.state.get("epoch", 0))
        self.early_stopping: keras.callbacks.EarlyStopping | None = None

    @property
    def live_snapshot(self) -> Path | None:
        return self.latest / "live" if self.latest is not None and (self.latest / "live").is_dir() else None

    def _variables(self, model: keras.Model) -> list:
        return list(model.variables) + (list(model.optimizer.variables) if model.optimizer is not None else [])

    def restore(self, model: keras.Model, stop: keras.callbacks.EarlyStopping, epochs: int) -> int:
        """Load the latest snapshot into the compiled `model`; returns the first epoch left to train."""
        self.early_stopping = stop
        if self.latest is None:
            return 0
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        targets = self._variables(model)
        try:
            with np.load(self.latest / "variables.npz") as saved:
                arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            if [tuple(a.shape) for a in arrays] != [tuple(v.shape) for v in targets]:
                raise ValueError("its variables do not match this model")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise UserError(f"the resume state in {self.latest} is unusable ({err}); it was removed: rerun "
                            "`dvc repro` to train this phase from its first epoch") from err
        for variable, value in zip(targets, arrays):
            variable.assign(value)
        sync_normalization(model)
        log.info("resuming after epoch %d of %d from %s", self.completed, epochs, self.latest)
        return epochs if self.state.get("stopped") else min(self.completed, epochs)

    def on_train_begin(self, logs=None):
        # After EarlyStopping's own on_train_begin, which resets it.
        stop, saved = self.early_stopping, self.state.get("early_stopping")
        if stop is None or not saved:
            return
        for key, value in saved.items():
            setattr(stop, key, value)
        if (self.latest / "best_weights.npz").is_file():
            with np.load(self.latest / "best_weights.npz") as best:
                stop.best_weights = [best[f"arr_{i}"] for i in range(len(best.files))]

    def on_epoch_end(self, epoch, logs=None):
        stop = self.early_stopping
        target = self.folder / f"epoch-{epoch + 1:04d}"
        with atomic_path(target) as tmp:
            tmp.mkdir()
            np.savez(tmp / "variables.npz", *[keras.ops.convert_to_numpy(v) for v in self._variables(self.model)])
            state: dict = {"epoch": epoch + 1, "stopped": bool(self.model.stop_training)}
            if stop is not None:
                best = None if stop.best is None else float(stop.best)
                state["early_stopping"] = {"wait": int(stop.wait), "best": best, "best_epoch": int(stop.best_epoch),
                                           "stopped_epoch": int(stop.stopped_epoch)}
                if stop.best_weights is not None:
                    np.savez(tmp / "best_weights.npz", *stop.best_weights)
            if self.live_dir is not None and Path(self.live_dir).is_dir():
                shutil.copytree(self.live_dir, tmp / "live")
            (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
        for older in self.folder.glob("epoch-*"):
            if older != target:
                shutil.rmtree(older, ignore_errors=True)


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


class EarlyStoppingFrom(keras.callbacks.EarlyStopping):
    """Early stopping on val_loss that counts the model a phase starts from (`start`: its val loss and weights)
    as a candidate: a fine-tuning that never beats it on validation hands it back, not its least bad epoch."""

    def __init__(self, start: tuple[float, list] | None = None, **kwargs):
        super().__init__(monitor="val_loss", restore_best_weights=True, **kwargs)
        self.start = start

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.start is not None:
            self.best, self.best_weights = self.start
            self.best_epoch = -1

    def on_train_end(self, logs=None):
        if self.start is not None and self.best_epoch == -1:
            log.warning("no epoch beat the starting model's validation loss (%.4f): it is kept unchanged",
                        self.start[0])
        super().on_train_end(logs)
        sync_normalization(self.model)  # restored weights include the head's standardisation


def starting_point(model: keras.Model, x_val: Rows, y_val: np.ndarray, batch_size: int) -> tuple[float, list]:
    """Validation loss (binary cross-entropy, as fit reports it) and weights of `model` as it is now."""
    prob = np.clip(predict_rows(model, x_val, batch_size).reshape(-1).astype(np.float64), 1e-7, 1 - 1e-7)
    y = y_val.astype(np.float64)
    return float(-np.mean(y * np.log(prob) + (1 - y) * np.log1p(-prob))), model.get_weights()


def _fit(model: keras.Model, data: PhaseData, params: TrainParams, *, seed: int, callbacks: list,
         workers: int = 1, start: tuple[float, list] | None = None) -> keras.callbacks.History:
    """`workers` > 1: that many threads prepare training batches ahead of the model (online augmentation).
    `start`: the starting model's (val loss, weights), kept if no epoch beats it (see EarlyStoppingFrom)."""
    steps_per_epoch = math.ceil(len(data.y_train) / params.batch_size)
    compile_model(model, learning_rate(params, steps_per_epoch))
    stop = EarlyStoppingFrom(start, patience=params.patience)
    resume = next((c for c in callbacks if isinstance(c, Resume)), None)
    first_epoch = resume.restore(model, stop, params.epochs) if resume is not None else 0
    prefetch = {"workers": workers, "use_multiprocessing": False, "max_queue_size": 2 * workers} if workers > 1 else {}
    train = Batches(data.x_train, data.y_train, params.batch_size,
                    weights=sample_weights(data.y_train.astype(int), params.class_weight), seed=seed, epoch=first_epoch,
                    **prefetch)
    val = Batches(data.x_val, data.y_val, params.batch_size)
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
        return _fit(model, data, params, seed=seed, callbacks=callbacks)
    log.info("computing base features of %d val records; the head trains on these cached features", len(data.x_val))
    cached = PhaseData(ArrayRows(train_features), data.y_train,
                       ArrayRows(predict_rows(extractor, data.x_val, params.batch_size)), data.y_val)
    return _fit(head_of(model), cached, params, seed=seed, callbacks=callbacks)


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
             augment: OnlineAugment | None = None) -> keras.callbacks.History:
    """Unfreeze the top blocks (`all`: every layer) and train at a lower rate.

    `from_scratch` (model.weights: none): BatchNormalization trains too, and fit runs the base in training mode;
    over pretrained weights it stays frozen. `params.online_augment` needs `augment` and `data` read with
    `load_phase_data(..., originals=True)`. The activation cache is used only when everything below the
    trained layers gives fixed activations; otherwise the log says why it is off.
    """
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
        return _fit(model, data, params, seed=seed, callbacks=callbacks, workers=workers, start=start)
    bottom, top = split_at_block(model, params.unfreeze_blocks)
    spill_dir = Path(tempfile.mkdtemp(prefix="glomeruli-activations-"))
    try:
        budget = runtime.memory_budget_gb * GB
        x_train, used = _cache_activations(bottom, data.x_train, params.batch_size, budget, spill_dir)
        x_val, _ = _cache_activations(bottom, data.x_val, params.batch_size, budget - used, spill_dir)
        cached = PhaseData(x_train, data.y_train, x_val, data.y_val)
        return _fit(top, cached, params, seed=seed, callbacks=callbacks,
                    start=(start[0], top.get_weights()))
    finally:
        for rows in (locals().get("x_train"), locals().get("x_val")):
            if isinstance(rows, H5Rows):
                rows.dataset.file.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


def _checkpoint_dir(phase: str, params: Params) -> Path:
    """Resume state keyed by everything that shapes the run, so a stale one is never picked up."""
    code = [file_sha256(f) for f in stage_code(phase)]  # the phase's code deps in dvc.yaml
    inputs = [file_sha256(SPLIT), *_store_content_key(), keras.__version__, *code]
    if phase == "finetune":  # a retrained frozen-phase model makes fine-tuning state stale
        inputs.append(file_sha256(FROZEN_MODEL))
    key = json.dumps([phase, as_dict(params), *inputs], sort_keys=True)
    return CHECKPOINTS / f"{phase}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# The stages whose code writes the pixels of the augmented store (with the params, already in the key).
_STORE_STAGES = ("preprocess", "augment")


def _store_content_key() -> list[str]:
    """What the augmented store's pixels are a function of, instead of hashing gigabytes at every start.

    Its size says nothing (fixed-size chunks: other pixels, same size). The store is deterministic given
    the manifest (the SHA-256 of every source image, and its label), the params, and the code and
    libraries that decode, resize and augment; those few kilobytes stand for its content.
    """
    import cv2  # imported here: only the key needs its version

    code = [file_sha256(f) for f in stage_code(*_STORE_STAGES)]
    return [file_sha256(MANIFEST), *code, cv2.__version__, np.__version__]


def _live(folder: Path, resume_at: int = 0):
    """A dvclive logger that edits neither dvc.yaml nor git (dvc.yaml declares its files).

    `resume_at` > 0: `folder` holds the curves of that many epochs already; keep them and continue.
    """
    from dvclive import Live  # imported late: it is slow to import and only stages need it
    from scmrepo.exceptions import SCMError

    try:
        live = Live(str(folder), dvcyaml=None, save_dvc_exp=False, resume=resume_at > 0)
        if resume_at:
            live.step = resume_at  # dvclive's own resume reads the step back one short after a single epoch
        return live
    except SCMError as err:  # dvclive reads the current commit and fails in a repository without one
        raise UserError(f"dvclive needs a git repository with at least one commit ({err}): run "
                        "`git add -A && git commit -m 'initial'`, then `dvc repro` again") from err


def run_phase(phase: str, params: Params, make_model: Callable[[int], keras.Model], *,
              out_model: Path, live_dir: Path) -> None:
    """Stage body shared by train_frozen and finetune: data in, curves and model out, resumable."""
    phase_params = params.train_frozen if phase == "train_frozen" else params.finetune
    train = train_frozen if phase == "train_frozen" else finetune
    distribute.check_batch_size(f"{phase}.batch_size", phase_params.batch_size)
    # TensorFlow builds, compiles and fits in its strategy's scope (no-op on JAX and on one device).
    with distribute.current().scope(), ImageStore(AUGMENTED) as store:
        split = read_split(SPLIT, len(store.meta))
        model = make_model(store.image_size)
        online = phase == "finetune" and params.finetune.online_augment
        data = load_phase_data(store, split, params.runtime.memory_budget_gb, originals=online)
        checkpoint = _checkpoint_dir(phase, params)
        # A killed run resumes from its last completed epoch, curves included (see Resume).
        resume = Resume(checkpoint)
        with atomic_path(live_dir) as tmp_live:
            if resume.live_snapshot is not None:
                shutil.copytree(resume.live_snapshot, tmp_live)
            resume.live_dir = tmp_live
            with _live(tmp_live, resume.completed if resume.live_snapshot is not None else 0) as live:
                # The frozen model's weights came from model.weights: from scratch, fine-tuning trains BatchNormalization.
                extra = {} if phase != "finetune" else {
                    "from_scratch": params.model.weights == "none",
                    "augment": OnlineAugment(params.augment, params.preprocess.fill, params.seed)}
                train(model, data, phase_params, params.runtime, seed=params.seed,
                      callbacks=[LiveLogger(live), resume], **extra)
    with atomic_path(out_model) as tmp:
        model.save(tmp)
    # Done: drop this phase's resume state, and any a run with other settings left behind.
    for state in [checkpoint, *CHECKPOINTS.glob(f"{phase}-*")]:
        shutil.rmtree(state, ignore_errors=True)
    for empty in (CHECKPOINTS, CHECKPOINTS.parent):  # leave no scratch folders behind
        with contextlib.suppress(OSError):
            empty.rmdir()
