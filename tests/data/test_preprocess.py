"""Preprocess stage: uint8 0-255 pixels (never divided by 255), exact size, deterministic bytes."""

import numpy as np

from badfiles import CLASS_DIRS, GROUP_REGEX, NEGATIVE, POSITIVE, cmil_name, random_rgb, write_clean_dataset
from glomeruli.data.h5store import ImageStore
from glomeruli.data.ingest import IngestConfig, ingest_dataset, read_manifest, write_manifest
from glomeruli.data.preprocess import preprocess_images


def test_store_holds_each_image_padded_centred_in_0_255(tmp_path):
    """Images whose longer side is the target size are not resampled: every stored pixel is known by hand."""
    raw = tmp_path / "raw"
    write_clean_dataset(raw, per_class=2)  # positives 20 high x 26 wide, negatives 26 x 20, opaque RGBA
    config = IngestConfig(class_dirs=CLASS_DIRS, labels_csv="public.csv", group_regex=GROUP_REGEX, max_pixels=10**8,
                          max_unreadable_fraction=0.0, workers=1)
    rows = ingest_dataset(raw, config).rows
    fill = (5, 6, 7)
    preprocess_images(raw, rows, tmp_path / "pre.h5", size=26, fill=fill, max_pixels=10**8, workers=1)
    expected = {}
    for i in range(2):
        wide, tall = np.empty((26, 26, 3), np.uint8), np.empty((26, 26, 3), np.uint8)
        wide[:], tall[:] = fill, fill
        wide[3:23] = random_rgb(20, 26, seed=800 + i)  # 3 rows of fill above and below
        tall[:, 3:23] = random_rgb(26, 20, seed=900 + i)  # 3 columns left and right
        expected[f"{POSITIVE}/{cmil_name(f'P{i}', i + 1, 2, seed=800 + i)}"] = (wide, 1)
        expected[f"{NEGATIVE}/{cmil_name(f'N{i}', i + 1, 2, seed=900 + i)}"] = (tall, 0)
    with ImageStore(tmp_path / "pre.h5") as store:
        assert store.images.dtype == np.uint8 and sorted(store.meta.ids) == sorted(expected)
        images = store.read(np.arange(len(store.meta)))
        for record_id, image, label in zip(store.meta.ids, images, store.meta.labels):
            np.testing.assert_array_equal(image, expected[record_id][0], err_msg=record_id)
            assert label == expected[record_id][1]
        assert not store.meta.is_augmented.any()
        assert sorted(set(store.meta.groups)) == ["N0", "N1", "P0", "P1"]
        assert set(store.meta.sites) == {"all"}  # ingest.site_regex null: one site


def test_store_carries_each_image_site_from_the_manifest(tmp_path):
    """Sites read by ingest.site_regex travel through the manifest file into the store's `sites` dataset."""
    raw = tmp_path / "raw"
    write_clean_dataset(raw, per_class=2)  # names P0_PAS_1of2_..., P1_..., N0_..., N1_...
    config = IngestConfig(class_dirs=CLASS_DIRS, labels_csv=None, group_regex=GROUP_REGEX, max_pixels=10**8,
                          max_unreadable_fraction=0.0, workers=1, site_regex=r"^(?P<site>[PN])\d_PAS_")
    write_manifest(ingest_dataset(raw, config).rows, tmp_path / "manifest.csv")
    preprocess_images(raw, read_manifest(tmp_path / "manifest.csv"), tmp_path / "pre.h5", size=26, fill=(0, 0, 0),
                      max_pixels=10**8, workers=1)
    with ImageStore(tmp_path / "pre.h5") as store:
        assert dict(zip(store.meta.ids, store.meta.sites)) == {
            f"{POSITIVE}/{cmil_name('P0', 1, 2, seed=800)}": "P", f"{POSITIVE}/{cmil_name('P1', 2, 2, seed=801)}": "P",
            f"{NEGATIVE}/{cmil_name('N0', 1, 2, seed=900)}": "N", f"{NEGATIVE}/{cmil_name('N1', 2, 2, seed=901)}": "N"}


def test_the_tiny_store_is_uint8_0_255(tiny_data):
    with ImageStore(tiny_data.preprocessed) as store:
        assert store.images.dtype == np.uint8 and store.images.shape[1:] == (32, 32, 3)
        assert store.read(np.arange(len(store.meta))).max() > 1, "pixels must stay in 0-255: the model normalises"
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
