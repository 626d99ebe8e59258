"""The image store: one layout, deterministic bytes, reads in any index order."""

import numpy as np
import pytest

from glomeruli.data.h5store import ImageStore, RecordMeta, StoreWriter


def _meta(n: int) -> RecordMeta:
    ids = np.array([f"img{i}.png" for i in range(n)], dtype=object)
    return RecordMeta(ids=ids, source_ids=ids.copy(), groups=np.array(["B1", "B2"] * (n // 2), dtype=object),
                      labels=np.array([0, 1] * (n // 2), dtype=np.int8), is_augmented=np.zeros(n, dtype=bool))


def _write(path, images):
    with StoreWriter(path, _meta(len(images)), images.shape[1], {"fill": [0, 0, 0]}) as writer:
        writer.append(images[:3])
        writer.append(images[3:])


def test_round_trip_and_identical_bytes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    _write(tmp_path / "a.h5", images)
    _write(tmp_path / "b.h5", images)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    with ImageStore(tmp_path / "a.h5") as store:
        assert store.image_size == 8 and len(store.meta) == 6
        assert list(store.meta.ids) == [f"img{i}.png" for i in range(6)]
        np.testing.assert_array_equal(store.read(np.array([4, 1, 4, 0])), images[[4, 1, 4, 0]])
        assert store.read(np.array([], dtype=int)).shape == (0, 8, 8, 3)
        assert store.attrs["fill"].tolist() == [0, 0, 0]


def test_incomplete_store_is_an_error(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(RuntimeError, match="incomplete"):
        with StoreWriter(tmp_path / "c.h5", _meta(4), 8, {}) as writer:
            writer.append(images[:2])


def test_foreign_file_is_refused_with_a_way_out(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="dvc repro"):
        ImageStore(tmp_path / "x.h5")


def test_append_takes_a_sequence_of_images_including_non_contiguous_views(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    flipped = [image[:, ::-1] for image in images]  # views: written by value, not by their strides
    with StoreWriter(tmp_path / "v.h5", _meta(4), 8, {}) as writer:
        writer.append(flipped)
    with ImageStore(tmp_path / "v.h5") as store:
        np.testing.assert_array_equal(store.read(np.arange(4)), np.stack(flipped))


def test_append_refuses_images_of_another_shape_or_type_and_extra_images(tmp_path):
    with StoreWriter(tmp_path / "w.h5", _meta(2), 8, {}) as writer:
        with pytest.raises(ValueError, match=r"shape \(8, 9, 3\)"):
            writer.append([np.zeros((8, 9, 3), np.uint8)])
        with pytest.raises(ValueError, match="float32"):
            writer.append([np.zeros((8, 8, 3), np.float32)])
        writer.append(np.zeros((2, 8, 8, 3), np.uint8))
        with pytest.raises(ValueError, match="holds 2 images"):
            writer.append(np.zeros((1, 8, 8, 3), np.uint8))
