"""Model metadata: travels beside the model, refused when missing, incomplete or for another model file."""

import json

import pytest

from glomeruli.metadata import CLASS_NAMES, MetadataError, ModelMetadata, file_sha256, read_metadata, write_metadata


def _model_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"model bytes")
    return path


def _meta(path, **changes) -> ModelMetadata:
    values = dict(image_size=64, fill=(0, 0, 0), threshold=0.4, threshold_rule="max_f1", class_names=CLASS_NAMES,
                  model_sha256=file_sha256(path), max_pixels=10**6)
    return ModelMetadata(**{**values, **changes})


def test_round_trip(tmp_path):
    path = _model_file(tmp_path)
    write_metadata(path, _meta(path))
    assert (tmp_path / "model.meta.json").is_file()
    assert read_metadata(path) == _meta(path)


def test_missing_metadata_is_refused(tmp_path):
    with pytest.raises(MetadataError, match="dvc repro evaluate"):
        read_metadata(_model_file(tmp_path))


def test_metadata_of_another_model_is_refused(tmp_path):
    path = _model_file(tmp_path)
    write_metadata(path, _meta(path))
    path.write_bytes(b"retrained model bytes")
    with pytest.raises(MetadataError, match="checksum"):
        read_metadata(path)


@pytest.mark.parametrize("key, value", [("threshold", 1.5), ("class_names", ["a", "b"]), ("fill", [0, 0])])
def test_inconsistent_values_are_refused(tmp_path, key, value):
    path = _model_file(tmp_path)
    write_metadata(path, _meta(path))
    meta_path = tmp_path / "model.meta.json"
    raw = json.loads(meta_path.read_text())
    raw[key] = value
    meta_path.write_text(json.dumps(raw))
    with pytest.raises(MetadataError):
        read_metadata(path)


def test_incomplete_metadata_is_refused(tmp_path):
    path = _model_file(tmp_path)
    (tmp_path / "model.meta.json").write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(MetadataError, match="incomplete"):
        read_metadata(path)
