"""Predict on a folder of images: same preprocessing as training, decoding overlapped with inference."""

from __future__ import annotations

import csv
import os
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glomeruli.atomic import atomic_path
from glomeruli.images import ImageError, load_model_input
from glomeruli.inference import predict_batch
from glomeruli.logs import progress
from glomeruli.metadata import ModelMetadata, read_metadata
from glomeruli.model import load_model
from glomeruli.parallel import WorkerDied, process_context, resolve_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    name: str
    label: int
    probability: float


@dataclass(frozen=True)
class Skip:
    name: str
    reason: str


def list_images(folder: Path) -> list[Path]:
    """Every non-hidden file directly in `folder`, sorted by name (decodability is checked later)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _init_decoder() -> None:
    # Below the model's priority: where the model runs on the CPU, decoding takes the moments it leaves
    # idle instead of stalling its threads (measured on 2 cores: 0.83 -> 0.90 of the bare forward pass).
    if hasattr(os, "nice"):  # not on Windows
        os.nice(10)


def _decode(args: tuple[Path, int, tuple[int, int, int], int]) -> np.ndarray | Skip:
    path, size, fill, max_pixels = args
    try:
        return load_model_input(path.read_bytes(), path.name, size, fill, max_pixels)
    except (ImageError, OSError) as err:
        return Skip(path.name, str(err))


def _decoded_batches(pool: ProcessPoolExecutor, files: list[Path], meta: ModelMetadata,
                     batch_size: int) -> Iterator[list]:
    """Batches of decoded images; the pool decodes batch i+1 while the caller runs the model on batch i.

    The first batches are submitted on the call, not on the first `next`: they decode while the caller
    loads the model.
    """
    jobs = [(p, meta.image_size, meta.fill, meta.max_pixels) for p in files]
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]

    def submit(batch: list) -> list[Future]:
        return [pool.submit(_decode, job) for job in batch]

    ahead = 2  # batches decoded ahead: low-priority decoders get slack to use the model's idle moments
    pending = deque(submit(batch) for batch in batches[:ahead])

    def ready_batches() -> Iterator[list]:
        for i in range(len(batches)):
            ready = [future.result() for future in pending.popleft()]
            if i + ahead < len(batches):
                pending.append(submit(batches[i + ahead]))
            yield ready

    return ready_batches()


def predict_folder(model_path: Path, folder: Path, *, batch_size: int = 32, workers: int = 0,
                   threshold: float | None = None) -> tuple[list[Prediction], list[Skip]]:
    """Predict every file of `folder`; unreadable files are skipped and returned by name."""
    meta = read_metadata(model_path)
    files = list_images(folder)
    try:
        with ProcessPoolExecutor(resolve_workers(workers), mp_context=process_context(["glomeruli.images"]),
                                 initializer=_init_decoder) as pool:
            decoded = _decoded_batches(pool, files, meta, batch_size)
            model = load_model(model_path)
            if tuple(model.inputs[0].shape[1:3]) != (meta.image_size, meta.image_size):
                raise ValueError(f"{model_path} takes {tuple(model.inputs[0].shape[1:3])} inputs but its metadata "
                                 f"says {meta.image_size}; rerun `dvc repro evaluate`")
            threshold = meta.threshold if threshold is None else threshold
            log.info("predicting %d files in %s with threshold %.4f", len(files), folder, threshold)
            predictions: list[Prediction] = []
            skipped: list[Skip] = []
            names = iter(files)
            n_batches = -(-len(files) // batch_size)
            for batch in progress(decoded, n_batches, "predict"):
                batch_names = [next(names).name for _ in batch]
                good = [(n, img) for n, img in zip(batch_names, batch) if not isinstance(img, Skip)]
                skipped += [img for img in batch if isinstance(img, Skip)]
                if good:
                    x = np.stack([img for _, img in good]).astype(np.float32)
                    probs = predict_batch(model, x, batch_size).reshape(-1)
                    predictions += [Prediction(n, int(p >= threshold), float(p)) for (n, _), p in zip(good, probs)]
    except BrokenProcessPool as err:
        raise WorkerDied(f"an image decoding process died ({err}): most often out of memory; use fewer "
                         "--workers") from err
    for skip in skipped:
        log.warning("skipped %s: %s", skip.name, skip.reason)
    return predictions, skipped


def write_predictions(path: Path, predictions: list[Prediction]) -> None:
    """`name,ground truth,probability`: scorable directly against the lab's public.csv."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:  # never half a file
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["name", "ground truth", "probability"])
        writer.writerows((p.name, p.label, f"{p.probability:.6f}") for p in predictions)
