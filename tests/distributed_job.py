"""One training run for tests/model/test_distribute.py, in a process of its own.

The device layout must be set before JAX starts (XLA_FLAGS) or TensorFlow initialises (logical CPU
devices), so each 1-device, 2-device or 2-process run is a fresh interpreter running this file:

    python tests/distributed_job.py '{"backend": "jax", "local_devices": 2, "devices": 2, ...}'

It trains both phases, cached and on the full graph, predicts, trains a BatchNormalization layer in
training mode, and saves every result as arrays in `out` (one .npz per process).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

cfg = json.loads(sys.argv[1])
os.environ["KERAS_BACKEND"] = cfg["backend"]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if cfg["backend"] == "jax":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cfg['local_devices']}"
    os.environ["JAX_PLATFORMS"] = "cpu"
else:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cfg["local_devices"])

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from conftest import small_params  # noqa: E402
from glomeruli.model import distribute  # noqa: E402
from glomeruli.model import efficientnet as gm  # noqa: E402
from glomeruli.model.backend import configure  # noqa: E402
from glomeruli.data.h5store import ImageStore  # noqa: E402
from glomeruli.model.inference import ArrayRows, StoreRows, predict_batch, predict_rows  # noqa: E402
from glomeruli.data.split import read_split  # noqa: E402
from glomeruli.model.batches import Batches  # noqa: E402
from glomeruli.model.training import finetune, load_phase_data, train_frozen  # noqa: E402


def stand_in_base(image_size: int, weights: str) -> keras.Model:
    """A tiny network named like EfficientNetB3 (stem_, block1..7, top_, with BatchNormalization): the
    package's freezing, unfreezing, splitting and caching run on it unchanged, in a fraction of the time."""
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    for block in range(1, 8):
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name=f"block{block}a_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}a_bn")(x)
    x = keras.layers.Conv2D(8, 1, name="top_conv")(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    x = keras.layers.Activation("relu", name="top_activation")(x)
    return keras.Model(inputs, x, name="efficientnetb3")


def bn_in_training_mode(x: np.ndarray, y: np.ndarray, batch_size: int, engine: distribute.Engine) -> list[np.ndarray]:
    """One epoch of a BatchNormalization layer that trains (batch statistics): its moving mean and variance."""
    configure(3, "float32", "auto")
    inputs = keras.Input((x.shape[1],))
    bn = keras.layers.BatchNormalization(momentum=0.5, name="bn")
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(bn(inputs)))
    gm.compile_model(model, 1e-3)
    model.fit(Batches(ArrayRows(x), y, batch_size, engine=engine), epochs=1, shuffle=False, verbose=0)
    return [keras.ops.convert_to_numpy(bn.moving_mean), keras.ops.convert_to_numpy(bn.moving_variance)]


def main() -> None:
    gm._base = stand_in_base
    for devices in cfg["devices"]:  # one process, several device counts: JAX and TensorFlow start only once
        run(devices)
        distribute.stop()


def run(devices: int | str) -> None:
    engine = distribute.start(devices)
    p = small_params(**{"preprocess.image_size": cfg["image_size"]})
    runtime = replace(p.runtime, memory_budget_gb=cfg["memory_gb"])
    frozen_p = replace(p.train_frozen, epochs=2, batch_size=cfg["batch_size"], lr=1e-2)
    fine_p = replace(p.finetune, epochs=2, batch_size=cfg["batch_size"], unfreeze_blocks=1, lr=1e-3,
                     lr_schedule="constant", warmup_epochs=0)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, np.ndarray] = {"n_devices": np.array(engine.n_devices)}
    with engine.scope(), ImageStore(Path(cfg["store"])) as store:
        split = read_split(Path(cfg["split"]), len(store.meta))
        data = load_phase_data(store, split, runtime.memory_budget_gb)
        caches = cfg.get("caches", [True, False])  # cached first: fine-tuning starts from the cached run's model
        for cache in caches:
            configure(7, "float32", "auto")
            model = gm.build_model(cfg["image_size"], "none", cfg["dropout"])
            train_frozen(model, data, frozen_p, replace(runtime, cache_features=cache), seed=7, callbacks=[])
            tag = "cached" if cache else "full"
            for i, w in enumerate(gm.head_of(model).get_weights()):
                results[f"frozen_{tag}_{i}"] = w
            if cache:
                frozen_path = out / f"frozen-{devices}-{engine.process_index}.keras"
                model.save(frozen_path)
        for cache in caches:
            configure(11, "float32", "auto")
            model = gm.load_model(frozen_path)
            finetune(model, data, fine_p, replace(runtime, cache_features=cache), seed=11, callbacks=[])
            tag = "cached" if cache else "full"
            for i, w in enumerate(model.get_weights()):
                results[f"finetune_{tag}_{i}"] = w
        results["predict_rows"] = predict_rows(model, StoreRows(store, split.test), cfg["predict_batch"])
        results["predict_batch"] = predict_batch(model, store.read(split.test[:3]).astype(np.float32),
                                                 cfg["predict_batch"])
        rng = np.random.default_rng(0)
        x_bn = np.concatenate([rng.normal(0, 1, (4, 3)), rng.normal(3, 2, (4, 3))]).astype(np.float32)
        results["bn_x"] = x_bn
        results["bn_moving_mean"], results["bn_moving_var"] = bn_in_training_mode(
            x_bn, (np.arange(8) % 2).astype(np.float32), 8, engine)
    np.savez(out / f"results-{devices}-{engine.process_index}.npz", **results)


if __name__ == "__main__":
    main()
