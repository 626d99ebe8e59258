"""Augment stage: originals plus K real (never identical) variants per image, K by class, seeded."""

import shutil

import h5py
import numpy as np

from glomeruli.data.augment import augment_image, augment_store
from glomeruli.data.h5store import ImageStore


def test_counts_flags_and_provenance(tiny_data):
    copies = tiny_data.params.augment.copies_per_class
    with ImageStore(tiny_data.preprocessed) as pre, ImageStore(tiny_data.augmented) as aug:
        originals, meta = pre.meta, aug.meta
        expected = sum(1 + copies[int(label)] for label in originals.labels)
        assert len(meta) == expected
        assert (~meta.is_augmented).sum() == len(originals)
        for i in np.flatnonzero(meta.is_augmented)[:20]:
            source = meta.source_ids[i]
            j = list(originals.ids).index(source)
            assert meta.labels[i] == originals.labels[j] and meta.groups[i] == originals.groups[j]
            assert meta.ids[i].startswith(source + "#aug")
            assert not np.array_equal(aug.read(np.array([i]))[0], pre.read(np.array([j]))[0])
        # originals are copied unchanged
        k = int(np.flatnonzero(~meta.is_augmented)[3])
        j = list(originals.ids).index(meta.ids[k])
        np.testing.assert_array_equal(aug.read(np.array([k]))[0], pre.read(np.array([j]))[0])


def test_deterministic_and_worker_independent(tiny_data, tmp_path):
    p = tiny_data.params
    augment_store(tiny_data.preprocessed, tmp_path / "w2.h5", p.augment, seed=p.seed, workers=2)
    assert (tmp_path / "w2.h5").read_bytes() == tiny_data.augmented.read_bytes()
    augment_store(tiny_data.preprocessed, tmp_path / "s.h5", p.augment, seed=p.seed + 1, workers=1)
    assert (tmp_path / "s.h5").read_bytes() != tiny_data.augmented.read_bytes()


def test_augment_image_keeps_shape_dtype_and_changes_pixels(tiny_data):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = augment_image(image, np.random.default_rng(1), tiny_data.params.augment, (0, 0, 0))
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)


def test_input_store_is_closed_after_a_one_worker_run(tiny_data, tmp_path):
    p = tiny_data.params
    source = tmp_path / "pre.h5"
    shutil.copy(tiny_data.preprocessed, source)
    augment_store(source, tmp_path / "aug.h5", p.augment, seed=p.seed, workers=1)
    with h5py.File(source, "w"):  # h5py refuses to truncate a file this process still holds open
        pass
