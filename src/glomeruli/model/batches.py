"""The training input pipeline: shuffled (x, y, sample weight) batches for Keras' fit.

`Batches` reshuffles every epoch from (seed, epoch), so a run and a resumed run see the same batches; on
several devices it hands this process its padded share of every batch (`Engine.read_share`), given the
engine explicitly. `OnlineRows` draws fresh augmented images every epoch (finetune.online_augment). Its variants are
seeded by (seed, epoch, record) and drawn in Keras' PyDataset threads ahead of the model, so batches repeat
exactly whatever thread drew them, and resume stays exact.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from glomeruli.data.augment import OnlineAugment
from glomeruli.model.distribute import ONE_DEVICE, Engine
from glomeruli.model.inference import Rows


class Batches(keras.utils.PyDataset):
    """(x, y, sample_weight) batches, reshuffled every epoch from (seed, epoch) so runs repeat exactly.

    `engine`: the devices the batches feed (`distribute.start`'s); on several, each batch is this process's
    share, padded so every replica gets as many rows (weight 0 on padding; real rows scaled by padded/real,
    so the mean loss and its gradient equal the unpadded batch's).
    """

    def __init__(self, x: Rows, y: np.ndarray, batch_size: int, *, weights: np.ndarray | None = None,
                 seed: int | None = None, epoch: int = 0, engine: Engine = ONE_DEVICE, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size, self.seed = x, y.astype(np.float32), batch_size, seed
        self.weights, self.engine = weights, engine
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
        if not self.engine.distributed:
            x, y = self.x.read(idx), self.y[idx]
            return (x, y) if self.weights is None else (x, y, self.weights[idx])
        n = len(idx)
        weights = np.ones(n, np.float32) if self.weights is None else self.weights[idx]
        scale = np.float32(self.engine.padded(n) / n)
        positions = np.arange(n)
        return (self.engine.read_share(self.x.read, idx), self.engine.read_share(self.y.__getitem__, idx),
                self.engine.read_share(lambda rows: weights[rows] * scale, positions))

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
