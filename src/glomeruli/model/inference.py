"""Running a model over rows of inputs: the one forward pass of training, evaluation and prediction.

`forward` runs one padded batch on one device or on several (every process gets every output row);
`predict_batch` and `predict_rows` feed it. Every batch a model sees has the same shape (a short last
batch is zero-padded, outputs trimmed), so JAX/XLA compiles, and TensorFlow traces, each model once.
"""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import h5py
import keras
import numpy as np

from glomeruli.model import distribute
from glomeruli.model.distribute import Engine
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


def forward(model: keras.Model, x: np.ndarray, n: int, engine: Engine | None = None) -> np.ndarray:
    """Outputs of the first `n` rows of a padded global batch, given this process's share `x` of it
    (`Engine.read_share`); every process gets every output row.

    One device: `predict_on_batch`. JAX on several: one jitted forward pass with the input split over the
    mesh and the output replicated (Keras' predict_on_batch would neither split the input nor gather the
    output across hosts). TensorFlow on several: `model.predict` inside the strategy (predict_on_batch
    returns one copy of the batch per replica under MirroredStrategy).
    """
    engine = engine or distribute.current()
    if not engine.distributed:
        return np.asarray(model.predict_on_batch(x))[:n]
    if engine.backend == "jax":
        return _jax_forward(model, x, len(x) * engine.process_count)[:n]
    with engine.scope():
        return np.asarray(model.predict(x, batch_size=len(x), verbose=0))[:n]


_JAX_FORWARDS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _jax_forward(model: keras.Model, x_local: np.ndarray, n_global: int) -> np.ndarray:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    global_shape = (n_global, *x_local.shape[1:])
    layout = keras.distribution.distribution().get_data_layout(global_shape).backend_layout
    x = jax.make_array_from_process_local_data(layout, x_local, global_shape)
    call = _JAX_FORWARDS.get(model)
    if call is None:  # traced once per model

        def stateless(trainable, non_trainable, inputs):
            outputs, _ = model.stateless_call(trainable, non_trainable, inputs, training=False)
            return outputs

        call = jax.jit(stateless, out_shardings=NamedSharding(layout.mesh, PartitionSpec()))
        _JAX_FORWARDS[model] = call
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    return np.asarray(call(trainable, non_trainable, x))


def predict_batch(model: keras.Model, x: np.ndarray, batch_size: int, engine: Engine | None = None) -> np.ndarray:
    """Outputs of one batch `x` (the whole batch, on every process); a short batch is padded to `batch_size`,
    so each model runs at one batch shape only (JAX/XLA compiles, and TensorFlow retraces, for every new shape)."""
    engine = engine or distribute.current()
    n = len(x)
    local = engine.read_share(x.__getitem__, np.arange(n), engine.padded(max(batch_size, n)))
    return forward(model, local, n, engine)


def predict_rows(model: keras.Model, rows: Rows, batch_size: int, engine: Engine | None = None) -> np.ndarray:
    """Model outputs for every row, in order, batch by batch (memory bounded by two batches).

    A thread reads (and converts, and pads) the next batch while the model runs on this one, so on an
    accelerator the host-side reading overlaps the forward pass instead of adding to it. On several
    processes each reads only its share of every batch.
    """
    engine = engine or distribute.current()
    padded = engine.padded(batch_size)

    def read(start: int) -> np.ndarray:
        return engine.read_share(rows.read, np.arange(start, min(start + batch_size, len(rows))), padded)

    outputs = []
    with ThreadPoolExecutor(1, thread_name_prefix="glomeruli-prefetch") as prefetch:
        pending = prefetch.submit(read, 0) if len(rows) else None
        for start in range(0, len(rows), batch_size):
            x = pending.result()
            pending = prefetch.submit(read, start + batch_size) if start + batch_size < len(rows) else None
            outputs.append(forward(model, x, min(batch_size, len(rows) - start), engine))
    return np.concatenate(outputs).astype(np.float32)
