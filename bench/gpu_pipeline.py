#!/usr/bin/env python
"""The whole pipeline on one GPU at the real settings, timed: issue 3, item 7.

KERAS_BACKEND=jax, EfficientNetB3 at 300x300, batch 64, mixed bfloat16, `model.weights: none`
(the GPU box has no internet), on synthetic CMIL-sized data (RGBA PNGs of 250-950 px; 5,758 images
like the real CMIL set). It runs the package functions every stage runs (ingest, preprocess, augment,
split, train_frozen, finetune, evaluate) and prints, as each phase ends:

  - feature extraction images/s (frozen phase, then the fine-tune activation cache),
  - fine-tuning images/s, next to a bare `model.fit` of the same model on random in-memory arrays of
    the same shape and batch (target: >= 0.95 of bare Keras),
  - compile time (JAX tracing + XLA compilation, summed over every compiled function),
  - the whole pipeline's wall time (target: under 5 minutes for 5,758 images, compilation included),
  - then images/s for training and inference on 1 GPU and on all visible GPUs, and the scaling ratio
    (`scaling`; `--scaling-only` runs just that, `--no-scaling` skips it).

Run it from the repository root, as one command (about 4-6 minutes on one H200; it prints as it goes,
so a run cut by a timeout still shows every phase it finished):

    KERAS_BACKEND=jax python bench/gpu_pipeline.py
    KERAS_BACKEND=jax python bench/gpu_pipeline.py --images 1000 --frozen-epochs 3 --finetune-epochs 2  # ~2 min check
    KERAS_BACKEND=jax python bench/gpu_pipeline.py --scaling-only      # 1 vs all GPUs only (a few minutes)
    # CPU smoke check of the scaling code, 2 virtual devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu KERAS_BACKEND=jax \
        python bench/gpu_pipeline.py --scaling-only --image-size 32 --batch-size 4 --scaling-steps 3

On a machine without Keras (the lent GPU box has JAX, h5py, OpenCV, Pillow, scikit-learn, matplotlib,
PyYAML and psutil, but no TensorFlow, no Keras and no internet), carry three wheels. Download them on a
machine with internet, into a folder git ignores (.whl/, for example), for the box's Python (3.12):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1 namex optree

then, on the GPU box, before the command:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    KERAS_BACKEND=jax python3 bench/gpu_pipeline.py

dvc and dvclive are not needed: the stage bodies are called directly (the stage scripts only add
dvclive logging and resume state). Results also go to $OUT/gpu_pipeline.json when OUT is set, else
to --work/gpu_pipeline.json. Reference points on one H200 (bare Keras/JAX): B3 training about 1,200
img/s, inference about 6,000 img/s, first-epoch compile about 140 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("KERAS_BACKEND", "jax")

RESULTS: dict = {}
T0 = time.perf_counter()


def report(key: str, value, text: str | None = None) -> None:
    """Print now (a run cut short keeps what it printed) and keep for the JSON file."""
    RESULTS[key] = value
    print(f"[{time.perf_counter() - T0:7.1f}s] {text or f'{key}: {value}'}", flush=True)


def save(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(RESULTS, indent=2, default=str))


def data_stages(args, work: Path):
    """Synthetic data, then ingest, preprocess, augment and split. No Keras yet: the data stages fork
    worker processes, which must happen before JAX starts its threads."""
    from glomeruli.data.augment import augment_store
    from glomeruli.data.ingest import IngestConfig, ingest_dataset
    from glomeruli.core.params import load_params
    from glomeruli.data.preprocess import preprocess_images
    from glomeruli.data.sample_data import generate_sample_dataset
    from glomeruli.data.split import split_records

    params = load_params(ROOT / "params.yaml")
    raw = work / f"raw-{args.images}"
    if not (raw / "public.csv").is_file():
        start = time.perf_counter()
        generate_sample_dataset(raw, args.images, seed=0, size_range=(250, 950), workers=0, progress=False)
        report("synthetic_data_s", round(time.perf_counter() - start, 1),
               f"generated {args.images} synthetic images in {time.perf_counter() - start:.1f}s (not part of the pipeline)")
    start = time.perf_counter()
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=params.ingest.labels_csv,
                          group_regex=params.ingest.group_regex, max_pixels=params.ingest.max_pixels,
                          max_unreadable_fraction=params.ingest.max_unreadable_fraction, workers=0)
    rows = ingest_dataset(raw, config).rows
    report("ingest_s", round(time.perf_counter() - start, 1), f"ingest: {len(rows)} images in {time.perf_counter() - start:.1f}s")
    t = time.perf_counter()
    pre, aug = work / "preprocessed.h5", work / "augmented.h5"
    preprocess_images(raw, rows, pre, size=args.image_size, fill=params.preprocess.fill,
                      max_pixels=params.ingest.max_pixels, workers=0)
    report("preprocess_s", round(time.perf_counter() - t, 1),
           f"preprocess: {len(rows) / (time.perf_counter() - t):.0f} img/s ({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    meta = augment_store(pre, aug, params.augment, seed=params.seed, workers=0)
    report("augment_s", round(time.perf_counter() - t, 1), f"augment: {len(meta)} records in {time.perf_counter() - t:.1f}s")
    split = split_records(meta, params.split, params.seed)
    split_path = work / "split.json"
    split_path.write_text(json.dumps(split.to_json()))
    report("data_stages_s", round(time.perf_counter() - start, 1),
           f"data stages: {time.perf_counter() - start:.1f}s; train {len(split.train)}, val {len(split.val)}, "
           f"test {len(split.test)} records")
    return params, aug, split, split_path


def scaling(args) -> None:
    """Images/s on 1 device and on every visible device, and the ratio (issue 13).

    Weak scaling, as data parallelism is used: every device gets `--batch-size` images per step (global
    batch = batch size x devices). Training: full-graph fine-tuning of the top `finetune.unfreeze_blocks`
    blocks through the package's own batches (glomeruli.model.batches.Batches, padded and split by
    glomeruli.model.distribute), timed over the second epoch (the first compiles). Inference: the package's
    predict_rows, timed over the second pass. Random pixels: throughput does not depend on content.
    """
    import jax
    import keras
    import numpy as np

    from glomeruli.model import distribute
    from glomeruli.model.inference import predict_rows
    from glomeruli.model.efficientnet import build_model, compile_model, freeze_base, unfreeze_top_blocks
    from glomeruli.core.params import load_params
    from glomeruli.model.batches import Batches

    params = load_params(ROOT / "params.yaml")
    size, n_all = args.image_size, len(jax.local_devices())
    pool = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3)).astype(np.float32)

    class Cycle:
        """`n` rows drawn from a small pool of images (memory stays one batch whatever the device count)."""

        def __init__(self, n: int):
            self.n = n

        def __len__(self) -> int:
            return self.n

        def read(self, indices: np.ndarray) -> np.ndarray:
            return pool[np.asarray(indices) % len(pool)]

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_s, self._start = [], 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_s.append(time.perf_counter() - self._start)

    report("scaling_devices", n_all, f"scaling: 1 and {n_all} {jax.default_backend()} device(s), "
           f"{args.batch_size} images per device per step, {args.scaling_steps} steps per epoch")
    for n in sorted({1, n_all}):
        engine = distribute.start(n)
        batch = args.batch_size * engine.n_devices
        images = batch * args.scaling_steps
        rows, labels = Cycle(images), (np.arange(images) % 2).astype(np.float32)
        keras.utils.set_random_seed(0)
        model = build_model(size, "none", params.model.dropout)
        freeze_base(model)
        unfreeze_top_blocks(model, params.finetune.unfreeze_blocks)
        compile_model(model, params.finetune.lr)
        timer = EpochTimer()
        model.fit(Batches(rows, labels, batch, seed=0, engine=engine), epochs=2, shuffle=False, verbose=0, callbacks=[timer])
        train = images / timer.epoch_s[1]
        report(f"scaling_train_img_s_{n}", round(train, 1),
               f"  {n} device(s): training {train:.0f} img/s (global batch {batch}; first epoch with compile "
               f"{timer.epoch_s[0]:.1f}s)")
        predict_rows(model, rows, batch)  # compiles
        t = time.perf_counter()
        predict_rows(model, rows, batch)
        infer = images / (time.perf_counter() - t)
        report(f"scaling_predict_img_s_{n}", round(infer, 1), f"  {n} device(s): inference {infer:.0f} img/s")
        distribute.stop()
        del model
    if n_all > 1:
        for what in ("train", "predict"):
            ratio = RESULTS[f"scaling_{what}_img_s_{n_all}"] / RESULTS[f"scaling_{what}_img_s_1"]
            report(f"scaling_{what}_ratio", round(ratio, 2),
                   f"scaling, {what}: {n_all} devices / 1 device = {ratio:.2f}x ({ratio / n_all:.0%} of linear)")
    else:
        report("scaling_train_ratio", None, "scaling: one device visible, no ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5758, help="synthetic images (5,758 = the CMIL set)")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--frozen-epochs", type=int, default=None, help="default: params.yaml (15, early stopping)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: params.yaml (10, early stopping)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare model.fit comparison (saves its compile)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/glomeruli-gpu"))
    parser.add_argument("--scaling-steps", type=int, default=30, help="training steps per epoch in the 1-vs-all "
                        "devices comparison")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1-vs-all devices comparison")
    parser.add_argument("--scaling-only", action="store_true", help="only the 1-vs-all devices comparison")
    args = parser.parse_args()
    out_json = Path(os.environ["OUT"]) / "gpu_pipeline.json" if os.environ.get("OUT") else args.work / "gpu_pipeline.json"
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.update(images=args.images, image_size=args.image_size, batch_size=args.batch_size)
    if args.scaling_only:
        scaling(args)
        save(out_json)
        print(json.dumps(RESULTS, indent=2, default=str), flush=True)
        return

    pipeline_start = time.perf_counter()
    params, aug, split, split_path = data_stages(args, args.work)
    save(out_json)

    # ---- Keras from here on
    import jax
    import keras
    import numpy as np

    compile_s: dict = defaultdict(float)

    def on_duration(event: str, duration: float, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            compile_s[event.rsplit("/", 1)[-1]] += duration

    jax.monitoring.register_event_duration_secs_listener(on_duration)

    from glomeruli.model import training as tr
    from glomeruli.model.backend import configure
    from glomeruli.evaluation.evaluate import evaluate_model
    from glomeruli.data.h5store import ImageStore
    from glomeruli.model.metadata import DatasetLayout
    from glomeruli.model.efficientnet import build_model, compile_model, load_model, split_at_block

    policy = configure(params.seed, params.runtime.mixed_precision, params.runtime.deterministic)
    report("device", f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
           f"keras {keras.__version__} on {keras.backend.backend()}, {jax.devices()[0].device_kind}, policy {policy}")
    if keras.backend.backend() != "jax":
        print("warning: KERAS_BACKEND is not jax; the reference numbers are for JAX", flush=True)

    # Every predict_on_batch call, timestamped when its (numpy) output is ready, by model name.
    calls: dict[str, list] = defaultdict(list)
    original_predict = keras.Model.predict_on_batch

    def timed_predict(self, x):
        start = time.perf_counter()
        out = original_predict(self, x)
        calls[self.name].append((start, time.perf_counter(), len(x)))
        return out

    keras.Model.predict_on_batch = timed_predict

    def inference_report(name: str, what: str, images: int) -> None:
        """`images`: real rows run through the model (a short last batch is padded to the batch size)."""
        done = calls.get(name, [])
        if len(done) < 2:
            return
        first = done[0][1] - done[0][0]
        seconds = done[-1][1] - done[1][0]
        n = images - done[0][2]
        report(f"{what}_img_s", round(n / seconds, 1),
               f"{what}: {n / seconds:.0f} img/s after the first batch ({images} images in {len(done)} batches; "
               f"first batch, compilation included, {first:.1f}s)")
        RESULTS[f"{what}_first_batch_s"] = round(first, 1)

    class EpochTimer(keras.callbacks.Callback):
        """Whole epochs, validation included: JAX runs the steps asynchronously, the epoch end waits for them."""

        def __init__(self):
            super().__init__()
            self.epoch_s: list[float] = []
            self._start = None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_s.append(time.perf_counter() - self._start)

    frozen_p = replace(params.train_frozen, batch_size=args.batch_size,
                       epochs=args.frozen_epochs or params.train_frozen.epochs)
    fine_p = replace(params.finetune, batch_size=args.batch_size, epochs=args.finetune_epochs or params.finetune.epochs)
    with ImageStore(aug) as store:
        t = time.perf_counter()
        data = tr.load_phase_data(store, split, params.runtime.memory_budget_gb)
        report("load_images_s", round(time.perf_counter() - t, 1),
               f"train/val images into memory: {time.perf_counter() - t:.1f}s ({type(data.x_train).__name__})")

        # ---- train_frozen stage body
        t = time.perf_counter()
        model = build_model(store.image_size, "none", params.model.dropout)
        timer = EpochTimer()
        history = tr.train_frozen(model, data, frozen_p, params.runtime, seed=params.seed, callbacks=[timer])
        frozen_model = args.work / "frozen.keras"
        model.save(frozen_model)
        report("train_frozen_s", round(time.perf_counter() - t, 1),
               f"train_frozen: {time.perf_counter() - t:.1f}s, {len(history.epoch)} epochs of the head on cached "
               f"features (head epoch {min(timer.epoch_s):.2f}s)")
        n_train, n_val, n_test = len(data.x_train), len(data.x_val), len(split.test)
        inference_report("features", "feature_extraction", n_train + n_val)

        # ---- finetune stage body
        t = time.perf_counter()
        model = load_model(frozen_model)
        timer = EpochTimer()
        history = tr.finetune(model, data, fine_p, params.runtime, seed=params.seed, callbacks=[timer])
        model_path = args.work / "model.keras"
        model.save(model_path)
        steady = min(timer.epoch_s[1:] or timer.epoch_s)
        RESULTS["finetune_epochs_s"] = [round(s, 2) for s in timer.epoch_s]
        report("finetune_s", round(time.perf_counter() - t, 1),
               f"finetune: {time.perf_counter() - t:.1f}s, {len(history.epoch)} epochs of {n_train} train + {n_val} "
               f"val records; first epoch {timer.epoch_s[0]:.1f}s (compilation included)")
        report("finetune_img_s", round(n_train / steady, 1),
               f"fine-tuning: {n_train / steady:.0f} train img/s (top {fine_p.unfreeze_blocks} blocks on cached "
               "activations; best epoch after the first, its validation included; reference: bare full-B3 "
               "training ~1,200 img/s on an H200)")
        inference_report("bottom", "activation_cache", n_train + n_val)

        # ---- evaluate stage body (threshold on val, metrics on test)
        t = time.perf_counter()
        evaluate_model(model_path, aug, split_path, replace(params.evaluate, batch_size=args.batch_size),
                       max_pixels=params.ingest.max_pixels, metrics_path=args.work / "evaluate.json",
                       dataset_layout=DatasetLayout(params.ingest.class_dirs, params.ingest.labels_csv,
                                                    params.ingest.group_regex),
                       plots_dir=args.work / "plots", curves={})
        report("evaluate_s", round(time.perf_counter() - t, 1), f"evaluate: {time.perf_counter() - t:.1f}s")
        inference_report("glomeruli_b3", "evaluate_inference", n_val + n_test)

        pipeline_s = time.perf_counter() - pipeline_start - RESULTS.get("synthetic_data_s", 0)
        report("compile_s", round(sum(compile_s.values()), 1),
               f"compile time: {sum(compile_s.values()):.1f}s ({', '.join(f'{k} {v:.1f}s' for k, v in compile_s.items())})")
        report("pipeline_s", round(pipeline_s, 1),
               f"WHOLE PIPELINE: {pipeline_s:.1f}s for {args.images} images (target < 300 s, compilation included; "
               "synthetic data generation excluded)")
        save(out_json)

        # ---- bare Keras: the same top model, model.fit on random in-memory arrays of the same shape and batch
        if not args.no_bare:
            _, top = split_at_block(model, fine_p.unfreeze_blocks)
            shape = tuple(int(d) for d in top.inputs[0].shape[1:])
            rng = np.random.default_rng(0)
            x = rng.normal(size=(n_train, *shape)).astype(np.float32)
            y = (rng.random(n_train) < 0.3).astype(np.float32)
            xv = rng.normal(size=(n_val, *shape)).astype(np.float32)
            yv = (rng.random(n_val) < 0.3).astype(np.float32)
            compile_model(top, fine_p.lr)
            timer = EpochTimer()
            t = time.perf_counter()
            top.fit(x, y, batch_size=args.batch_size, epochs=3, validation_data=(xv, yv), verbose=0, callbacks=[timer])
            RESULTS["bare_fit_epochs_s"] = [round(s, 2) for s in timer.epoch_s]
            bare = n_train / min(timer.epoch_s[1:])
            report("bare_fit_img_s", round(bare, 1),
                   f"bare model.fit, same top model and shapes {shape}, batch {args.batch_size}: {bare:.0f} img/s "
                   f"({time.perf_counter() - t:.1f}s with its compile)")
            report("finetune_vs_bare", round(RESULTS["finetune_img_s"] / bare, 3),
                   f"fine-tuning / bare model.fit: {RESULTS['finetune_img_s'] / bare:.2f} (target >= 0.95)")
    save(out_json)
    if not args.no_scaling:
        scaling(args)
        save(out_json)
    print(json.dumps(RESULTS, indent=2, default=str), flush=True)
    if os.environ.get("GLOMERULI_GPU_KEEP") != "1":
        for name in ("preprocessed.h5", "augmented.h5"):
            (args.work / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
