"""EfficientNetB3 classifier: build, freeze / unfreeze, split at a block for caching, save and load safely."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import keras
import numpy as np

from glomeruli.core.errors import UserError

log = logging.getLogger(__name__)

# EfficientNetB3: stem, block1 ... block7, top (finetune.unfreeze_blocks counts the blocks).
N_BLOCKS = 7
BACKBONE_NAME = "backbone"
POOL_NAME = "avg_pool"
HEAD_NAME = "head"
IMAGENET_FILE = "efficientnetb3_notop.h5"
DOWNLOAD_TIMEOUT_S = 60
# BatchNormalization's moving statistics when it trains from scratch: Keras' 0.99 needs ~500 steps to
# forget the initial mean 0 / variance 1, longer than a CPU run lasts; 0.9 follows within ~50 steps.
FROM_SCRATCH_BN_MOMENTUM = 0.9


class WeightsError(UserError, RuntimeError):
    """Pretrained weights are unavailable."""


class ModelLoadError(UserError, RuntimeError):
    """A model file that is unsafe, corrupt or not one of ours."""


def _base(image_size: int, weights: str) -> keras.Model:
    keras_weights = None if weights == "none" else weights
    if Path(weights).name == IMAGENET_FILE:
        log.warning("model.weights points at %s: Keras skips its ImageNet variance rescaling for file paths, so "
                    "inputs are normalised slightly differently; for the faithful offline route copy the file "
                    "into ~/.keras/models/ and set model.weights: imagenet", weights)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled box must fail fast, not hang
    try:
        return keras.applications.EfficientNetB3(include_top=False, weights=keras_weights,
                                                 input_shape=(image_size, image_size, 3))
    except Exception as err:  # download and h5 errors come in many types (URLError, OSError, ValueError...)
        if weights != "imagenet":
            raise WeightsError(f"cannot load EfficientNetB3 weights from {weights!r} (model.weights): {err}") from err
        raise WeightsError(
            f"ImageNet weights for EfficientNetB3 could not be obtained ({type(err).__name__}: {err}). Ways out: "
            f"(1) run once with internet access so Keras caches {IMAGENET_FILE} in ~/.keras/models/; "
            f"(2) copy {IMAGENET_FILE} into ~/.keras/models/ by hand; "
            "(3) set model.weights to a weights file path, or to none to train from scratch "
            "(e.g. `dvc exp run -S model.weights=none`).") from err
    finally:
        socket.setdefaulttimeout(previous_timeout)


@keras.saving.register_keras_serializable(package="glomeruli")
class InferenceMode(keras.layers.Layer):
    """Runs the wrapped model with training=False, unless `train_statistics` is on and Keras is fitting.

    Off (the default, and always over pretrained weights): BatchNormalization keeps its moving statistics and
    drop-connect stays off, so frozen layers give fixed outputs (which makes caching exact) while unfrozen ones
    still receive gradients. Keras 3 functional models override a `training=False` given at graph-building time
    with fit's training=True, hence this wrapper. On (fine-tuning from scratch): fit runs the base in training
    mode (trainable BatchNormalization uses and updates batch statistics, drop-connect on); evaluation and
    prediction still run it in inference mode. The switch is saved with the model.
    """

    def __init__(self, inner: keras.Model, train_statistics: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.train_statistics = bool(train_statistics)

    def call(self, inputs, training=None):
        return self.inner(inputs, training=bool(training) and self.train_statistics)

    def compute_output_shape(self, input_shape):
        return self.inner.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "inner": keras.saving.serialize_keras_object(self.inner),
                "train_statistics": self.train_statistics}

    @classmethod
    def from_config(cls, config):
        config["inner"] = keras.saving.deserialize_keras_object(config["inner"])
        return cls(**config)


def build_model(image_size: int, weights: str, dropout: float) -> keras.Model:
    """uint8-range RGB (0-255, as float) -> P(globally sclerotic). The base normalises internally."""
    base = _base(image_size, weights)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    backbone = InferenceMode(base, name=BACKBONE_NAME)
    features = keras.layers.GlobalAveragePooling2D(name=POOL_NAME)(backbone(inputs))
    head = keras.Sequential([
        keras.Input(features.shape[1:]),
        # Standardises features with train-set statistics (adapt_head): their scale differs by orders
        # of magnitude between ImageNet and untrained bases, and a fixed layer keeps caching exact.
        # The whole head computes in float32 under mixed precision: bfloat16 keeps 8 bits of mantissa,
        # too few for standardising features and for the sigmoid near 0 and 1.
        keras.layers.Normalization(axis=-1, name="head_norm", dtype="float32"),
        keras.layers.Dropout(dropout, name="head_dropout", dtype="float32"),
        keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability"),
    ], name=HEAD_NAME)
    return keras.Model(inputs, head(features), name="glomeruli_b3")


def base_of(model: keras.Model) -> keras.Model:
    """The EfficientNetB3 inside the model's InferenceMode wrapper."""
    return model.get_layer(BACKBONE_NAME).inner


def freeze_base(model: keras.Model) -> None:
    base_of(model).trainable = False


def _block_number(layer_name: str) -> int | None:
    """EfficientNet layer names: stem_* (0), block1a_* ... block7b_*, top_* (8)."""
    if layer_name.startswith("top_"):
        return N_BLOCKS + 1
    if layer_name.startswith("stem_"):
        return 0
    match = re.match(r"block(\d)", layer_name)
    return int(match.group(1)) if match else None


def first_unfrozen_block(n_blocks: int | str) -> int:
    """`all`: the stem (0) too."""
    return 0 if n_blocks == "all" else N_BLOCKS + 1 - n_blocks


def unfreeze_top_blocks(model: keras.Model, n_blocks: int | str, *, train_statistics: bool = False) -> list[str]:
    """Unfreeze the top `n_blocks` blocks and top_ layers (`all`: every layer, stem included).

    BatchNormalization stays frozen unless `train_statistics` (from scratch: its statistics were never
    learnt), which also makes fit run the base in training mode (InferenceMode) with BatchNormalization's
    moving statistics following at FROM_SCRATCH_BN_MOMENTUM.
    """
    base = base_of(model)
    base.trainable = True
    first = first_unfrozen_block(n_blocks)
    unfrozen = []
    for layer in base.layers:
        block = _block_number(layer.name)
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = block is not None and block >= first and (train_statistics or not is_bn)
        if is_bn and layer.trainable:
            layer.momentum = FROM_SCRATCH_BN_MOMENTUM
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    model.get_layer(BACKBONE_NAME).train_statistics = train_statistics
    return unfrozen


def calibrate_batchnorm(model: keras.Model, images: np.ndarray) -> int:
    """Set every BatchNormalization's moving statistics to those of `images` run in training mode.

    From scratch the moving statistics are Keras' initial mean 0 / variance 1, so inference mode (evaluation,
    the frozen phase's features) and training mode (fine-tuning from scratch) see activations of entirely
    different scales; one pass with momentum 0 makes them agree before the first step. Layers left frozen keep
    these statistics from then on (normalised activations instead of the initial, meaningless ones); trainable
    ones go on following the batches. Returns the layer count.
    """
    layers = [layer for layer in base_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.momentum, layer.trainable) for layer in layers]
    for layer in layers:
        layer.momentum, layer.trainable = 0.0, True  # a frozen BatchNormalization ignores training=True
    try:
        base_of(model)(keras.ops.convert_to_tensor(images, dtype="float32"), training=True)
    finally:
        for layer, (momentum, trainable) in zip(layers, saved):
            layer.momentum, layer.trainable = momentum, trainable
    return len(layers)


def feature_model(model: keras.Model) -> keras.Model:
    """Image -> pooled base features: the fixed part of the frozen phase."""
    return keras.Model(model.inputs, model.get_layer(POOL_NAME).output, name="features")


def head_of(model: keras.Model) -> keras.Model:
    return model.get_layer(HEAD_NAME)


def adapt_head(model: keras.Model, train_features: np.ndarray) -> None:
    """Set the head's feature standardisation from the training set's pooled features."""
    head_of(model).get_layer("head_norm").adapt(train_features)


def reset_head_standardisation(model: keras.Model) -> None:
    """Make the head's standardisation the identity (mean 0, variance 1).

    For a base about to train from scratch: a random base's pooled features barely differ between images
    (spread ~0.1), so a standardisation fixed now would multiply the differences the base learns by ~10 to 30
    and saturate the sigmoid, so validation losses explode (bench/RESULTS.md, training recipes). Its own BatchNormalization
    keeps the features at unit scale instead, as in the plain EfficientNet classifier.
    """
    norm = head_of(model).get_layer("head_norm")
    mean, variance, count = norm.get_weights()
    norm.set_weights([np.zeros_like(mean), np.ones_like(variance), count])
    sync_normalization(model)


def sync_normalization(model: keras.Model) -> None:
    """Recompute every adapted Normalization layer's mean and variance from its variables.

    Keras' Normalization keeps them as tensors derived at `adapt` time: `set_weights` or `assign` (early
    stopping's restore, a resumed run) change the variables but not what the layer computes with, so a model
    handed back that way would predict with the statistics of its last `adapt` (and differ from its saved file).
    Traced predict/evaluate functions hold those tensors as constants, so they are dropped too.
    """
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.Normalization) and layer.built:
            layer.finalize_state()
    for traced in ("train_function", "test_function", "predict_function"):
        if hasattr(model, traced):
            setattr(model, traced, None)


def _all_layers(layer) -> list:
    found = [layer]
    for child in getattr(layer, "layers", []) + ([layer.inner] if isinstance(layer, InferenceMode) else []):
        found += _all_layers(child)
    return found


def split_at_block(model: keras.Model, n_blocks: int) -> tuple[keras.Model, keras.Model]:
    """(bottom, top): image -> activations entering the first unfrozen block -> probability.

    Both share layers (and so weights) with `model`; training `top` trains `model`.
    """
    base = base_of(model)
    first = first_unfrozen_block(n_blocks)
    boundary_layer = next(l for l in base.layers if _block_number(l.name) == first)
    boundary = boundary_layer.input
    bottom_base = InferenceMode(keras.Model(base.inputs, boundary), name="bottom_base")
    top_base = InferenceMode(keras.Model(boundary, base.output), name="top_base")
    image = keras.Input(model.inputs[0].shape[1:], name="image")
    bottom = keras.Model(image, bottom_base(image), name="bottom")
    activations = keras.Input(boundary.shape[1:], name="activations")
    pooled = model.get_layer(POOL_NAME)(top_base(activations))
    top = keras.Model(activations, head_of(model)(pooled), name="top")
    return bottom, top


def compile_model(model: keras.Model, lr: float | keras.optimizers.schedules.LearningRateSchedule) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.BinaryCrossentropy(),
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])


def load_model(path: Path | str) -> keras.Model:
    """Load a .keras model in safe mode: files that would run arbitrary code are refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found; run `dvc repro` to train one, or pass --model PATH")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" in str(err) or "lambda" in str(err).lower():
            raise ModelLoadError(f"{path} asks to run arbitrary code (a Lambda layer) and was refused; "
                                 "only load models you trust, retrained with this pipeline") from err
        raise ModelLoadError(f"{path} is not a model this pipeline can load ({err}); retrain it with "
                             "`dvc repro` or pass the model.keras that `dvc repro` wrote") from err
    except Exception as err:  # a corrupt zip or h5 raises many types
        raise ModelLoadError(f"{path} could not be read as a Keras model ({type(err).__name__}: {err}); "
                             "retrain it with `dvc repro`") from err
