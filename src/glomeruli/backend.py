"""The only place that knows which Keras backend runs: accelerator detection, precision, seeding.

TensorFlow is imported here and nowhere else, and only when it is the backend, so the package
runs on JAX machines that have no TensorFlow.
"""

from __future__ import annotations

import logging
import os

from glomeruli.errors import UserError

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


class BackendError(UserError, RuntimeError):
    """Keras cannot start on the requested backend."""


def _import_keras():
    """Import Keras; a bad or missing backend becomes one clear line instead of Keras' traceback."""
    requested = os.environ.get("KERAS_BACKEND")
    if requested is not None and requested not in SUPPORTED_BACKENDS:
        raise BackendError(f"KERAS_BACKEND={requested!r} is not a Keras backend this pipeline runs on: set it to "
                           f"{', '.join(SUPPORTED_BACKENDS)} (tensorflow is the default), or unset it")
    try:
        import keras
    except (ImportError, ValueError) as err:
        where = f"KERAS_BACKEND={requested!r}" if requested else "the backend in ~/.keras/keras.json"
        raise BackendError(f"Keras could not start with {where} ({type(err).__name__}: {err}): install that "
                           "backend's package, or choose another with KERAS_BACKEND=tensorflow or jax") from err
    return keras


keras = _import_keras()
log = logging.getLogger(__name__)


def accelerator() -> str:
    """'gpu', 'tpu' or 'cpu' for the active backend."""
    name = keras.backend.backend()
    if name == "jax":
        import jax

        return jax.default_backend()
    if name == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if name == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def configure(seed: int, mixed_precision: str) -> str:
    """Seed every generator, make CPU runs repeatable, set the dtype policy; returns the policy."""
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    device = accelerator()
    policy = ("mixed_bfloat16" if device in ("gpu", "tpu") else "float32") if mixed_precision == "auto" else mixed_precision
    keras.mixed_precision.set_dtype_policy(policy)
    log.info("keras %s on %s (%s), dtype policy %s", keras.__version__, keras.backend.backend(), device, policy)
    return policy
