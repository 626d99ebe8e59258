"""Callbacks and checkpointing: what a phase logs after every epoch, and how a killed run resumes.

`LiveLogger` writes the epoch metrics to dvclive (`open_live`); `Resume` snapshots every variable, the
early-stopping state and the curves after each epoch, under a folder keyed by everything that shapes the
run (`checkpoint_dir`), so a resumed run continues exactly and a stale snapshot is never picked up;
`EarlyStoppingFrom` counts the model a phase starts from as a candidate.

Snapshots live in `.glomeruli-tmp/checkpoints/<phase>-<hash>` (outside DVC's outputs), each appearing by a
rename so a kill never leaves half of one, and the folder goes when the stage completes. The key hashes the
params, the split, the code (`stage_deps.stage_code`: the files dvc.yaml lists), the frozen model for
fine-tuning, and the augmented store's content through `store_content_key`: the store is a deterministic
function of the manifest (every image's SHA-256), the params and the code and library versions that write it,
so those few kilobytes stand for gigabytes (the store's size would not change with its pixels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np

from glomeruli.core.atomic import atomic_path
from glomeruli.core.errors import UserError
from glomeruli.core.params import Params, as_dict
from glomeruli.core.stage_deps import stage_code
from glomeruli.model.efficientnet import sync_normalization
from glomeruli.model.metadata import file_sha256

log = logging.getLogger(__name__)


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


# The curves LiveLogger writes (the loss and compile_model's metric), each for train and val: dvc.yaml plots them.
CURVES = ("loss", "accuracy")


def write_empty_curves(folder: Path) -> None:
    """Header-only curve files in a dvclive `folder` of a phase that trains no epoch, so DVC's plots find
    every file they name (dvclive writes a curve only once it is logged)."""
    for split in ("train", "val"):
        for metric in CURVES:
            path = Path(folder) / "plots" / "metrics" / split / f"{metric}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"step\t{metric}\n", encoding="utf-8")


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


def checkpoint_dir(phase: str, params: Params, root: Path, *, split: Path, manifest: Path,
                   start_model: Path | None = None) -> Path:
    """The folder under `root` for `phase`'s resume state, keyed by everything that shapes the run, so a
    stale one is never picked up: the params, the `split` file, the store's content (`store_content_key` of
    `manifest`), the code and Keras, and the model the phase starts from (`start_model`, fine-tuning's)."""
    code = [file_sha256(f) for f in stage_code(phase)]  # the phase's code deps in dvc.yaml
    inputs = [file_sha256(split), *store_content_key(manifest), keras.__version__, *code]
    if start_model is not None:  # a retrained frozen-phase model makes fine-tuning state stale
        inputs.append(file_sha256(start_model))
    key = json.dumps([phase, as_dict(params), *inputs], sort_keys=True)
    return Path(root) / f"{phase}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# The stages whose code writes the pixels of the augmented store (with the params, already in the key).
_STORE_STAGES = ("preprocess", "augment")


def store_content_key(manifest: Path) -> list[str]:
    """What the augmented store's pixels are a function of, instead of hashing gigabytes at every start.

    Its size says nothing (fixed-size chunks: other pixels, same size). The store is deterministic given
    the manifest (the SHA-256 of every source image, and its label), the params, and the code and
    libraries that decode, resize and augment; those few kilobytes stand for its content.
    """
    import cv2  # imported here: only the key needs its version

    code = [file_sha256(f) for f in stage_code(*_STORE_STAGES)]
    return [file_sha256(manifest), *code, cv2.__version__, np.__version__]


def open_live(folder: Path, resume_at: int = 0):
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
