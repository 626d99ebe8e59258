"""Workloads that bench/run.py times in their own processes (not a public entry point).

    python bench/_workloads.py bare-read-resize --manifest M --source S --size 300 --workers 0 --out r.json
    python bench/_workloads.py training --raw DIR --size 128 --work DIR --out r.json [--quick]
    python bench/_workloads.py predict --images DIR --size 300 --work DIR --out r.json

Each writes one JSON object of measurements to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (src/ on sys.path, TensorFlow's start-up lines lowered)


# ------------------------------------------------------------------------- bare OpenCV read + resize

_bare: dict = {}


def _bare_init(size: int) -> None:
    _bare["size"] = size


def _bare_one(path: str) -> None:
    """The floor the preprocess stage is compared with: OpenCV reads and resizes, nothing else."""
    import cv2

    size = _bare["size"]
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    height, width = image.shape[:2]
    longer = max(height, width)
    cv2.resize(image, (max(1, width * size // longer), max(1, height * size // longer)),
               interpolation=cv2.INTER_AREA if size < longer else cv2.INTER_CUBIC)


def bare_read_resize(args) -> dict:
    import multiprocessing as mp

    from glomeruli.core.parallel import resolve_workers

    with open(args.manifest, encoding="utf-8", newline="") as f:
        paths = [str(Path(args.source) / row["path"]) for row in csv.DictReader(f)]
    workers = resolve_workers(args.workers)
    start = time.perf_counter()
    if workers == 1:
        _bare_init(args.size)
        for path in paths:
            _bare_one(path)
    else:
        with mp.get_context("fork").Pool(workers, initializer=_bare_init, initargs=(args.size,)) as pool:
            for _ in pool.imap_unordered(_bare_one, paths, chunksize=16):
                pass
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds, "workers": workers}


# ------------------------------------------------------------------------- training

class EpochTimer:
    """Wall time of each epoch's training part (validation excluded) and of whole epochs."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.train_s: list[float] = []
                self.epoch_s: list[float] = []
                self._start = self._train_end = None

            def on_epoch_begin(self, epoch, logs=None):
                self._start, self._train_end = time.perf_counter(), None

            def on_test_begin(self, logs=None):
                if self._start is not None and self._train_end is None:
                    self._train_end = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                now = time.perf_counter()
                self.train_s.append((self._train_end or now) - self._start)
                self.epoch_s.append(now - self._start)
                self._start = None

        return _Timer()


def _steady(values: list[float]) -> float:
    """Median of every epoch after the first (the first one traces and compiles)."""
    import statistics

    rest = values[1:] or values
    return statistics.median(rest)


def _build_store(raw: Path, work: Path, size: int, seed: int):
    from glomeruli.data.augment import augment_store
    from glomeruli.data.ingest import IngestConfig, ingest_dataset
    from glomeruli.core.params import load_params
    from glomeruli.data.preprocess import preprocess_images
    from glomeruli.data.split import split_records

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=params.ingest.labels_csv,
                          group_regex=params.ingest.group_regex, max_pixels=params.ingest.max_pixels,
                          max_unreadable_fraction=params.ingest.max_unreadable_fraction, workers=0)
    rows = ingest_dataset(raw, config).rows
    work.mkdir(parents=True, exist_ok=True)
    pre, aug = work / "preprocessed.h5", work / "augmented.h5"
    preprocess_images(raw, rows, pre, size=size, fill=params.preprocess.fill,
                      max_pixels=params.ingest.max_pixels, workers=0)
    meta = augment_store(pre, aug, params.augment, seed=seed, workers=0)
    return params, aug, split_records(meta, params.split, seed)


def training(args) -> dict:
    import keras
    import numpy as np

    from glomeruli.model.backend import configure
    from glomeruli.data.h5store import ImageStore
    from glomeruli.model.efficientnet import build_model, split_at_block, unfreeze_top_blocks, freeze_base, head_of
    from glomeruli.model import training as tr
    from glomeruli.model.inference import ArrayRows

    seed, size = 0, args.size
    params, aug, split = _build_store(Path(args.raw), Path(args.work), size, seed)
    configure(seed, "float32", "auto")
    out: dict = {"image_size": size, "backend": keras.backend.backend()}
    frozen_p = replace(params.train_frozen, epochs=5, patience=100, batch_size=args.batch_size)
    fine_p = replace(params.finetune, epochs=args.finetune_epochs, patience=100, batch_size=args.batch_size)
    runtime = params.runtime
    with ImageStore(aug) as store:
        data = tr.load_phase_data(store, split, runtime.memory_budget_gb)
        out.update(train_records=len(data.x_train), val_records=len(data.x_val), batch_size=args.batch_size)

        # 1. Frozen phase, 5 epochs: cached features versus the whole graph every step.
        for cache in (True, False):
            keras.utils.set_random_seed(seed)
            model = build_model(size, "none", params.model.dropout)
            start = time.perf_counter()
            tr.train_frozen(model, data, frozen_p, replace(runtime, cache_features=cache), seed=seed, callbacks=[])
            out[f"frozen_5_epochs_s_{'cached' if cache else 'uncached'}"] = time.perf_counter() - start
            print(f"frozen cached={cache}: {out[f'frozen_5_epochs_s_' + ('cached' if cache else 'uncached')]:.1f}s",
                  flush=True)
        frozen_path = Path(args.work) / "frozen.keras"
        model.save(frozen_path)

        # 2. Fine-tune at the default number of unfrozen blocks: epoch time, cached versus uncached.
        from glomeruli.model.efficientnet import load_model

        for cache in (True, False):
            keras.utils.set_random_seed(seed)
            model = load_model(frozen_path)
            timer = EpochTimer()
            start = time.perf_counter()
            tr.finetune(model, data, fine_p, replace(runtime, cache_features=cache), seed=seed, callbacks=[timer])
            key = "cached" if cache else "uncached"
            out[f"finetune_phase_s_{key}"] = time.perf_counter() - start
            out[f"finetune_epoch_s_{key}"] = _steady(timer.epoch_s)
            out[f"finetune_epochs_{key}"] = timer.epoch_s
            print(f"finetune cached={cache}: epochs {[round(s, 2) for s in timer.epoch_s]}", flush=True)
        out["unfreeze_blocks"] = fine_p.unfreeze_blocks

        # 3. Training-stage images/s versus a bare model.fit on random in-memory arrays, same model,
        #    shapes, batch and steps. The model is what the fine-tune stage trains by default: the
        #    top blocks on cached activations.
        model = load_model(frozen_path)
        unfreeze_top_blocks(model, fine_p.unfreeze_blocks)
        bottom, top = split_at_block(model, fine_p.unfreeze_blocks)
        shape = tuple(int(d) for d in bottom.output.shape[1:])
        n = args.fit_records
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, *shape)).astype(np.float32)
        y = (rng.random(n) < 0.3).astype(np.float32)
        xv = rng.normal(size=(args.batch_size * 2, *shape)).astype(np.float32)
        yv = (rng.random(len(xv)) < 0.3).astype(np.float32)
        out["fit_records"], out["fit_input_shape"] = n, list(shape)
        out.update(_compare_fit(top, x, y, xv, yv, fine_p, seed, "finetune_top", args.fit_repeats))

        # The frozen-phase head on cached features (tiny model: per-step overhead shows most here).
        freeze_base(model)
        feat = rng.normal(size=(n, int(model.get_layer("avg_pool").output.shape[-1]))).astype(np.float32)
        featv = rng.normal(size=(args.batch_size * 2, feat.shape[1])).astype(np.float32)
        out.update(_compare_fit(head_of(model), feat, y, featv, yv, frozen_p, seed, "frozen_head", args.fit_repeats))
    return out


def _compare_fit(model, x, y, xv, yv, params, seed, name, repeats) -> dict:
    """Our fit loop (glomeruli.model.training.fit: Batches PyDataset, shuffling, weights, validation, early
    stopping) versus keras `model.fit(x, y, batch_size, validation_data)` on the same arrays. Whole epochs
    (training and validation) are timed: on JAX the steps run asynchronously and only the epoch end waits."""
    from glomeruli.model import training as tr
    from glomeruli.model.inference import ArrayRows
    from glomeruli.model.efficientnet import compile_model

    epochs = 4
    params = replace(params, epochs=epochs, patience=100)
    ours, bare = [], []
    for _ in range(repeats):
        compile_model(model, params.lr)
        timer = EpochTimer()
        model.fit(x, y, batch_size=params.batch_size, epochs=epochs, validation_data=(xv, yv), verbose=0,
                  callbacks=[timer])
        bare += timer.epoch_s[1:]
        timer = EpochTimer()
        tr.fit(model, tr.PhaseData(ArrayRows(x), y, ArrayRows(xv), yv), params, seed=seed, callbacks=[timer])
        ours += timer.epoch_s[1:]
    ours_s, bare_s = min(ours), min(bare)  # best epoch of each: other processes on the machine only slow epochs down
    n = len(x)
    print(f"{name}: ours {n / ours_s:.1f} img/s, bare fit {n / bare_s:.1f} img/s", flush=True)
    return {f"{name}_ours_img_s": n / ours_s, f"{name}_bare_img_s": n / bare_s,
            f"{name}_ours_epochs_s": ours, f"{name}_bare_epochs_s": bare}


# ------------------------------------------------------------------------- prediction

def predict(args) -> dict:
    import numpy as np

    from glomeruli.commands import predict as pr
    from glomeruli.data.images import load_model_input
    from glomeruli.model.metadata import CLASS_NAMES, ModelMetadata, file_sha256, write_metadata

    work, images = Path(args.work), Path(args.images)
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / "model.keras"
    files = pr.list_images(images)
    if not model_path.is_file():
        # A child process builds the model, so this one forks its decoders before any backend thread starts.
        import subprocess

        subprocess.run([sys.executable, __file__, "_save-model", "--size", str(args.size), "--model", str(model_path)],
                       check=True)
        write_metadata(model_path, ModelMetadata(image_size=args.size, fill=(0, 0, 0), threshold=0.5,
                                                 threshold_rule="fixed", class_names=CLASS_NAMES,
                                                 model_sha256=file_sha256(model_path), max_pixels=40_000_000))
    # Images/s after the first batch (which traces the model), for ours and for the bare forward pass:
    # each predict_on_batch call is timestamped when its output is ready. Passes alternate, and the
    # best of each is kept, so load from other processes on the machine hurts both alike.
    load_s: list[float] = []
    calls: list[tuple[float, int]] = []
    real_load = pr.load_model

    def timestamped(model):
        forward = model.predict_on_batch

        def timed(x):
            out = np.asarray(forward(x))
            calls.append((time.perf_counter(), len(x)))
            return out

        model.predict_on_batch = timed
        return model

    def timed_load(path):
        start = time.perf_counter()
        model = real_load(path)
        load_s.append(time.perf_counter() - start)
        return timestamped(model)

    def steady() -> float:
        (t0, _), rest = calls[0], calls[1:]
        return sum(n for _, n in rest) / (rest[-1][0] - t0)

    pr.load_model = timed_load
    x = np.stack([load_model_input(p.read_bytes(), p.name, args.size, (0, 0, 0), 40_000_000) for p in files])
    result: dict = {"ours_img_s": [], "bare_img_s": [], "ours_total_img_s": [], "bare_total_img_s": []}
    for _ in range(args.repeats):
        calls.clear()
        start = time.perf_counter()
        predictions, skipped = pr.predict_folder(model_path, images, batch_size=args.batch_size, workers=args.workers)
        result["ours_total_img_s"].append(len(files) / (time.perf_counter() - start - load_s[-1]))
        result["ours_img_s"].append(steady())
        assert len(predictions) == len(files) and not skipped
        # Bare forward pass: the same model file and batches, inputs decoded beforehand (not timed). The
        # model is loaded afresh for every pass, as predict_folder loads it, so both sides start equally cold.
        bare_model = timestamped(real_load(model_path))
        calls.clear()
        start = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            bare_model.predict_on_batch(x[i:i + args.batch_size].astype(np.float32))
        result["bare_total_img_s"].append(len(files) / (time.perf_counter() - start))
        result["bare_img_s"].append(steady())
        print({k: round(v[-1], 2) for k, v in result.items()}, flush=True)
    return {"images": len(files), "batch_size": args.batch_size, "image_size": args.size,
            "model_load_s": load_s[0], "repeats": args.repeats, **result}


def _save_model(args) -> dict:
    from glomeruli.model.efficientnet import build_model

    build_model(args.size, "none", 0.3).save(args.model)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["bare-read-resize", "training", "predict", "_save-model"])
    parser.add_argument("--manifest")
    parser.add_argument("--source")
    parser.add_argument("--raw")
    parser.add_argument("--images")
    parser.add_argument("--work")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--fit-records", type=int, default=1024)
    parser.add_argument("--fit-repeats", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    fn = {"bare-read-resize": bare_read_resize, "training": training, "predict": predict,
          "_save-model": _save_model}[args.workload]
    result = fn(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
