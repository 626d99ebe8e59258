"""Model metadata: travels beside the model, refused when missing, incomplete or for another model file."""

import json

import pytest

from glomeruli.model.metadata import DatasetLayout, MetadataError, read_metadata, write_metadata

from handmade import model_metadata, stand_in_model


def test_round_trip(tmp_path):
    path = stand_in_model(tmp_path / "model.keras")
    write_metadata(path, model_metadata(path))
    assert (tmp_path / "model.meta.json").is_file()
    assert read_metadata(path) == model_metadata(path)


def test_missing_metadata_is_refused(tmp_path):
    with pytest.raises(MetadataError, match="dvc repro evaluate"):
        read_metadata(stand_in_model(tmp_path / "model.keras"))


def test_metadata_of_another_model_is_refused(tmp_path):
    path = stand_in_model(tmp_path / "model.keras")
    write_metadata(path, model_metadata(path))
    path.write_bytes(b"retrained model bytes")
    with pytest.raises(MetadataError, match="checksum"):
        read_metadata(path)


@pytest.mark.parametrize("key, value", [("threshold", 1.5), ("class_names", ["a", "b"]), ("fill", [0, 0])])
def test_inconsistent_values_are_refused(tmp_path, key, value):
    path = stand_in_model(tmp_path / "model.keras")
    write_metadata(path, model_metadata(path))
    meta_path = tmp_path / "model.meta.json"
    raw = json.loads(meta_path.read_text())
    raw[key] = value
    meta_path.write_text(json.dumps(raw))
    with pytest.raises(MetadataError):
        read_metadata(path)


def test_incomplete_metadata_is_refused(tmp_path):
    path = stand_in_model(tmp_path / "model.keras")
    (tmp_path / "model.meta.json").write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(MetadataError, match="incomplete"):
        read_metadata(path)


def test_the_dataset_layout_travels_with_the_model(tmp_path):
    path = stand_in_model(tmp_path / "model.keras")
    layout = DatasetLayout(class_dirs={"sick": 1, "healthy": 0}, labels_csv="truth.csv",
                           group_regex=r"^(?P<group>\w+)-")
    write_metadata(path, model_metadata(path, dataset_layout=layout))
    raw = json.loads((tmp_path / "model.meta.json").read_text())
    assert raw["dataset_layout"] == {"class_dirs": {"sick": 1, "healthy": 0}, "labels_csv": "truth.csv",
                                     "group_regex": r"^(?P<group>\w+)-"}
    assert read_metadata(path).dataset_layout == layout


def test_metadata_written_before_the_layout_travelled_reads_as_unrecorded(tmp_path):
    path = stand_in_model(tmp_path / "model.keras")
    write_metadata(path, model_metadata(path))
    meta_path = tmp_path / "model.meta.json"
    raw = json.loads(meta_path.read_text())
    del raw["dataset_layout"]
    meta_path.write_text(json.dumps(raw))
    assert read_metadata(path).dataset_layout is None  # predict then names the file and the layout it assumes


@pytest.mark.parametrize("layout", [{"class_dirs": {"a": 1, "b": 1}, "labels_csv": None, "group_regex": "(?P<group>x)"},
                                    {"class_dirs": {"a": 1, "b": 0}, "labels_csv": 3, "group_regex": "(?P<group>x)"},
                                    {"class_dirs": ["a", "b"], "labels_csv": None, "group_regex": "(?P<group>x)"},
                                    {"class_dirs": {"a": 1, "b": 0}, "labels_csv": None}])
def test_a_malformed_dataset_layout_is_refused(tmp_path, layout):
    path = stand_in_model(tmp_path / "model.keras")
    write_metadata(path, model_metadata(path))
    meta_path = tmp_path / "model.meta.json"
    raw = json.loads(meta_path.read_text())
    raw["dataset_layout"] = layout
    meta_path.write_text(json.dumps(raw))
    with pytest.raises(MetadataError, match="malformed"):
        read_metadata(path)
