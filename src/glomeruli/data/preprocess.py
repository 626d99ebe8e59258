"""Preprocess stage: decode every manifest image, fit it into S x S (aspect kept), normalise its stain (optional),
pad, store as uint8.

Each image goes through `images.load_model_input`, the function `glomeruli predict` calls too, so a model
sees the same pixels in training and in use."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from glomeruli.data.h5store import RecordMeta, StoreWriter
from glomeruli.data.images import load_model_input
from glomeruli.data.ingest import ManifestRow
from glomeruli.core.logs import progress
from glomeruli.core.parallel import ordered_map
from glomeruli.data.sources import image_max_bytes, read_bytes
from glomeruli.data.stain import NO_NORMALIZATION, StainNormalization

log = logging.getLogger(__name__)

_job: dict = {}


def _init(source: Path, size: int, fill: tuple[int, int, int], max_pixels: int, stain: StainNormalization) -> None:
    _job.update(source=source, size=size, fill=fill, max_pixels=max_pixels, stain=stain)


def _load(path: str) -> np.ndarray:
    data = read_bytes(_job["source"], path, image_max_bytes(_job["max_pixels"]))
    return load_model_input(data, path, _job["size"], _job["fill"], _job["max_pixels"], _job["stain"])


def manifest_meta(rows: list[ManifestRow]) -> RecordMeta:
    ids = np.array([r.id for r in rows], dtype=object)
    return RecordMeta(ids=ids, source_ids=ids.copy(), groups=np.array([r.group for r in rows], dtype=object),
                      labels=np.array([r.label for r in rows], dtype=np.int8),
                      is_augmented=np.zeros(len(rows), dtype=bool),
                      sites=np.array([r.site for r in rows], dtype=object))


def preprocess_images(source: Path, rows: list[ManifestRow], out_path: Path, *, size: int,
                      fill: tuple[int, int, int], max_pixels: int, workers: int,
                      stain: StainNormalization = NO_NORMALIZATION) -> None:
    """Stream every image of the manifest into an image store at `out_path`; the store's attributes record the
    stain normalisation and its reference (evaluate writes them into the model's metadata)."""
    log.info("preprocessing %d images from %s to %dx%d (stain normalisation: %s)", len(rows), source, size, size,
             stain.method)
    images = ordered_map(_load, [r.path for r in rows], workers,
                         initializer=_init, initargs=(source, size, fill, max_pixels, stain),
                         result_shape=(size, size, 3), result_dtype=np.uint8)
    attrs = {"stage": "preprocess", "image_size": size, "fill": list(fill), "source": str(source),
             "stain_normalization": json.dumps(stain.to_json(), sort_keys=True)}
    with StoreWriter(out_path, manifest_meta(rows), size, attrs) as writer:
        writer.append(progress(images, len(rows), "preprocess"))
