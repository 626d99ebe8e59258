"""Dataset sources: folders and zips list the same files, skip junk and hostile paths, never extract."""

from __future__ import annotations

import multiprocessing
import os
import zipfile

import pytest

from badfiles import (NEGATIVE, POSITIVE, add_macosx_members, add_members, declare_member_size, fifo,
                      hostile_zip_members, mark_encrypted, rgba_png, write_clean_dataset, write_messy_dataset, write_zip)
from glomeruli.data import sources
from glomeruli.data.sources import (Entry, RefusedFileError, SourceError, close_sources, image_max_bytes, list_entries,
                               read_bytes, read_file)

CAP = 10**6  # any cap: the files below are built around it


@pytest.fixture(autouse=True)
def _close_zips():
    yield
    close_sources()


def _reason(skipped, relpath):
    return next(s.reason for s in skipped if s.relpath == relpath)


def test_missing_source_names_the_path_and_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*data\.source"):
        list_entries(tmp_path / "nowhere")


def test_a_file_that_is_not_a_zip_is_refused(tmp_path):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(SourceError, match=r"data\.csv.*not a \.zip.*data\.source"):
        list_entries(tmp_path / "data.csv")


def test_messy_folder_listing(tmp_path):
    root = tmp_path / "data"
    expected = write_messy_dataset(root, tmp_path / "elsewhere")
    entries, skipped = list_entries(root)
    listed = {e.relpath for e in entries}
    reasons = {s.relpath: s.reason for s in skipped}
    assert [e.relpath for e in entries] == sorted(listed)
    assert [s.relpath for s in skipped] == sorted(reasons)
    assert listed.isdisjoint(reasons)
    # Every file ingest should decode is listed; every listing-level skip carries its reason.
    for relpath, outcome in expected.items():
        listing_skip = any(word in outcome for word in ("hidden", "junk", "__MACOSX", "symlink", "outside the source"))
        if listing_skip:
            assert outcome in reasons[relpath], relpath
        else:
            assert relpath in listed, relpath
    assert f"{POSITIVE}/glom 1 é.png" in listed
    assert reasons[f"{POSITIVE}/loop"].startswith("symlink loop")
    assert reasons[f"{POSITIVE}/broken.png"].startswith("broken symlink")
    assert "outside the source" in reasons[f"{POSITIVE}/outside_link.png"]
    sizes = {e.relpath: e.size for e in entries}
    assert sizes[f"{POSITIVE}/zero_bytes.png"] == 0
    assert sizes[f"{POSITIVE}/z_inside_link.png"] > 0  # a link inside the source is read through


def test_folder_read_bytes_and_escapes(tmp_path):
    files = write_clean_dataset(tmp_path / "data")
    relpath = next(iter(files))
    assert read_bytes(tmp_path / "data", relpath, CAP) == files[relpath]
    (tmp_path / "secret.png").write_bytes(b"secret")
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "data", "../secret.png", CAP)


def test_symlink_swapped_in_after_listing_cannot_leak(tmp_path):
    root = tmp_path / "data"
    write_clean_dataset(root)
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", root / POSITIVE / "late.png")
    with pytest.raises(FileNotFoundError, match="outside the source"):
        read_bytes(root, f"{POSITIVE}/late.png", CAP)


def test_fifo_is_skipped_not_read(tmp_path):
    root = tmp_path / "data"
    write_clean_dataset(root)
    os.mkfifo(root / POSITIVE / "pipe.png")
    _, skipped = list_entries(root)
    assert "not a regular file" in _reason(skipped, f"{POSITIVE}/pipe.png")


def test_zip_lists_like_the_folder_and_reads_members(tmp_path):
    files = write_clean_dataset(tmp_path / "data")
    folder_entries, folder_skipped = list_entries(tmp_path / "data")
    for wrapper in (None, "CMIL dataset"):
        archive = write_zip(tmp_path / f"data_{wrapper}.zip", files, wrapper=wrapper)
        entries, skipped = list_entries(archive)
        assert [e.relpath for e in entries] == [e.relpath for e in folder_entries]
        assert [e.size for e in entries] == [e.size for e in folder_entries]
        assert skipped == folder_skipped == []
        for relpath, data in files.items():
            assert read_bytes(archive, relpath, CAP) == data


def test_zip_with_a_top_level_file_is_not_unwrapped(tmp_path):
    archive = write_zip(tmp_path / "d.zip", {"public.csv": b"name,ground truth\n", f"{POSITIVE}/a.png": b"x"})
    assert [e.relpath for e in list_entries(archive)[0]] == [f"{POSITIVE}/a.png", "public.csv"]


def test_hostile_zip_members_are_skipped_and_nothing_is_written(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    files = write_clean_dataset(tmp_path / "data")
    archive = write_zip(tmp_path / "evil.zip", files, wrapper="CMIL")
    hostile = hostile_zip_members()
    add_members(archive, {name: rgba_png(8, 8, seed=1) for name in hostile})
    macosx = add_macosx_members(archive, [f"CMIL/{r}" for r in files])
    assert set(hostile) <= set(zipfile.ZipFile(archive).namelist())  # names really stored as given
    before = sorted(p for p in tmp_path.rglob("*"))
    abs_existed = os.path.exists("/abs.png")

    entries, skipped = list_entries(archive)
    for relpath in [e.relpath for e in entries]:
        read_bytes(archive, relpath, CAP)

    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert os.path.exists("/abs.png") == abs_existed
    assert {e.relpath for e in entries} == set(files)  # hostile names neither stripped nor unwrapped
    reasons = {s.relpath: s.reason for s in skipped}
    for name, reason in hostile.items():
        assert reason in reasons[name], name
    for name in macosx:
        assert "__MACOSX" in reasons[name]
    with pytest.raises(FileNotFoundError):
        read_bytes(archive, "../escape.png", CAP)


def test_zip_symlink_duplicate_and_encrypted_members_are_skipped(tmp_path):
    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo(f"{POSITIVE}/link.png")
        link.external_attr = 0o120777 << 16  # a stored symlink
        zf.writestr(link, "/etc/passwd")
        locked = zipfile.ZipInfo(f"{POSITIVE}/locked.png")
        locked.flag_bits |= 0x1
        zf.writestr(locked, b"x")
        zf.writestr(f"{POSITIVE}/a.png", b"first")
        zf.writestr(f"{POSITIVE}\\a.png", b"second, same path with a backslash")
        zf.writestr(f"{POSITIVE}/.DS_Store", b"junk")
    mark_encrypted(archive, f"{POSITIVE}/locked.png")
    entries, skipped = list_entries(archive)
    assert entries == [Entry(f"{POSITIVE}/a.png", 5)]
    reasons = {s.relpath: s.reason for s in skipped}
    assert "symlink" in reasons[f"{POSITIVE}/link.png"]
    assert "encrypted" in reasons[f"{POSITIVE}/locked.png"]
    assert "duplicate member name" in reasons[f"{POSITIVE}\\a.png"]
    assert "hidden" in reasons[f"{POSITIVE}/.DS_Store"]
    assert read_bytes(archive, f"{POSITIVE}/a.png", CAP) == b"first"


def test_non_ascii_and_space_names_in_zip(tmp_path):
    name = f"{NEGATIVE}/glom 1 é.png"
    archive = write_zip(tmp_path / "d.zip", {name: b"bytes"})
    assert list_entries(archive)[0] == [Entry(name, 5)]
    assert read_bytes(archive, name, CAP) == b"bytes"


def test_corrupt_zip_is_a_source_error(tmp_path):
    archive = write_zip(tmp_path / "d.zip", {f"{POSITIVE}/a.png": b"x" * 1000})
    data = bytearray(archive.read_bytes())
    data[:4] = b"XXXX"  # the central directory still parses, the member header does not
    archive.write_bytes(bytes(data))
    close_sources()
    with pytest.raises(SourceError, match="a.png"):
        read_bytes(archive, f"{POSITIVE}/a.png", CAP)


def test_one_open_zip_per_process_and_reopened_when_replaced(tmp_path):
    archive = write_zip(tmp_path / "d.zip", {f"{POSITIVE}/a.png": b"old"})
    assert read_bytes(archive, f"{POSITIVE}/a.png", CAP) == b"old"
    handle = sources._open_zips[(os.getpid(), str(archive.resolve()))].archive
    read_bytes(archive, f"{POSITIVE}/a.png", CAP)
    assert sources._open_zips[(os.getpid(), str(archive.resolve()))].archive is handle
    write_zip(tmp_path / "new.zip", {f"{POSITIVE}/a.png": b"newer"}).replace(archive)
    assert read_bytes(archive, f"{POSITIVE}/a.png", CAP) == b"newer"


def _read_in_child(args):
    archive, relpath = args
    return os.getpid(), read_bytes(archive, relpath, CAP)


def test_forked_workers_open_their_own_zip(tmp_path):
    files = write_clean_dataset(tmp_path / "data", per_class=6)
    archive = write_zip(tmp_path / "d.zip", files)
    read_bytes(archive, next(iter(files)), CAP)  # the parent holds an open handle before forking
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_read_in_child, [(archive, r) for r in files], chunksize=1)
    assert [data for _, data in results] == list(files.values())
    assert os.getpid() not in {pid for pid, _ in results}
    assert read_bytes(archive, next(iter(files)), CAP) == next(iter(files.values()))  # parent offset intact


# ------------------------------------------------------------------ one layout rule for folders and zips

def _as_folder(tmp_path, files: dict[str, bytes], name: str):
    root = tmp_path / name
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    return root


@pytest.mark.parametrize("wrapper", [None, "glomeruli"])
def test_folder_and_zip_accept_the_same_layouts(tmp_path, wrapper):
    """Class folders at the top or under one wrapper folder, with macOS junk beside them: same entries."""
    files = write_clean_dataset(tmp_path / "clean")
    stored = {(f"{wrapper}/{r}" if wrapper else r): data for r, data in files.items()}
    junk = {f"__MACOSX/{r}": b"\x00\x05\x16\x07Mac OS X" for r in stored} | {".DS_Store": b"junk"}
    folder = _as_folder(tmp_path, stored | junk, "unzipped")
    archive = write_zip(tmp_path / "d.zip", stored | junk)
    listings = {kind: list_entries(source) for kind, source in (("folder", folder), ("zip", archive))}
    for kind, (entries, skipped) in listings.items():
        assert [e.relpath for e in entries] == sorted(files), kind  # relative to the wrapper, junk set aside
        # (a folder skips __MACOSX/ as one folder, a zip member by member)
        assert {s.relpath.split("/")[0] for s in skipped} == {"__MACOSX", ".DS_Store"}, kind
        assert all(read_bytes(folder if kind == "folder" else archive, r, CAP) == files[r] for r in files)
    assert listings["folder"][0] == listings["zip"][0]


def test_folder_wrapper_is_found_again_in_a_fresh_worker(tmp_path):
    files = write_clean_dataset(tmp_path / "clean")
    folder = _as_folder(tmp_path, {f"CMIL/{r}": d for r, d in files.items()}, "unzipped")
    list_entries(folder)
    relpath = next(iter(files))
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a worker that never listed the folder
        assert pool.map(_read_in_child, [(folder, relpath)])[0][1] == files[relpath]


# ---------------------------------------------------------------------------------------- read_file: the one capped read

def test_read_file_refuses_a_named_pipe_without_blocking(tmp_path):
    with fifo(tmp_path / "pipe.png") as pipe:
        with pytest.raises(RefusedFileError, match=r"pipe\.png: not a regular file"):
            read_file(pipe, CAP)


def test_read_file_refuses_a_device_behind_a_symlink(tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(RefusedFileError, match=r"zero\.png: not a regular file"):
        read_file(tmp_path / "zero.png", CAP)


def test_read_file_refuses_a_file_over_its_cap_unread(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(1001)  # sparse: costs no disk, and must cost no memory either
    with pytest.raises(RefusedFileError, match=r"huge\.png: 1001 bytes, more than the 1000 allowed"):
        read_file(huge, 1000)
    with open(huge, "r+b") as f:
        f.truncate(1000)
    assert read_file(huge, 1000) == bytes(1000)


def test_read_file_stops_at_the_cap_when_the_file_holds_more_than_it_said():
    # Kernel files declare size 0 and hold more: the stand-in for a file that grows after its size was checked.
    status = "/proc/self/status"
    if not os.path.exists(status) or os.stat(status).st_size != 0:
        pytest.skip("needs Linux /proc")
    with pytest.raises(RefusedFileError, match="more than the 100 allowed"):
        read_file(status, 100)


def test_a_named_pipe_swapped_in_after_listing_is_refused_without_blocking(tmp_path):
    root = tmp_path / "data"
    files = write_clean_dataset(root)
    relpath = next(iter(files))
    assert relpath in {e.relpath for e in list_entries(root)[0]}
    (root / relpath).unlink()
    with fifo(root / relpath):
        with pytest.raises(RefusedFileError, match="not a regular file"):
            read_bytes(root, relpath, CAP)


def test_a_folder_file_over_the_cap_is_refused(tmp_path):
    root = tmp_path / "data"
    files = write_clean_dataset(root)
    relpath = next(iter(files))
    with pytest.raises(RefusedFileError, match=rf"{len(files[relpath])} bytes, more than the 100 allowed"):
        read_bytes(root, relpath, 100)


def test_a_zip_member_over_the_cap_is_refused_by_its_declared_size(tmp_path):
    archive = write_zip(tmp_path / "d.zip", {f"{POSITIVE}/big.png": bytes(5000)})
    with pytest.raises(RefusedFileError, match=r"big\.png: 5000 bytes, more than the 4999 allowed"):
        read_bytes(archive, f"{POSITIVE}/big.png", 4999)
    assert read_bytes(archive, f"{POSITIVE}/big.png", 5000) == bytes(5000)


def test_a_zip_member_that_lies_about_its_size_gives_no_more_than_it_declared(tmp_path):
    archive = write_zip(tmp_path / "d.zip", {f"{POSITIVE}/bomb.png": bytes(50_000)})
    declare_member_size(archive, f"{POSITIVE}/bomb.png", 10)
    with pytest.raises(SourceError, match=r"bomb\.png"):
        read_bytes(archive, f"{POSITIVE}/bomb.png", 100)


def test_the_image_cap_follows_max_pixels():
    # 8 bytes a pixel (16-bit RGBA stored raw) plus 16 MiB of metadata
    assert image_max_bytes(1000) == 8000 + 16 * 2**20


def test_a_name_with_a_line_break_is_skipped_in_folders_and_zips(tmp_path):
    # csv writes a bare \r unquoted, so such a name would not come back from the manifest as it went in
    files = {f"{POSITIVE}/a\rb.png": b"x", f"{POSITIVE}/ok.png": b"y", f"{NEGATIVE}/c.png": b"z"}
    folder = tmp_path / "data"
    for relpath, data in files.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(data)
    for source in (folder, write_zip(tmp_path / "d.zip", files)):
        entries, skipped = list_entries(source)
        assert sorted(e.relpath for e in entries) == sorted([f"{POSITIVE}/ok.png", f"{NEGATIVE}/c.png"]), source
        assert "line break" in _reason(skipped, f"{POSITIVE}/a\rb.png"), source
