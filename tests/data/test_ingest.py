"""Ingest: every file ends up in the manifest or in the report with a reason; bad datasets are refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from badfiles import (CLASS_DIRS, GROUP_REGEX, KEPT, NEGATIVE, POSITIVE, add_macosx_members, add_members,
                      cmil_name, hostile_zip_members, labels_csv, rgba_png, write_clean_dataset,
                      write_messy_dataset, write_zip)
from glomeruli.data.ingest import (MANIFEST_COLUMNS, IngestConfig, IngestError, ManifestRow, check_ingest,
                              ingest_dataset, read_manifest, write_manifest)
from glomeruli.data.sources import RefusedFileError, close_sources

CONFIG = IngestConfig(class_dirs=CLASS_DIRS, labels_csv="public.csv", group_regex=GROUP_REGEX,
                      max_pixels=40_000_000, max_unreadable_fraction=0.02, workers=1)


@pytest.fixture(autouse=True)
def _close_zips():
    yield
    close_sources()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """The messy corpus, ingested once with one worker and once with two."""
    base = tmp_path_factory.mktemp("messy")
    expected = write_messy_dataset(base / "data", base / "elsewhere")
    serial = ingest_dataset(base / "data", CONFIG)
    parallel = ingest_dataset(base / "data", dataclasses.replace(CONFIG, workers=2))
    return expected, serial, parallel


def _skip_reasons(result) -> dict[str, str]:
    return {s["file"]: s["reason"] for s in result.report["skipped"]}


# ---------------------------------------------------------------------------------------- the messy corpus

def test_every_corpus_file_has_its_expected_outcome(messy):
    expected, result, _ = messy
    kept = {row.id for row in result.rows}
    reasons = _skip_reasons(result)
    for relpath, outcome in expected.items():
        if outcome == KEPT:
            assert relpath in kept, (relpath, reasons.get(relpath))
        else:
            assert relpath not in kept, relpath
            assert outcome in reasons[relpath], (relpath, reasons[relpath])
    assert kept | set(reasons) == set(expected)  # nothing unexpected, nothing lost


def test_each_file_is_reported_once(messy):
    _, result, _ = messy
    files = [s["file"] for s in result.report["skipped"]]
    assert len(files) == len(set(files))
    assert set(files).isdisjoint(row.id for row in result.rows)


def test_workers_do_not_change_the_output(messy):
    _, serial, parallel = messy
    assert serial.rows == parallel.rows
    assert json.dumps(serial.report) == json.dumps(parallel.report)


def test_report_counts_and_lists(messy):
    _, result, _ = messy
    report = result.report
    json.dumps(report)  # JSON-serialisable
    assert report["n_kept"] == len(result.rows)
    assert report["n_unreadable"] == 4  # text, zero bytes, truncated, bomb
    assert {u["file"].split("/")[1] for u in report["unreadable"]} == {
        "text_file.png", "zero_bytes.png", "truncated.png", "bomb_30000x30000.png"}
    assert report["counts"][POSITIVE]["kept"] + report["counts"][NEGATIVE]["kept"] == report["n_kept"]
    assert report["counts"][NEGATIVE] == {"label": 0, "found": 8, "kept": 6}  # 6 good, same_name, clash_neg
    assert report["config"] == {"class_dirs": CLASS_DIRS, "labels_csv": "public.csv", "group_regex": GROUP_REGEX,
                                "max_pixels": 40_000_000, "max_unreadable_fraction": 0.02, "site_regex": None}
    assert report["name_in_both_classes"] == [
        {"name": "same_name.png", "files": [f"{POSITIVE}/same_name.png", f"{NEGATIVE}/same_name.png"]}]
    by_kept = {d["kept"]: d for d in report["duplicates"]}
    assert by_kept[f"{POSITIVE}/a_original.png"]["files"] == [f"{POSITIVE}/a_original.png", f"{POSITIVE}/b_copy.png"]
    assert by_kept[None]["labels"] == [0, 1]
    assert report["outside_class_folders"] == [f"{POSITIVE}/nested/deeper.png", "notes/readme.txt"]
    assert report["warnings"] and "public.csv" in report["warnings"][0]  # configured, absent: a warning
    assert report["csv"] == {"file": "public.csv", "present": False}
    assert f"{POSITIVE}/{cmil_name('P0', 1, 6, seed=100)}" not in report["ungrouped"]
    assert f"{POSITIVE}/photo.jpg" in report["ungrouped"]
    # ingest.site_regex null: every kept image at the one site "all", none left out for its site
    assert report["n_sites"] == 1 and report["no_site"] == []
    assert report["sites"] == {"all": {"n": report["n_kept"], "by_label": {
        "0": report["counts"][NEGATIVE]["kept"], "1": report["counts"][POSITIVE]["kept"]}}}
    assert {row.site for row in result.rows} == {"all"}
    # no marker and no SYNTH- names: real data, as far as ingest can tell (the model card reads these)
    assert (report["synthetic"], report["synthetic_marker"], report["n_synthetic"]) == (False, False, 0)


def test_manifest_rows_carry_label_group_hash_and_size(messy):
    _, result, _ = messy
    rows = {row.id: row for row in result.rows}
    good = rows[f"{POSITIVE}/{cmil_name('P1', 2, 6, seed=101)}"]
    assert (good.label, good.group, good.width, good.height, good.channels) == (1, "P1", 30, 24, 4)
    assert good.path == good.id and good.name == cmil_name("P1", 2, 6, seed=101)
    assert len(good.sha256) == 64
    odd = rows[f"{POSITIVE}/glom 1 é.png"]
    assert odd.group == "glom 1 é.png"  # no biopsy id: its own group
    assert rows[f"{POSITIVE}/grey.png"].channels == 1
    assert [r.id for r in result.rows] == sorted(rows)


def test_too_many_unreadable_files_is_an_error_naming_the_limit(messy):
    _, result, _ = messy
    with pytest.raises(IngestError) as err:
        check_ingest(result, CONFIG)
    message = str(err.value)
    assert "ingest.max_unreadable_fraction = 0.02" in message
    assert f"4 of {result.report['n_kept'] + 4}" in message
    assert "truncated.png" in message and "%" in message
    check_ingest(result, dataclasses.replace(CONFIG, max_unreadable_fraction=0.5))


# ---------------------------------------------------------------------------------------- zips

def test_malicious_zip_ingests_without_writing_anything(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    files = write_clean_dataset(tmp_path / "data")
    archive = write_zip(tmp_path / "evil.zip", files, wrapper="CMIL")
    add_members(archive, {name: rgba_png(8, 8, seed=9) for name in hostile_zip_members()})
    add_macosx_members(archive, [f"CMIL/{r}" for r in files])
    before = sorted(tmp_path.rglob("*"))
    abs_existed = os.path.exists("/abs.png")

    result = ingest_dataset(archive, dataclasses.replace(CONFIG, workers=2))

    assert sorted(tmp_path.rglob("*")) == before
    assert os.path.exists("/abs.png") == abs_existed
    assert [row.id for row in result.rows] == sorted(files)
    reasons = _skip_reasons(result)
    for name, reason in hostile_zip_members().items():
        assert reason in reasons[name]
    check_ingest(result, CONFIG)


def test_zip_and_folder_give_the_same_manifest(tmp_path):
    files = write_clean_dataset(tmp_path / "data")
    files["public.csv"] = labels_csv([(r.split("/")[1], str(CLASS_DIRS[r.split("/")[0]])) for r in files])
    (tmp_path / "data" / "public.csv").write_bytes(files["public.csv"])
    archive = write_zip(tmp_path / "d.zip", files, wrapper="CMIL")
    from_folder = ingest_dataset(tmp_path / "data", CONFIG)
    from_zip = ingest_dataset(archive, CONFIG)
    assert from_folder.rows == from_zip.rows
    assert from_folder.report["skipped"] == from_zip.report["skipped"] == []
    assert from_zip.report["csv_missing_rows"] == [] and from_zip.report["csv_extra_rows"] == []


# ---------------------------------------------------------------------------------------- labels csv

def _with_csv(tmp_path, csv_bytes: bytes) -> tuple:
    root = tmp_path / "data"
    files = write_clean_dataset(root)
    (root / "public.csv").write_bytes(csv_bytes)
    names = {relpath.split("/")[1]: CLASS_DIRS[relpath.split("/")[0]] for relpath in files}
    return root, names


def test_csv_with_bom_and_crlf_is_accepted(tmp_path):
    root, names = _with_csv(tmp_path, b"")
    (root / "public.csv").write_bytes(labels_csv([(n, str(label)) for n, label in names.items()], bom=True, crlf=True))
    result = ingest_dataset(root, CONFIG)
    csv_report = result.report["csv"]
    assert csv_report["bom"] and csv_report["crlf"] and csv_report["n_rows"] == len(names)
    assert result.report["n_kept"] == len(names) and result.report["skipped"] == []


def test_csv_missing_extra_bad_label_and_conflict_rows(tmp_path):
    root = tmp_path / "data"
    files = write_clean_dataset(root)
    names = sorted(relpath.split("/")[1] for relpath in files)
    label_of = {relpath.split("/")[1]: CLASS_DIRS[relpath.split("/")[0]] for relpath in files}
    missing, bad, conflict = names[0], names[1], names[2]
    rows = [(n, str(label_of[n])) for n in names[3:]]
    rows += [(bad, "2"), (conflict, str(1 - label_of[conflict])), ("ghost.png", "1")]
    (root / "public.csv").write_bytes(labels_csv(rows))
    result = ingest_dataset(root, CONFIG)
    report, reasons = result.report, _skip_reasons(result)
    path_of = {relpath.split("/")[1]: relpath for relpath in files}
    assert report["csv_missing_rows"] == [path_of[missing]]
    assert path_of[missing] in {row.id for row in result.rows}  # kept with its folder label
    assert [r["name"] for r in report["csv_extra_rows"]] == ["ghost.png"]
    assert report["csv"]["bad_labels"] == [{"line": len(rows) - 1, "name": bad, "label": "2"}]
    assert "label '2' is not 0 or 1" in reasons[path_of[bad]]
    assert report["label_conflicts"] == [{"file": path_of[conflict], "folder_label": label_of[conflict],
                                          "csv_label": 1 - label_of[conflict]}]
    assert "label conflict" in reasons[path_of[conflict]]
    assert report["n_kept"] == len(files) - 2


def test_csv_wrong_header_is_an_error_naming_both_headers(tmp_path):
    root, names = _with_csv(tmp_path, labels_csv([], header="filename,label"))
    with pytest.raises(IngestError, match=r"public\.csv: header is 'filename,label', expected 'name,ground truth'"):
        ingest_dataset(root, CONFIG)


def test_csv_not_utf8_is_an_error(tmp_path):
    root, _ = _with_csv(tmp_path, "name,ground truth\nglom é.png,1\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"public\.csv: not UTF-8"):
        ingest_dataset(root, CONFIG)


def test_csv_names_match_across_unicode_normalisation(tmp_path):
    root = tmp_path / "data"
    write_clean_dataset(root)
    decomposed = "glom 1 e\u0301.png"  # how macOS stores 'é'
    (root / POSITIVE / decomposed).write_bytes(rgba_png(9, 9, seed=77))
    (root / "public.csv").write_bytes(labels_csv([("glom 1 \u00e9.png", "1")]))
    result = ingest_dataset(root, CONFIG)
    assert f"{POSITIVE}/{decomposed}" not in result.report["csv_missing_rows"]
    assert result.report["csv_extra_rows"] == []


def test_labels_csv_none_ignores_a_present_csv(tmp_path):
    root, _ = _with_csv(tmp_path, labels_csv([], header="anything"))
    result = ingest_dataset(root, dataclasses.replace(CONFIG, labels_csv=None))
    assert result.report["csv"] == {"file": None, "present": False}
    assert "outside the class folders" in _skip_reasons(result)["public.csv"]


# ---------------------------------------------------------------------------------------- checks

def test_empty_class_is_an_error_naming_folder_and_source(tmp_path):
    root = tmp_path / "data"
    write_clean_dataset(root)
    (root / NEGATIVE).rename(root / "Non_Globally_Sclerotic")
    result = ingest_dataset(root, CONFIG)
    with pytest.raises(IngestError, match=rf"class folder '{NEGATIVE}' \(label 0\) has no usable images in {root}") \
            as err:
        check_ingest(result, CONFIG)
    assert "Non_Globally_Sclerotic" in str(err.value)  # the folders found point at the fix


def test_bad_group_regex_is_refused(tmp_path):
    write_clean_dataset(tmp_path / "data")
    with pytest.raises(IngestError, match="named group"):
        ingest_dataset(tmp_path / "data", dataclasses.replace(CONFIG, group_regex="^(.+?)_PAS_"))


# ---------------------------------------------------------------------------------------- sites

SITE_REGEX = r"^(?P<site>H\d+)-"  # hospital H<k> before the biopsy id: H2-B04_PAS_1of2_...


def _write_site_dataset(root: Path) -> None:
    names = {f"{POSITIVE}/H1-B01_PAS_1of1_a.png": 1, f"{POSITIVE}/H2-B02_PAS_1of1_b.png": 2,
             f"{NEGATIVE}/H1-B03_PAS_1of1_c.png": 3, f"{NEGATIVE}/H2-B04_PAS_1of2_d.png": 4,
             f"{NEGATIVE}/H2-B04_PAS_2of2_e.png": 5, f"{NEGATIVE}/B05_PAS_1of1_f.png": 6,  # no hospital
             f"{NEGATIVE}/XH3-B06_PAS_1of1_g.png": 7}  # H3 not at the start: no site either
    for relpath, seed in names.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(rgba_png(8, 8, seed=seed))


def test_site_regex_gives_each_image_its_site_and_skips_names_without_one(tmp_path):
    _write_site_dataset(tmp_path / "data")
    config = dataclasses.replace(CONFIG, labels_csv=None, site_regex=SITE_REGEX)
    result = ingest_dataset(tmp_path / "data", config)
    assert {row.id: (row.site, row.group) for row in result.rows} == {
        f"{POSITIVE}/H1-B01_PAS_1of1_a.png": ("H1", "H1-B01"), f"{POSITIVE}/H2-B02_PAS_1of1_b.png": ("H2", "H2-B02"),
        f"{NEGATIVE}/H1-B03_PAS_1of1_c.png": ("H1", "H1-B03"), f"{NEGATIVE}/H2-B04_PAS_1of2_d.png": ("H2", "H2-B04"),
        f"{NEGATIVE}/H2-B04_PAS_2of2_e.png": ("H2", "H2-B04")}
    reasons = _skip_reasons(result)
    for relpath in (f"{NEGATIVE}/B05_PAS_1of1_f.png", f"{NEGATIVE}/XH3-B06_PAS_1of1_g.png"):
        assert reasons[relpath] == ("no site: the name does not match ingest.site_regex = '^(?P<site>H\\\\d+)-'; "
                                    "rename the file or fix the regex (null: every image at one site)")
    report = result.report
    assert report["no_site"] == [f"{NEGATIVE}/B05_PAS_1of1_f.png", f"{NEGATIVE}/XH3-B06_PAS_1of1_g.png"]
    assert report["n_sites"] == 2
    assert report["sites"] == {"H1": {"n": 2, "by_label": {"0": 1, "1": 1}},
                               "H2": {"n": 3, "by_label": {"0": 2, "1": 1}}}
    assert report["config"]["site_regex"] == SITE_REGEX
    assert report["counts"][NEGATIVE] == {"label": 0, "found": 5, "kept": 3}
    check_ingest(result, config)
    path = tmp_path / "manifest.csv"
    write_manifest(result.rows, path)
    assert read_manifest(path) == result.rows


def test_a_class_whose_names_match_no_site_is_an_error_naming_the_regex(tmp_path):
    _write_site_dataset(tmp_path / "data")
    config = dataclasses.replace(CONFIG, labels_csv=None, site_regex=r"_PAS_1of1_(?P<site>[ab])\.png$")
    result = ingest_dataset(tmp_path / "data", config)
    assert {row.site for row in result.rows} == {"a", "b"}  # both positives
    with pytest.raises(IngestError, match=rf"class folder '{NEGATIVE}' \(label 0\) has no usable images: 5 of its "
                                          r"images have names that ingest.site_regex = .* does not match") as err:
        check_ingest(result, config)
    assert "null" in str(err.value)


@pytest.mark.parametrize("pattern, message", [("(?P<site>H\\d+", "is not a regular expression"),
                                              (r"^(H\d+)-", "has no named group \\(\\?P<site>")])
def test_bad_site_regex_is_refused_naming_the_key(tmp_path, pattern, message):
    write_clean_dataset(tmp_path / "data")
    with pytest.raises(IngestError, match=rf"ingest.site_regex = .* {message}"):
        ingest_dataset(tmp_path / "data", dataclasses.replace(CONFIG, site_regex=pattern))


def test_progress_is_logged_when_not_a_terminal(tmp_path, caplog):
    write_clean_dataset(tmp_path / "data", per_class=10)
    with caplog.at_level(logging.INFO):
        ingest_dataset(tmp_path / "data", CONFIG)
    assert any("ingest: 20/20" in message for message in caplog.messages)


# ---------------------------------------------------------------------------------------- manifest

def test_manifest_round_trip(tmp_path):
    rows = [ManifestRow(id=f"{POSITIVE}/glom 1 é, \"odd\".png", path=f"{POSITIVE}/glom 1 é, \"odd\".png",
                        name="glom 1 é, \"odd\".png", label=1, group="B1", sha256="ab" * 32, width=3, height=4,
                        channels=4, site="=H1, \"north\"")]
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    data = path.read_bytes()
    assert data.startswith(",".join(MANIFEST_COLUMNS).encode() + b"\n") and b"\r\n" not in data
    assert read_manifest(path) == rows


def test_a_manifest_from_before_sites_reads_with_every_image_at_one_site(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("id,path,name,label,group,sha256,width,height,channels\n"
                    f"{POSITIVE}/a.png,{POSITIVE}/a.png,a.png,1,B1,{'ab' * 32},3,4,3\n", encoding="utf-8")
    assert read_manifest(path) == [ManifestRow(id=f"{POSITIVE}/a.png", path=f"{POSITIVE}/a.png", name="a.png",
                                               label=1, group="B1", sha256="ab" * 32, width=3, height=4, channels=3,
                                               site="all")]
    path.write_text("id,path,name,label,group,sha256,width,height,channels\na,a,a,1,B1,h,1,1,3,extra\n",
                    encoding="utf-8")
    with pytest.raises(IngestError, match="line 2: 10 columns, expected 9"):
        read_manifest(path)


def test_manifest_with_a_wrong_header_or_row_is_refused(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("id,path,label\n", encoding="utf-8")
    with pytest.raises(IngestError, match="manifest.csv: header"):
        read_manifest(path)
    path.write_text(",".join(MANIFEST_COLUMNS) + "\na,a,a,7,g,s,h,1,1,3\n", encoding="utf-8")
    with pytest.raises(IngestError, match="line 2: label 7"):
        read_manifest(path)
    path.write_text(",".join(MANIFEST_COLUMNS) + "\na,a,a,1,g,s,h,wide,1,3\n", encoding="utf-8")
    with pytest.raises(IngestError, match="line 2: width"):
        read_manifest(path)


def test_csv_bad_rows_and_repeated_rows_are_reported(tmp_path):
    root, names = _with_csv(tmp_path, b"")
    first = sorted(names)[0]
    rows = [(n, str(label)) for n, label in names.items()] + [(first, str(names[first]))]
    text = labels_csv(rows).decode() + "only_one_column\nfolder/x.png,1\n"
    (root / "public.csv").write_text(text, encoding="utf-8")
    result = ingest_dataset(root, CONFIG)
    csv_report = result.report["csv"]
    assert [r["reason"] for r in csv_report["bad_rows"]] == ["expected 2 columns, found 1",
                                                            "expected a bare file name (no folder)"]
    assert [r["name"] for r in csv_report["duplicate_rows"]] == [first]
    assert result.report["n_kept"] == len(names)


def test_csv_that_matches_no_image_gives_a_warning(tmp_path):
    root, names = _with_csv(tmp_path, b"")
    (root / "public.csv").write_bytes(labels_csv([(n.removesuffix(".png"), str(v)) for n, v in names.items()]))
    result = ingest_dataset(root, CONFIG)
    assert any("none of the 8 names in public.csv" in w for w in result.report["warnings"])
    assert len(result.report["csv_missing_rows"]) == len(result.report["csv_extra_rows"]) == 8


def test_symlinked_class_folder_is_explained(tmp_path):
    write_clean_dataset(tmp_path / "real")
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "real" / POSITIVE).rename(root / POSITIVE)
    os.symlink(tmp_path / "real" / NEGATIVE, root / NEGATIVE, target_is_directory=True)
    result = ingest_dataset(root, CONFIG)
    with pytest.raises(IngestError, match=r"The folder itself was skipped: symlinked folder points outside"):
        check_ingest(result, CONFIG)


def test_parallel_ingest_after_the_parent_used_opencv_threads(tmp_path):
    # Forked workers deadlocked when the parent had already run OpenCV's thread pool; run in a
    # subprocess so a regression fails on the timeout instead of hanging the test session.
    script = f"""
import sys, numpy as np, cv2
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from pathlib import Path
from badfiles import write_clean_dataset, CLASS_DIRS, GROUP_REGEX
from glomeruli.data.ingest import IngestConfig, ingest_dataset
big = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (900, 900, 4), dtype=np.uint8), (0, 0), 3)
for _ in range(20):
    cv2.imencode(".png", big)
decoded = cv2.imdecode(cv2.imencode(".png", big)[1], cv2.IMREAD_UNCHANGED)
for _ in range(50):
    cv2.cvtColor(decoded[:, :, :3], cv2.COLOR_BGR2RGB)
write_clean_dataset(Path({str(tmp_path / "data")!r}))
config = IngestConfig(CLASS_DIRS, None, GROUP_REGEX, 40_000_000, 0.02, workers=2)
print(ingest_dataset(Path({str(tmp_path / "data")!r}), config).report["n_kept"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8"


def test_user_errors_are_printed_by_the_stage_runner_not_traced():
    from glomeruli.core.errors import UserError
    from glomeruli.data.images import ImageError
    from glomeruli.data.sources import SourceError

    assert all(issubclass(cls, UserError) for cls in (IngestError, ImageError, SourceError))


# ---------------------------------------------------------------------------------------- layouts

def test_folder_and_zip_refuse_a_layout_with_the_same_message(tmp_path):
    """Two wrapper folders deep is one too many, for a folder and for a zip alike, in the same words."""
    files = {f"outer/inner/{r}": d for r, d in write_clean_dataset(tmp_path / "clean").items()}
    folder = tmp_path / "unzipped"
    for relpath, data in files.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(data)
    archive = write_zip(tmp_path / "d.zip", files)
    messages = []
    for source in (folder, archive):
        result = ingest_dataset(source, CONFIG)
        with pytest.raises(IngestError) as err:
            check_ingest(result, CONFIG)
        messages.append(str(err.value).replace(str(source), "<source>"))
    assert messages[0] == messages[1]
    assert "folders found: ['inner']" in messages[0] and "exactly one wrapper folder" in messages[0]
    assert "\n" not in messages[0]


def test_synthetic_marker_beside_real_images_is_refused(tmp_path):
    from glomeruli.data.layout import BIOPSY_PREFIX, MARKER_FILE

    root = tmp_path / "data"
    files = write_clean_dataset(root)  # stands in for the user's own images (no SYNTH- biopsy ids)
    (root / MARKER_FILE).write_text("SYNTHETIC glomeruli sample data\n")
    for relpath in files:
        folder, name = relpath.split("/")
        (root / relpath).rename(root / folder / f"{BIOPSY_PREFIX}{name}")
    report = ingest_dataset(root, CONFIG).report  # all synthetic: accepted, and the report says so
    assert report["n_kept"] > 0
    assert (report["synthetic"], report["synthetic_marker"], report["n_synthetic"]) == (True, True, report["n_kept"])
    (root / MARKER_FILE).rename(tmp_path / MARKER_FILE)  # a copy of the sample that lost its marker: still synthetic
    report = ingest_dataset(root, CONFIG).report
    assert (report["synthetic"], report["synthetic_marker"], report["n_synthetic"]) == (True, False, report["n_kept"])
    (tmp_path / MARKER_FILE).rename(root / MARKER_FILE)
    real = f"{POSITIVE}/{cmil_name('REAL7', 1, 1, seed=5)}"
    (root / real).write_bytes(rgba_png(20, 20, seed=5))
    with pytest.raises(IngestError) as err:
        ingest_dataset(root, CONFIG)
    message = str(err.value)
    assert MARKER_FILE in message and real in message and "data/sample" in message and "data.source" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------- decoder noise

_INGEST_AND_REPORT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from badfiles import CLASS_DIRS, GROUP_REGEX
from glomeruli.data.ingest import IngestConfig, ingest_dataset
for workers in (1, 2):  # decoded in this process, then in worker processes
    config = IngestConfig(class_dirs=CLASS_DIRS, labels_csv=None, group_regex=GROUP_REGEX, max_pixels=10**6,
                          max_unreadable_fraction=1.0, workers=workers)
    for item in ingest_dataset(Path({root!r}), config).report["unreadable"]:
        print(f"workers={{workers}}: {{item['file']}}: {{item['reason']}}", file=sys.stderr)
"""


def test_decoder_library_noise_stays_off_the_terminal(tmp_path):
    from badfiles import png_with_bad_filter

    root = tmp_path / "data"
    write_clean_dataset(root)
    (root / POSITIVE / "bad_filter.png").write_bytes(png_with_bad_filter())
    script = _INGEST_AND_REPORT.format(tests=str(Path(__file__).parents[1]), root=str(root))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not [line for line in lines if "libpng" in line], result.stderr
    for workers in (1, 2):  # our message, with what the decoder said, stays
        assert (f"workers={workers}: {POSITIVE}/bad_filter.png: unreadable: {POSITIVE}/bad_filter.png: corrupt or "
                "truncated image (OpenCV could not decode it: bad adaptive filter value)") in result.stderr


# ---------------------------------------------------------------------------------------- hostile inputs

LABELS_CAP = 16 * 2**20  # sources.LABELS_CSV_MAX_BYTES, written out


def test_a_labels_csv_over_its_cap_in_a_folder_is_refused_unread(tmp_path):
    root = tmp_path / "data"
    write_clean_dataset(root)
    with open(root / "public.csv", "wb") as f:
        f.truncate(LABELS_CAP + 1)  # sparse: refused by its size, never read
    with pytest.raises(RefusedFileError, match=rf"public\.csv: {LABELS_CAP + 1} bytes, more than the {LABELS_CAP} "
                                               r"allowed.*ingest\.labels_csv: null"):
        ingest_dataset(root, CONFIG)


def test_a_zip_bomb_labels_csv_is_refused_unread(tmp_path):
    import zipfile

    files = write_clean_dataset(tmp_path / "data")
    row = b"S-0000-0000_PAS_1of1_000000000000000000000000.png,1\n"
    files["public.csv"] = b"name,ground truth\n" + row * (LABELS_CAP // len(row) + 1)
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for relpath, data in files.items():
            z.writestr(relpath, data)
    assert archive.stat().st_size < LABELS_CAP // 100  # a small zip that inflates past the cap
    with pytest.raises(RefusedFileError, match=rf"public\.csv: {len(files['public.csv'])} bytes, more than the "
                                          rf"{LABELS_CAP} allowed.*ingest\.labels_csv"):
        ingest_dataset(archive, CONFIG)


def test_an_image_swapped_for_a_named_pipe_after_listing_is_unreadable_not_a_hang(tmp_path, monkeypatch):
    import contextlib

    from badfiles import fifo
    from glomeruli.data import ingest

    root = tmp_path / "data"
    files = write_clean_dataset(root)
    swapped = sorted(files)[0]
    listed = ingest.list_entries

    def list_then_swap(source):
        listing = listed(source)
        (root / swapped).unlink()
        stack.enter_context(fifo(root / swapped))
        return listing

    with contextlib.ExitStack() as stack:
        monkeypatch.setattr(ingest, "list_entries", list_then_swap)
        result = ingest_dataset(root, CONFIG)
    assert "not a regular file" in _skip_reasons(result)[swapped]
    assert result.report["n_kept"] == len(files) - 1


def test_manifest_keeps_formula_names_inert_and_exact(tmp_path):
    import csv

    names = ["=HYPERLINK(\"http://x\",\"y\").png", "+1.png", "-2.png", "@sum.png", "\tt.png", "'q.png"]
    rows = [ManifestRow(id=f"{POSITIVE}/{n}", path=f"{POSITIVE}/{n}", name=n, label=1, group=n[:3], sha256="ab" * 32,
                        width=3, height=4, channels=3) for n in names]
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    with open(path, newline="", encoding="utf-8") as f:
        cells = [row[2] for row in list(csv.reader(f))[1:]]
    assert cells == ["'=HYPERLINK(\"http://x\",\"y\").png", "'+1.png", "'-2.png", "'@sum.png", "'\tt.png", "''q.png"]
    assert read_manifest(path) == rows
