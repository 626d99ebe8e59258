"""Preprocess stage: uint8 0-255 pixels (never divided by 255), exact size, deterministic bytes."""

import numpy as np

from glomeruli.h5store import ImageStore
from glomeruli.images import load_model_input
from glomeruli.ingest import IngestConfig, ingest_dataset
from glomeruli.preprocess import preprocess_images


def test_store_matches_the_shared_preprocessing_path(tiny_data):
    with ImageStore(tiny_data.preprocessed) as store:
        assert store.images.dtype == np.uint8 and store.images.shape[1:] == (32, 32, 3)
        images = store.read(np.arange(len(store.meta)))
        assert images.max() > 1, "pixels must stay in 0-255: the model normalises internally"
        first = store.meta.ids[0]
        expected = load_model_input((tiny_data.raw / first).read_bytes(), first, 32, (0, 0, 0), 10**8)
        np.testing.assert_array_equal(images[0], expected)
        assert not store.meta.is_augmented.any()
        assert set(store.meta.labels) == {0, 1}
        assert all(g.startswith("SYNTH-") for g in store.meta.groups)


def test_output_bytes_do_not_depend_on_worker_count(tiny_data, tmp_path):
    p = tiny_data.params
    config = IngestConfig(class_dirs=p.ingest.class_dirs, labels_csv=p.ingest.labels_csv,
                          group_regex=p.ingest.group_regex, max_pixels=p.ingest.max_pixels,
                          max_unreadable_fraction=1.0, workers=1)
    rows = ingest_dataset(tiny_data.raw, config).rows
    for workers in (1, 2):
        preprocess_images(tiny_data.raw, rows, tmp_path / f"w{workers}.h5", size=32, fill=(0, 0, 0),
                          max_pixels=10**8, workers=workers)
    assert (tmp_path / "w1.h5").read_bytes() == (tmp_path / "w2.h5").read_bytes()
    assert (tmp_path / "w1.h5").read_bytes() == tiny_data.preprocessed.read_bytes()
