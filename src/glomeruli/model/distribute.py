"""Devices only: which devices run the model, joining a multi-process job, and who reads what share of a batch.

JAX: `keras.distribution.DataParallel` over a mesh of the chosen devices (every process's, on several
hosts), set once with `set_distribution`, so every model built or loaded afterwards has replicated
variables and every batch is split along its first axis. TensorFlow: `tf.distribute.MirroredStrategy`
(from glomeruli.model.backend, the one module that imports TensorFlow); models are built, compiled, fitted
and run inside `Engine.scope()`.

`batch_size` settings are global batches. A batch that does not divide by the device count (the short
last batch of an epoch, the last batch of a prediction) is padded with zero rows whose sample weight is
0; the real rows' weights are scaled by padded/real so the mean loss, and so the gradient, is exactly
the one of the unpadded batch. On several processes each process reads only its share of every batch
(`Engine.read_share`, the one share-and-pad step of training batches and of prediction). The forward
pass itself is glomeruli.model.inference's.

Nothing here imports Keras at module level: the data stages (and glomeruli.core.atomic) stay light.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from glomeruli.core.errors import UserError

log = logging.getLogger(__name__)

# Keras' own variables for several processes (keras.distribution.initialize reads them).
KERAS_MULTIPROCESS_VARS = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                           "KERAS_DISTRIBUTION_PROCESS_ID")


class DistributeError(UserError, RuntimeError):
    """The requested devices or processes cannot be used as asked."""


@dataclass(frozen=True)
class Engine:
    """Where the model runs. `n_devices` counts replicas over every process (1: the plain path)."""

    backend: str = "none"
    n_devices: int = 1
    process_index: int = 0
    process_count: int = 1
    strategy: Any = None  # tf.distribute.Strategy on TensorFlow, else None

    @property
    def distributed(self) -> bool:
        return self.n_devices > 1

    @property
    def is_writer(self) -> bool:
        """Process 0: the one that logs progress and whose outputs are the run's result."""
        return self.process_index == 0

    def scope(self):
        """Build, compile, fit and run models inside this (TensorFlow's strategy scope; a no-op on JAX)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def padded(self, n: int) -> int:
        """`n` rounded up to a multiple of the device count: the batch every replica gets an equal part of."""
        return -(-n // self.n_devices) * self.n_devices

    def share(self, n: int, padded: int | None = None) -> tuple[slice, int]:
        """(rows of a global batch of `n` this process reads, zero rows it appends after them).

        The global batch is padded to `padded` rows (default: the next multiple of the device count);
        process p holds rows [p*k, (p+1)*k) of it, k = padded / process_count.
        """
        padded = self.padded(n) if padded is None else padded
        k = padded // self.process_count
        start = min(self.process_index * k, n)
        stop = min(start + k, n)
        return slice(start, stop), k - (stop - start)

    def read_share(self, read: Callable[[np.ndarray], np.ndarray], indices: np.ndarray,
                   padded: int | None = None) -> np.ndarray:
        """This process's rows of the global batch `indices`, read with `read` and padded with zero rows so
        every replica gets as many (see `share`); a share that is all padding still has the rows' shape."""
        rows, pad = self.share(len(indices), padded)
        local = indices[rows]
        x = read(local) if len(local) else read(indices[:1])[:0]
        return pad_rows(x, pad)


ONE_DEVICE = Engine()
_ENGINE = ONE_DEVICE


def current() -> Engine:
    """The engine `start` set up (one device, one process until then)."""
    return _ENGINE


def is_writer() -> bool:
    return _ENGINE.is_writer


def nearest_valid_sizes(batch_size: int, n_devices: int) -> list[int]:
    below = batch_size // n_devices * n_devices
    return sorted({s for s in (below, below + n_devices) if s > 0})


def check_batch_size(key: str, batch_size: int, engine: Engine | None = None) -> None:
    """A configured (global) training batch must split evenly over the replicas: refuse it at stage start."""
    engine = engine or _ENGINE
    if batch_size % engine.n_devices:
        sizes = " or ".join(str(s) for s in nearest_valid_sizes(batch_size, engine.n_devices))
        raise DistributeError(f"params.yaml: `{key}` = {batch_size} does not divide over {engine.n_devices} devices "
                              f"(runtime.devices): use {sizes}, or set runtime.devices to a divisor of {batch_size}")


def _multiprocess_requested() -> str | None:
    """Which launcher asks for several processes: Keras' variables, or a Slurm job step of several tasks."""
    if all(os.environ.get(v) for v in KERAS_MULTIPROCESS_VARS) and int(os.environ[KERAS_MULTIPROCESS_VARS[1]]) > 1:
        return "keras"
    # An srun job step of several tasks (not SLURM_NTASKS: the batch script itself runs once, not per task).
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return "slurm"
    return None


def _choose(requested: str | int, available: list, what: str) -> list:
    if requested == "auto":
        return available
    if requested > len(available):
        raise DistributeError(f"params.yaml: `runtime.devices` = {requested} but this machine has {len(available)} "
                              f"{what}: set runtime.devices to auto or to at most {len(available)}")
    return available[:requested]


def _start_jax(requested: str | int) -> Engine:
    import jax
    import keras

    launcher = _multiprocess_requested()
    if launcher is not None and not jax.distributed.is_initialized():
        log.info("joining a job of %s processes (%s launcher)", os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES")
                 or os.environ.get("SLURM_STEP_NUM_TASKS"), launcher)
        if launcher == "keras":
            keras.distribution.initialize()  # jax.distributed.initialize with the coordinator of the job
        else:
            jax.distributed.initialize()  # reads the coordinator, process count and id from Slurm
    local = _choose(requested, jax.local_devices(), f"{jax.default_backend()} device(s) for this process")
    per_process = len(local)
    # Every process uses its first `per_process` devices; the mesh spans them all, ordered by process.
    chosen = sorted((d for d in jax.devices()
                     if sorted(jax.local_devices(d.process_index), key=lambda e: e.id).index(d) < per_process),
                    key=lambda d: (d.process_index, d.id))
    engine = Engine("jax", len(chosen), jax.process_index(), jax.process_count())
    if engine.distributed:
        # auto_shard_dataset off: batches.Batches already hands each process its share of the batch.
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=chosen, auto_shard_dataset=False))
    return engine


def _start_tensorflow(requested: str | int) -> Engine:
    from glomeruli.model.backend import tf_devices, tf_mirrored_strategy

    if _multiprocess_requested() is not None:
        raise DistributeError("several processes (KERAS_DISTRIBUTION_* or a Slurm job of several tasks) are "
                              "supported on JAX only: run with KERAS_BACKEND=jax, or one process per machine")
    devices = _choose(requested, tf_devices(), "TensorFlow device(s)")
    strategy = tf_mirrored_strategy(devices) if len(devices) > 1 else None
    return Engine("tensorflow", len(devices), 0, 1, strategy)


def start(requested: str | int = "auto") -> Engine:
    """Set up data parallelism for `runtime.devices` (before any model is built); returns the engine.

    Call once per process, first thing in a stage: on several hosts it joins the JAX job.
    """
    global _ENGINE
    import keras

    name = keras.backend.backend()
    if name == "jax":
        engine = _start_jax(requested)
    elif name == "tensorflow":
        engine = _start_tensorflow(requested)
    else:
        if requested not in ("auto", 1):
            raise DistributeError(f"params.yaml: `runtime.devices` = {requested} on the {name} backend: data "
                                  "parallelism runs on jax or tensorflow; set runtime.devices to 1 or auto")
        engine = Engine(name)
    _ENGINE = engine
    if engine.process_count > 1 and not engine.is_writer:
        logging.getLogger("glomeruli").setLevel(logging.WARNING)  # one progress log: process 0's
    log.info("%s on %d device(s), process %d of %d", name, engine.n_devices, engine.process_index + 1,
             engine.process_count)
    return engine


def stop() -> None:
    """Back to one device (tests, and callers that run several stage bodies in one process)."""
    global _ENGINE
    if _ENGINE.backend == "jax" and _ENGINE.distributed:
        import keras

        keras.distribution.set_distribution(None)
    _ENGINE = ONE_DEVICE


def pad_rows(x: np.ndarray, n: int, value: float = 0) -> np.ndarray:
    """`x` with `n` rows of `value` appended (the masked rows of a padded batch)."""
    if n == 0:
        return x
    return np.concatenate([x, np.full((n, *x.shape[1:]), value, x.dtype)])
