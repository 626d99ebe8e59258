"""One labelling rule: predict scores a labelled folder only against labels ingest would keep, and gives none
that ingest refuses (`ingest.label_files`, called by both)."""

import shutil
import unicodedata

import pytest

from glomeruli.data.ingest import IngestConfig, ingest_dataset
from glomeruli.data.layout import CMIL_GROUP_REGEX
from glomeruli.model.metadata import DatasetLayout
from glomeruli.commands.predict import Prediction, folder_labels, image_name, list_images, score_predictions

from handmade import CLASS_DIRS, GS, NON_GS, labelled_folder

NFD_NAME = unicodedata.normalize("NFD", "café.png")  # as macOS stores it; the csv names it composed


@pytest.fixture()
def messy(tmp_path):
    """A labelled folder with every case the rule decides, inside a wrapper folder (as unzipping leaves it)."""
    root = tmp_path / "batch"
    data = root / "CMIL"
    labelled_folder(data, {
        f"{GS}/agrees.png": 10,            # csv 1: kept, 1
        f"{GS}/not_in_csv.png": 20,        # no csv row: kept with its folder's 1
        f"{GS}/{NFD_NAME}": 30,            # csv 1 (written NFC): kept, 1
        f"{GS}/in_both.png": 40,           # also in NON_GS: refused
        f"{NON_GS}/in_both.png": 50,
        f"{GS}/invalid.png": 60,           # csv label 2: refused
        f"{GS}/rows_disagree.png": 70,     # csv says 1 and 0: refused
        f"{NON_GS}/contradicted.png": 80,  # csv 1, folder 0: refused
        f"{NON_GS}/healthy.png": 100,      # csv 0: kept, 0
        "csv_only.png": 110,               # csv 0, no class folder: outside, refused
        "unsorted/u.png": 120,             # csv 1, not directly inside a class folder: refused
    }, "name,ground truth\n"
       "agrees.png,1\ncafé.png,1\ninvalid.png,2\nrows_disagree.png,1\nrows_disagree.png,0\n"
       "contradicted.png,1\nhealthy.png,0\nhealthy_copy.png,0\ncsv_only.png,0\nu.png,1\n", size=8)
    shutil.copy(data / NON_GS / "healthy.png", data / NON_GS / "healthy_copy.png")  # ingest keeps one of the two
    (data / ".DS_Store").write_bytes(b"junk")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._agrees.png").write_bytes(b"\x00\x05\x16\x07")
    return root


def test_predict_scores_only_against_labels_ingest_keeps(messy):
    config = IngestConfig(class_dirs=CLASS_DIRS, labels_csv="public.csv", group_regex=CMIL_GROUP_REGEX,
                          max_pixels=10**6, max_unreadable_fraction=0.0, workers=1)
    result = ingest_dataset(messy, config)
    kept_by_ingest = {row.path: row.label for row in result.rows}
    assert kept_by_ingest == {f"{GS}/agrees.png": 1, f"{GS}/not_in_csv.png": 1, f"{GS}/{NFD_NAME}": 1,
                              f"{NON_GS}/healthy.png": 0}
    ingest_reason = {s["file"]: s["reason"] for s in result.report["skipped"]}
    assert ingest_reason[f"{NON_GS}/healthy_copy.png"] == f"duplicate of {NON_GS}/healthy.png"

    labels = folder_labels(messy, DatasetLayout(CLASS_DIRS, "public.csv", CMIL_GROUP_REGEX))
    assert labels.csv_name == "CMIL/public.csv" and labels.scorable
    names = [image_name(messy, path) for path in list_images(messy, recursive=True)]
    predicted = [name for name in names if name != labels.csv_name]
    labelled_by_predict = {name: labels.label_of(name) for name in predicted if labels.label_of(name) is not None}
    assert labelled_by_predict == {f"CMIL/{GS}/agrees.png": 1, f"CMIL/{GS}/not_in_csv.png": 1,
                                   f"CMIL/{GS}/{NFD_NAME}": 1, f"CMIL/{NON_GS}/healthy.png": 0,
                                   f"CMIL/{NON_GS}/healthy_copy.png": 0}

    for name, label in labelled_by_predict.items():  # a label ingest keeps, or that of the image it duplicates
        path = name.removeprefix("CMIL/")
        kept = ingest_reason[path].removeprefix("duplicate of ") if path in ingest_reason else path
        assert kept_by_ingest.get(kept) == label, name
    csv_path = str(messy / "CMIL" / "public.csv")  # predict names the labels file by its full path
    for name in set(predicted) - set(labelled_by_predict):  # refused by both, for the same reason
        reason = labels.why_unlabelled(name).replace(csv_path, "public.csv")
        assert reason == ingest_reason[name.removeprefix("CMIL/")], name

    score = score_predictions([Prediction(name, 1, 0.9 if i % 2 else 0.1) for i, name in enumerate(predicted)],
                              labels, threshold=0.5)
    assert score.report["n_scored"] == 5
    assert sorted(n["name"] for n in score.report["not_scored"]) == sorted(
        f"CMIL/{relpath}" for relpath in (f"{GS}/in_both.png",
                                          f"{NON_GS}/in_both.png", f"{GS}/invalid.png", f"{GS}/rows_disagree.png",
                                          f"{NON_GS}/contradicted.png", "csv_only.png", "unsorted/u.png"))


def test_a_folder_labelled_by_its_csv_alone_is_not_scored(tmp_path):
    """Ingest uses no image outside the class folders, whatever the csv says; predict scores none either."""
    labelled_folder(tmp_path, {"a.png": 10}, "name,ground truth\na.png,1\n", size=8)
    labels = folder_labels(tmp_path, DatasetLayout(CLASS_DIRS, "public.csv", CMIL_GROUP_REGEX))
    assert labels.csv_name == "public.csv" and not labels.scorable
    assert labels.label_of("a.png") is None
    assert labels.why_unlabelled("a.png").startswith("outside the class folders")
