"""Augmentation: the augment stage (every original plus K seeded variants per image, K by class, offline) and
online augmentation for fine-tuning (fresh variants every epoch); both draw with `augment_image`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from glomeruli.h5store import ImageStore, RecordMeta, StoreWriter
from glomeruli.logs import progress
from glomeruli.parallel import ordered_map
from glomeruli.params import AugmentParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Record k of the augmented store is copy `copy[k]` of original `source_index[k]` (copy 0: the original).

    Two integer arrays, not an object per record: every worker gets a copy.
    """

    source_index: np.ndarray
    copy: np.ndarray

    def __len__(self) -> int:
        return len(self.source_index)


def augment_image(image: np.ndarray, rng: np.random.Generator, params: AugmentParams,
                  fill: tuple[int, int, int]) -> np.ndarray:
    """Random scale, shift, optional flip / 90-degree turn, and Gaussian noise; uint8 in, uint8 out."""
    size = image.shape[0]
    scale = rng.uniform(*params.scale)
    shift = rng.uniform(-params.translate, params.translate, size=2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), 0.0, scale)
    matrix[:, 2] += shift
    out = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(c) for c in fill))
    if params.flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if params.rotate90:
        out = np.rot90(out, k=int(rng.integers(4)))
    if params.noise_std > 0:
        noisy = out.astype(np.float32) + rng.normal(0.0, params.noise_std, out.shape).astype(np.float32)
        out = np.clip(np.rint(noisy), 0, 255)
    return np.ascontiguousarray(out, dtype=np.uint8)


# A fifth entropy word keeps online draws apart from the stage's (seed, image, copy) streams.
ONLINE_STREAM = 1


@dataclass(frozen=True)
class OnlineAugment:
    """Fine-tuning's fresh variants: record r of epoch e is augment_image(image, rng(seed, e, r)), the same
    transforms as the augment stage, so a batch depends only on (seed, epoch, record): reruns and resumed
    runs see the same images whatever the thread that drew them."""

    params: AugmentParams
    fill: tuple[int, int, int]
    seed: int

    def rng(self, epoch: int, record: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, int(record), ONLINE_STREAM, 0])

    def images(self, images: np.ndarray, records: np.ndarray, epoch: int) -> np.ndarray:
        """uint8 (n, S, S, 3) in, the same shape and dtype out."""
        return np.stack([augment_image(image, self.rng(epoch, record), self.params, self.fill)
                         for image, record in zip(images, records)]) if len(images) else images


def plan_variants(labels: np.ndarray, copies_per_class: dict[int, int]) -> Plan:
    """Each original followed by its copies, in input order."""
    per_record = np.array([1 + copies_per_class[int(label)] for label in labels], dtype=np.int64)
    source_index = np.repeat(np.arange(len(labels), dtype=np.int64), per_record)
    starts = np.repeat(np.cumsum(per_record) - per_record, per_record)
    return Plan(source_index, np.arange(len(source_index), dtype=np.int64) - starts)


_job: dict = {}


def _init(store_path: Path, plan: Plan, params: AugmentParams, fill: tuple[int, int, int], seed: int) -> None:
    _job.update(store=None, store_path=store_path, plan=plan, params=params, fill=fill, seed=seed)


def _render(record: int) -> np.ndarray:
    if _job["store"] is None:  # opened in the worker: an h5py handle cannot be sent to another process
        _job["store"] = ImageStore(_job["store_path"])
    source, copy = int(_job["plan"].source_index[record]), int(_job["plan"].copy[record])
    image = _job["store"].read(np.array([source]))[0]
    if copy == 0:
        return image
    # A seed per (image, copy) keeps records identical whatever the worker count or order.
    rng = np.random.default_rng([_job["seed"], source, copy])
    return augment_image(image, rng, _job["params"], _job["fill"])


def augment_store(in_path: Path, out_path: Path, params: AugmentParams, *, seed: int, workers: int) -> RecordMeta:
    """Write originals and their variants, each original followed by its copies."""
    with ImageStore(in_path) as store:
        meta, size, fill = store.meta, store.image_size, tuple(int(c) for c in store.attrs["fill"])
        attrs = {k: v for k, v in store.attrs.items() if k != "stage"}
    plan = plan_variants(meta.labels, params.copies_per_class)
    src = plan.source_index
    out_meta = RecordMeta(
        ids=np.array([meta.ids[i] + (f"#aug{c}" if c else "") for i, c in zip(src.tolist(), plan.copy.tolist())],
                     dtype=object),
        source_ids=meta.ids[src], groups=meta.groups[src], labels=meta.labels[src].astype(np.int8),
        is_augmented=plan.copy > 0)
    log.info("augmenting %d originals into %d records (copies per class: %s)",
             len(meta), len(plan), params.copies_per_class)
    images = ordered_map(_render, range(len(plan)), workers, initializer=_init,
                         initargs=(in_path, plan, params, fill, seed), result_shape=(size, size, 3),
                         result_dtype=np.uint8)
    try:
        with StoreWriter(out_path, out_meta, size, {**attrs, "stage": "augment", "seed": seed}) as writer:
            writer.append(progress(images, len(plan), "augment"))
    finally:
        # One worker renders in this process: close its handle on the input, which would otherwise stay
        # open after the stage (and stop this process from rewriting that file).
        if _job.get("store") is not None:
            _job["store"].close()
            _job["store"] = None
    return out_meta
