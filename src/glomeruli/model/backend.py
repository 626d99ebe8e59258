"""The only place that knows which Keras backend runs: accelerator detection, precision, seeding.

TensorFlow is imported here and nowhere else, and only when it is the backend, so the package
runs on JAX machines that have no TensorFlow. `configure(seed, mixed_precision, deterministic)` seeds,
applies `runtime.deterministic` (TensorFlow's op determinism; on JAX `request_xla_determinism` sets XLA's
flag, which XLA reads only when its backend starts, so stages call it before anything queries a device)
and sets the dtype policy. `score_gradients` is the package's one gradient path (GradientTape on
TensorFlow, `jax.value_and_grad` on JAX), used by Grad-CAM; `tf_mirrored_strategy` builds TensorFlow's
data parallelism for the distribution module. Doctor reports `local_devices` and `dtype_policy`.
"""

from __future__ import annotations

import logging
import os

from glomeruli.core.errors import UserError

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


def configure(seed: int, mixed_precision: str, deterministic: str | bool) -> str:
    """Seed every generator, apply `runtime.deterministic`, set the dtype policy; returns the policy."""
    request_xla_determinism(deterministic)  # before the first device query below starts JAX's backend
    keras.utils.set_random_seed(seed)
    device = accelerator()
    deterministic_ops = _apply_op_determinism(deterministic, device)
    policy = dtype_policy(mixed_precision, device)
    keras.mixed_precision.set_dtype_policy(policy)
    log.info("keras %s on %s (%s), dtype policy %s, deterministic ops %s", keras.__version__, keras.backend.backend(),
             device, policy, "on" if deterministic_ops else "off")
    return policy


def dtype_policy(mixed_precision: str, device: str) -> str:
    """`runtime.mixed_precision` on this device: `auto` is bfloat16 on accelerators, float32 on CPUs."""
    if mixed_precision != "auto":
        return mixed_precision
    return "mixed_bfloat16" if device in ("gpu", "tpu") else "float32"


def backend_library_version() -> str:
    """The version of the library under Keras (TensorFlow, JAX or PyTorch)."""
    import importlib

    name = keras.backend.backend()
    return getattr(importlib.import_module(name), "__version__", "unknown")


def local_devices() -> list[str]:
    """Every device the active backend sees on this host, e.g. ['cuda:0', 'cuda:1'] or ['cpu:0']."""
    name = keras.backend.backend()
    if name == "jax":
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.local_devices()]
    if name == "tensorflow":
        import tensorflow as tf

        return [d.name.replace("/physical_device:", "").lower() for d in tf.config.list_physical_devices()]
    if name == "torch":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu:0"]
    return ["cpu:0"]


XLA_DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"


def request_xla_determinism(deterministic: str | bool) -> None:
    """JAX, `runtime.deterministic: true`: ask XLA for deterministic GPU kernels. Call before any device query.

    XLA reads XLA_FLAGS once, when JAX's backend starts (the first device query; `import jax` alone does not:
    checked with jax 0.10), so the flag is added to the environment only while the backend has not started
    and XLA_FLAGS does not set it already; otherwise this says what to do. `auto` adds nothing: it means on
    for CPU runs only, and JAX on a CPU is deterministic as it is.
    """
    if keras.backend.backend() != "jax" or deterministic is not True:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" in flags:
        log.info("runtime.deterministic: true; XLA_FLAGS sets xla_gpu_deterministic_ops already (%s): kept", flags)
    elif _jax_backend_started():
        log.warning("runtime.deterministic: true, but JAX started before %s could be set: GPU results may still "
                    "vary run to run; export XLA_FLAGS=%s before the run", XLA_DETERMINISM_FLAG, XLA_DETERMINISM_FLAG)
    else:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISM_FLAG}".strip()
        log.info("runtime.deterministic: true on JAX: XLA_FLAGS=%s (deterministic GPU kernels; slower)",
                 os.environ["XLA_FLAGS"])


def _jax_backend_started() -> bool:
    try:
        from jax._src import xla_bridge  # no public API tells whether the backend has started

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True  # cannot tell: say it may be too late rather than set a flag that may be ignored


def _apply_op_determinism(deterministic: str | bool, device: str) -> bool:
    """`auto`: deterministic ops on CPU runs only; true: always; false: never. Returns whether they are on."""
    on = device == "cpu" if deterministic == "auto" else bool(deterministic)
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.framework import config as tf_config  # is/disable are not in the public API

        if on:
            tf.config.experimental.enable_op_determinism()
            if device != "cpu":
                log.warning("runtime.deterministic: true on %s: TensorFlow op determinism slows training, and an op "
                            "without a deterministic GPU kernel stops it with an error; runtime.deterministic: "
                            "auto turns it off on accelerators", device)
        elif tf_config.is_op_determinism_enabled():
            tf_config.disable_op_determinism()  # turned on by an earlier configure in this process
    elif name == "jax" and device != "cpu":
        # On JAX determinism is XLA's: its flag (request_xla_determinism) makes GPU reductions and scatters
        # deterministic; CPU runs are deterministic either way.
        on = "xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", "")
    elif name == "torch":
        import torch

        torch.use_deterministic_algorithms(on)
    return on


def tf_devices() -> list[str]:
    """TensorFlow's local devices for data parallelism: the GPUs, else the (logical) CPUs."""
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]


def tf_mirrored_strategy(devices: list[str]):
    """tf.distribute.MirroredStrategy over `devices` (glomeruli.model.distribute drives it)."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices)


def score_gradients(score, x):
    """(scores, d sum(scores) / d x) as numpy arrays: `score` maps a batch tensor to one score per row.

    The one gradient path of the package (Grad-CAM): GradientTape on TensorFlow, jax.value_and_grad on
    JAX, autograd on PyTorch; the caller never sees a backend tensor type.
    """
    import numpy as np

    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            scores = score(x)
            total = tf.reduce_sum(scores)
        return np.asarray(scores), np.asarray(tape.gradient(total, x))
    if name == "jax":
        import jax
        import jax.numpy as jnp

        def total(inputs):
            scores = score(inputs)
            return jnp.sum(scores), scores

        (_, scores), grads = jax.value_and_grad(total, has_aux=True)(jnp.asarray(x))
        return np.asarray(scores), np.asarray(grads)
    if name == "torch":
        import torch

        inputs = torch.as_tensor(np.asarray(x)).requires_grad_(True)
        scores = score(inputs)
        scores.sum().backward()
        return scores.detach().cpu().numpy(), inputs.grad.detach().cpu().numpy()
    raise BackendError(f"gradients are not implemented for the {name!r} backend: use tensorflow or jax")
