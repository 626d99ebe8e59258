"""Running a model over rows of inputs: the one batching path of training, evaluation and prediction.

Every batch a model sees has the same shape (a short last batch is zero-padded, outputs trimmed), so
JAX/XLA compiles, and TensorFlow traces, each model once.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import h5py
import keras
import numpy as np

from glomeruli.model import distribute
from glomeruli.data.h5store import ImageStore

log = logging.getLogger(__name__)
GB = 1024**3


class Rows(Protocol):
    """Anything that returns float32 model inputs for local indices 0..n-1."""

    def __len__(self) -> int: ...
    def read(self, indices: np.ndarray) -> np.ndarray: ...


class ArrayRows:
    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.array[indices].astype(np.float32, copy=False)


class StoreRows:
    """Records of an image store at given rows, streamed from HDF5 batch by batch."""

    def __init__(self, store: ImageStore, rows: np.ndarray):
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.store.read(self.rows[indices]).astype(np.float32)


class H5Rows:
    """A float array in a temporary HDF5 file (activations too large for the memory budget)."""

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices)
        out = np.empty((len(indices), *self.dataset.shape[1:]), np.float32)
        out[order] = self.dataset[np.sort(indices)]
        return out


def image_rows(store: ImageStore, rows: np.ndarray, memory_budget_gb: float) -> Rows:
    """Hold the images in RAM when they fit the budget, else stream them from the store."""
    nbytes = len(rows) * store.image_size**2 * 3
    if nbytes <= memory_budget_gb * GB:
        return ArrayRows(store.read(rows))
    log.info("streaming %d images (%.1f GB) from %s", len(rows), nbytes / GB, store.path)
    return StoreRows(store, rows)


def predict_batch(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """One batch of outputs; a short last batch is padded to `batch_size`, so each model runs at one
    batch shape only (JAX/XLA compiles, and TensorFlow retraces, for every new shape)."""
    n = len(x)
    engine = distribute.current()
    if engine.distributed:  # padded to a multiple of the devices; each process passes its share on
        padded = engine.padded(batch_size)
        rows, pad = engine.share(n, padded)
        return distribute.predict(model, distribute.pad_rows(x[rows], pad), padded)[:n]
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict_on_batch(x))[:n]


def predict_rows(model: keras.Model, rows: Rows, batch_size: int) -> np.ndarray:
    """Model outputs for every row, in order, batch by batch (memory bounded by two batches).

    A thread reads (and converts) the next batch while the model runs on this one, so on an
    accelerator the host-side reading overlaps the forward pass instead of adding to it.
    """
    engine = distribute.current()

    def read(start: int) -> np.ndarray:
        batch = np.arange(start, min(start + batch_size, len(rows)))
        if engine.process_count == 1:
            return rows.read(batch)
        # Several processes: each reads only its share of the batch (predict_batch takes shares as they come).
        share, _ = engine.share(len(batch), engine.padded(batch_size))
        return _read_share(rows, batch, share)

    outputs = []
    with ThreadPoolExecutor(1, thread_name_prefix="glomeruli-prefetch") as prefetch:
        pending = prefetch.submit(read, 0) if len(rows) else None
        for start in range(0, len(rows), batch_size):
            x = pending.result()
            pending = prefetch.submit(read, start + batch_size) if start + batch_size < len(rows) else None
            n = min(batch_size, len(rows) - start)
            outputs.append(predict_batch(model, x, batch_size) if engine.process_count == 1
                           else _predict_share(model, x, n, batch_size))
    return np.concatenate(outputs).astype(np.float32)


def _read_share(rows: Rows, batch: np.ndarray, share: slice) -> np.ndarray:
    """This process's rows of a batch; a share that is all padding still has the rows' shape."""
    if share.stop > share.start:
        return rows.read(batch[share])
    return rows.read(batch[:1])[:0]


def _predict_share(model: keras.Model, x_local: np.ndarray, n: int, batch_size: int) -> np.ndarray:
    """Outputs of a batch of `n` rows from this process's share of it (several processes)."""
    engine = distribute.current()
    padded = engine.padded(batch_size)
    _, pad = engine.share(n, padded)
    return distribute.predict(model, distribute.pad_rows(x_local, pad), padded)[:n]
