"""Augmentation: the augment stage (every original plus K seeded variants per image, K by class, offline) and
online augmentation for fine-tuning (fresh variants every epoch); both draw with `augment_image`.

`augment_store` writes the augmented store, each copy marked (`is_augmented`, `source_ids`) so that split keeps
copies in train and validation and test hold originals only. `OnlineAugment` gives fine-tuning's per-epoch
variants with the same transforms, each drawn from (seed, epoch, record), so batches repeat exactly and a
resumed run sees the images an uninterrupted one would. Colour (stain jitter, brightness, contrast,
saturation, hue) comes from `stain.jitter_colour`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from glomeruli.data.h5store import ImageStore, RecordMeta, StoreWriter
from glomeruli.core.logs import progress
from glomeruli.core.parallel import ordered_map
from glomeruli.core.params import AugmentParams
from glomeruli.data.stain import jitter_colour, stored_normalization

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
    """Random scale, shift, optional flip / 90-degree turn, colour jitter and Gaussian noise; uint8 in, uint8 out.

    The colour draws come after the geometric and noise draws (stain.jitter_colour), so with every colour
    setting 0 a variant is exactly what it was before colour jitter existed. Colour is applied before the
    noise (sensor noise comes last) and leaves the padding at `fill`; the noise, as before, covers it too.
    """
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
    noise = rng.normal(0.0, params.noise_std, out.shape).astype(np.float32) if params.noise_std > 0 else None
    out = jitter_colour(out, rng, params, fill)
    if noise is not None:
        out = np.clip(np.rint(out.astype(np.float32) + noise), 0, 255)
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
        is_augmented=plan.copy > 0, sites=meta.sites[src])
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


EXAMPLE_VARIANTS = 4  # variants shown beside each original in the examples sheet
_CLASS_TITLES = ("non-globally sclerotic", "globally sclerotic")  # label 0, 1


def write_examples(store_path: Path, out_png: Path, params: AugmentParams, *, seed: int, per_class: int = 3) -> None:
    """A sheet of `per_class` originals of each class (evenly spread over the store, so not one biopsy) beside
    variants drawn as the stage draws them: variant c of image i is augment_image with the generator (seed, i, c),
    the stage's own record for every copy it keeps. What training sees, for a person to judge."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training boxes and CI; imported here so training does not load it
    import matplotlib.pyplot as plt

    with ImageStore(store_path) as store:
        labels, ids = store.meta.labels, store.meta.ids
        fill = tuple(int(c) for c in store.attrs["fill"])
        normalization = stored_normalization(store.attrs.get("stain_normalization")).method
        chosen = []
        for label in (0, 1):
            of_class = np.flatnonzero(labels == label)
            if len(of_class):
                chosen += of_class[np.unique(np.linspace(0, len(of_class) - 1, per_class).round().astype(int))].tolist()
        images = store.read(np.array(sorted(chosen), dtype=np.int64)) if chosen else np.zeros((0, 1, 1, 3), np.uint8)
    by_index = dict(zip(sorted(chosen), images))
    columns = 1 + EXAMPLE_VARIANTS
    fig, axes = plt.subplots(max(len(chosen), 1), columns, figsize=(1.9 * columns, 2.1 * max(len(chosen), 1)),
                             squeeze=False)
    for row, index in enumerate(chosen):
        original = by_index[index]
        variants = [augment_image(original, np.random.default_rng([seed, index, copy]), params, fill)
                    for copy in range(1, columns)]
        for column, image in enumerate([original, *variants]):
            ax = axes[row, column]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title("original" if column == 0 else f"variant {column}", fontsize=8)
        name = str(ids[index]).rsplit("/", 1)[-1]
        axes[row, 0].set_ylabel(f"{_CLASS_TITLES[int(labels[index])]}\n{name[:24]}", fontsize=7)
    if not chosen:
        axes[0, 0].set_axis_off()
    colour = ", ".join(f"{k} {getattr(params, k):g}" for k in ("hed_scale", "hed_shift", "brightness", "contrast",
                                                               "saturation", "hue"))
    fig.suptitle(f"Augmentation: originals and variants as training sees them (stain normalisation {normalization})\n"
                 f"scale {params.scale[0]:g}-{params.scale[1]:g}, translate {params.translate:g}, "
                 f"noise {params.noise_std:g}\n{colour}", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, metadata={"Software": None})
    plt.close(fig)
