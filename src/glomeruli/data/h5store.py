"""The image store: one HDF5 layout (and one reader) for preprocessed and augmented images.

Datasets: images (N, S, S, 3) uint8, labels int8, ids / source_ids / groups (biopsy) / sites UTF-8 strings,
is_augmented bool; file attributes record how the images were made (stage, image size, fill, the stain
normalisation and its reference). Written with fixed chunk shapes, no timestamps (`track_times=False`) and
the HDF5 1.10 format, so identical inputs give byte-identical files: DVC compares hashes, and an unchanged
store lets it skip every stage downstream. Augment, split, training and evaluation read stores through
`ImageStore`, which serves images by index without loading the whole file.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from glomeruli.data.layout import SINGLE_SITE  # noqa: F401 (the store's own name for it, as evaluation and crossval import it)

_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class RecordMeta:
    """Everything about the records except the pixels (small enough to hold in memory)."""

    ids: np.ndarray
    source_ids: np.ndarray
    groups: np.ndarray  # biopsy
    labels: np.ndarray
    is_augmented: np.ndarray
    sites: np.ndarray | None = None  # hospital / scanner / series; None: every record at SINGLE_SITE

    def __post_init__(self) -> None:
        if self.sites is None:
            object.__setattr__(self, "sites", np.full(len(self.ids), SINGLE_SITE, dtype=object))

    def __len__(self) -> int:
        return len(self.ids)


def _create_file(path: Path) -> h5py.File:
    """A new HDF5 file in the 1.10 format, with no timestamps anywhere (identical inputs, identical bytes).

    In that format a chunked dataset of fixed size is indexed by a fixed array instead of a B-tree, so a
    reader's memory stays flat however many images (chunks) it reads.
    """
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)  # the root group's; datasets get track_times=False
    return h5py.File(h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl))


class StoreWriter:
    """Fill a store of known size image by image (memory stays one image)."""

    def __init__(self, path: Path, meta: RecordMeta, image_size: int, attrs: dict):
        self._file = _create_file(path)
        n = len(meta)
        for name, data, dtype in (("ids", meta.ids, _STR), ("source_ids", meta.source_ids, _STR),
                                  ("groups", meta.groups, _STR), ("sites", meta.sites, _STR),
                                  ("labels", meta.labels, "i1"),
                                  ("is_augmented", meta.is_augmented, "?")):
            self._file.create_dataset(name, data=np.asarray(data, dtype=object if dtype is _STR else dtype),
                                      dtype=dtype, track_times=False)
        self._images = self._file.create_dataset(
            "images", shape=(n, image_size, image_size, 3), dtype="u1",
            chunks=(1, image_size, image_size, 3), track_times=False)
        for key, value in attrs.items():
            self._file.attrs[key] = value
        self._cursor = 0

    def append(self, images) -> None:
        """Write the next images: any iterable of (S, S, 3) uint8 arrays, or an (n, S, S, 3) array."""
        shape = self._images.shape
        for image in images:
            if self._cursor == shape[0]:
                raise ValueError(f"store holds {shape[0]} images; got more")
            if image.shape != shape[1:] or image.dtype != np.uint8:
                raise ValueError(f"image of shape {image.shape} {image.dtype}, the store takes {shape[1:]} uint8")
            # One image is one uncompressed chunk, so its bytes are the chunk's bytes: written directly,
            # without HDF5's selection and chunk-cache machinery (half the writer's CPU time).
            self._images.id.write_direct_chunk((self._cursor, 0, 0, 0), np.ascontiguousarray(image))
            self._cursor += 1

    def close(self) -> None:
        expected = self._images.shape[0]
        close_h5(self._file)
        if self._cursor != expected:
            raise RuntimeError(f"store incomplete: {self._cursor} of {expected} images written")

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):  # the error that got us here is the one to report
                close_h5(self._file)


def close_h5(file: h5py.File) -> None:
    """Close a file being written, also when the disk is full.

    Flush first: that is where a full disk shows (as OSError or RuntimeError). HDF5 cannot let go of a
    file it failed to flush: it retries on close and at interpreter exit, where it segfaults. So on a
    failed flush, point the file's descriptor at /dev/null before closing it; the caller deletes the
    partial file (atomic_path does) and the error propagates.
    """
    try:
        file.flush()
    except BaseException:
        with contextlib.suppress(Exception):
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, file.id.get_vfd_handle())
            finally:
                os.close(null)
        with contextlib.suppress(Exception):
            file.close()
        raise
    file.close()


def _strings(ds: h5py.Dataset) -> np.ndarray:
    return ds.asstr()[()].astype(object)


class ImageStore:
    """Read-only access: pixels read on demand in increasing index order; metadata loaded on first use."""

    _DATASETS = ("images", "ids", "source_ids", "groups", "labels", "is_augmented")

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
            missing = [name for name in self._DATASETS if name not in self._file]
            if missing:
                raise KeyError(f"no dataset {', '.join(missing)}")
            self.images = self._file["images"]
        except (OSError, KeyError) as err:
            raise ValueError(f"{self.path} is not an image store written by this pipeline ({err}); "
                             "rerun `dvc repro` to rebuild it") from err
        self.attrs = dict(self._file.attrs)
        self.image_size = int(self.images.shape[1])

    @functools.cached_property
    def meta(self) -> RecordMeta:
        # Lazy: a worker that only reads pixels must not hold arrays that grow with the records.
        f = self._file
        return RecordMeta(ids=_strings(f["ids"]), source_ids=_strings(f["source_ids"]),
                          groups=_strings(f["groups"]), labels=f["labels"][()].astype(np.int64),
                          is_augmented=f["is_augmented"][()].astype(bool),
                          sites=_strings(f["sites"]) if "sites" in f else None)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images at `indices` (any order) as uint8 (n, S, S, 3)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return np.empty((0, self.image_size, self.image_size, 3), np.uint8)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
        sorted_idx = indices[order]
        unique, inverse = np.unique(sorted_idx, return_inverse=True)
        out[order] = self.images[unique][inverse]
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
