"""Dataset sources: a folder, or a .zip of the same layout, read as bytes and never extracted.

`list_entries` returns every readable file (posix path relative to the source root) and, with a
reason, everything it will not read: hidden and OS junk files, unsafe zip member names, symlinks
that loop, dangle or leave the source. `read_bytes` reads one of the listed files.

Every read of a user's file goes through `read_file` (a folder's files, and `glomeruli predict`'s) or
`_read_zip_member` (a zip's), with a cap: only a regular file is opened (a named pipe would block for
ever, a device stream for ever), its size is checked before reading, and no more than the cap plus one
byte is read, so a file that grows, or lies about its size, is refused all the same. The caps:
`image_max_bytes(max_pixels)` for images, `LABELS_CSV_MAX_BYTES` for the labels file.

Both kinds accept the same layouts: the class folders at the top, or all of them inside exactly one
wrapper folder (`glomeruli/<class>/x.png`, as unzipping often leaves it); paths are then relative to the
wrapper. The one rule is `_single_wrapper_folder`, applied to the files left after junk is set aside.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from glomeruli.core.errors import UserError

log = logging.getLogger(__name__)

PARAM_KEY = "data.source"
JUNK_FILE_NAMES = frozenset({"thumbs.db", "desktop.ini"})  # compared case-insensitively
MACOS_RESOURCE_FOLDER = "__MACOSX"
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_MAX_OPEN_ZIPS = 8
# CMIL's public.csv is ~300 KB; this holds ~300,000 rows of CMIL-length names. Parsing costs ~60 times
# the file's size in memory (measured), so the cap keeps a labels file, or a zip bomb posing as one, near 1 GB.
LABELS_CSV_MAX_BYTES = 16 << 20
# No valid image of max_pixels is bigger than 16-bit RGBA stored raw (8 bytes a pixel) plus metadata.
_IMAGE_BYTES_PER_PIXEL = 8
_IMAGE_METADATA_BYTES = 16 << 20
_READ_CHUNK = 1 << 20


class SourceError(UserError, ValueError):
    """The dataset source exists but cannot be used (not a folder or zip, corrupt zip, bad member)."""


class RefusedFileError(SourceError):
    """A file left unread: not a regular file, or larger than its cap. The message names it and why."""


def image_max_bytes(max_pixels: int) -> int:
    """The most bytes an image file of at most `max_pixels` pixels can hold; larger files are refused unread."""
    return max_pixels * _IMAGE_BYTES_PER_PIXEL + _IMAGE_METADATA_BYTES


@dataclass(frozen=True)
class Entry:
    relpath: str
    size: int


@dataclass(frozen=True)
class Skipped:
    relpath: str
    reason: str


@dataclass(frozen=True)
class _ZipIndex:
    members: dict[str, zipfile.ZipInfo]  # relpath -> member
    skipped: list[Skipped]


@dataclass(frozen=True)
class _OpenZip:
    archive: zipfile.ZipFile
    index: _ZipIndex
    stamp: tuple[int, int]  # (mtime_ns, size): a replaced zip is reopened, not read through a stale index


# One open ZipFile per (process, zip): a forked worker must not share its parent's file offset.
_open_zips: dict[tuple[int, str], _OpenZip] = {}
# Wrapper folder of each folder source, per process: read_bytes must strip what list_entries stripped.
_folder_wrappers: dict[tuple[int, str], tuple[tuple, str | None]] = {}  # -> (stamp, wrapper)


def list_entries(source: Path) -> tuple[list[Entry], list[Skipped]]:
    """Every file of the source that can be read, and every one that will not be, both sorted by relpath."""
    source = Path(source)
    if source.is_dir():
        entries, skipped = _list_folder(source)
    elif source.is_file():
        index = _zip_index_of(source)
        entries = [Entry(relpath, info.file_size) for relpath, info in index.members.items()]
        skipped = list(index.skipped)
    else:
        raise FileNotFoundError(
            f"dataset source {source} does not exist; set `{PARAM_KEY}` in params.yaml to the folder "
            "(or .zip) that holds the class folders")
    entries.sort(key=lambda e: e.relpath)
    skipped.sort(key=lambda s: s.relpath)
    return entries, skipped


def read_bytes(source: Path, relpath: str, max_bytes: int) -> bytes:
    """The bytes of one file listed by `list_entries`; `RefusedFileError` when it is no longer a regular file
    or holds more than `max_bytes`."""
    source = Path(source)
    if source.is_dir():
        root = source.resolve(strict=True)
        wrapper = _folder_wrapper(root)
        return _read_folder_file(root / wrapper if wrapper else root, relpath, max_bytes)
    return _read_zip_member(source, relpath, max_bytes)


def read_labels_file(source: Path, relpath: str) -> bytes:
    """The labels CSV `relpath` of a source (ingest and predict alike), read under `LABELS_CSV_MAX_BYTES`."""
    try:
        return read_bytes(source, relpath, LABELS_CSV_MAX_BYTES)
    except RefusedFileError as err:
        raise RefusedFileError(f"{err}: a labels file holds one `name,ground truth` row per image (CMIL's is about "
                               f"300 KB); check that {relpath} is the labels file, or set ingest.labels_csv: null to "
                               "leave it unread") from None


def read_file(path: Path | str, max_bytes: int, *, follow_symlinks: bool = True, name: str | None = None) -> bytes:
    """The bytes of the regular file `path` when it holds at most `max_bytes`; else `RefusedFileError` (naming
    the file as `name`, by default its path), unread.

    Opened non-blocking, so a named pipe swapped in after the check cannot block; checked again on the open
    descriptor (what is read is what was checked); read to at most `max_bytes` + 1 bytes.
    """
    name = str(path) if name is None else name
    _check_regular(os.stat(path) if follow_symlinks else os.lstat(path), name, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        _check_regular(os.fstat(fd), name, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = _read_at_most(f, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise RefusedFileError(f"{name}: more than the {max_bytes} allowed bytes (it grew while read); not read")
    return data


def _check_regular(info: os.stat_result, name: str, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise RefusedFileError(f"{name}: not a regular file (a named pipe, device or socket would block or stream "
                               "for ever); not read")
    if info.st_size > max_bytes:
        raise RefusedFileError(f"{name}: {info.st_size} bytes, more than the {max_bytes} allowed; not read")


def _read_at_most(f, limit: int) -> bytes:
    chunks, total = [], 0
    while total < limit:
        chunk = f.read(min(_READ_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def close_sources() -> None:
    """Close the zips this process opened (tests, long-lived processes)."""
    pid = os.getpid()
    for key in [k for k in _open_zips if k[0] == pid]:
        _open_zips.pop(key).archive.close()


def junk_reason(name: str) -> str | None:
    if name.startswith("."):
        return f"hidden file or folder '{name}'"
    if name.casefold() in JUNK_FILE_NAMES:
        return f"operating-system junk file '{name}'"
    if name == MACOS_RESOURCE_FOLDER:
        return f"macOS resource folder '{MACOS_RESOURCE_FOLDER}/' (not images)"
    return None


def _is_utf8(name: str) -> bool:
    # os.walk returns undecodable bytes as surrogates; such names cannot go into a UTF-8 manifest.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------- folders

def _list_folder(source: Path) -> tuple[list[Entry], list[Skipped]]:
    root = source.resolve(strict=True)
    entries, skipped = _walk_folder(root)
    wrapper = _single_wrapper_folder([e.relpath.split("/") for e in entries])
    _folder_wrappers[(os.getpid(), str(root))] = (_folder_stamp(root), wrapper)
    if wrapper is None:
        return entries, skipped
    log.info("%s: every file is inside the folder '%s/'; paths are taken relative to it", source, wrapper)
    return ([Entry(_unwrapped(e.relpath, wrapper), e.size) for e in entries],
            [Skipped(_unwrapped(s.relpath, wrapper), s.reason) for s in skipped])


def _folder_stamp(root: Path) -> tuple:
    """What the wrapper decision depends on: the top level, and the wrapper's own listing."""
    tops = [p for p in root.iterdir() if not junk_reason(p.name)]
    return (root.stat().st_mtime_ns, *(p.stat().st_mtime_ns for p in tops if len(tops) == 1 and p.is_dir()))


def _folder_wrapper(root: Path) -> str | None:
    cached = _folder_wrappers.get((os.getpid(), str(root)))
    if cached is None or cached[0] != _folder_stamp(root):
        _list_folder(root)  # once per process (worker), or again after the folder changed
        cached = _folder_wrappers[(os.getpid(), str(root))]
    return cached[1]


def folder_wrapper(source: Path) -> str | None:
    """The wrapper folder `list_entries` takes a folder source's paths relative to; None when there is none."""
    return _folder_wrapper(Path(source).resolve(strict=True))


def _walk_folder(root: Path) -> tuple[list[Entry], list[Skipped]]:
    entries: list[Entry] = []
    skipped: list[Skipped] = []

    def on_walk_error(err: OSError) -> None:
        where = _relative(root, Path(err.filename)) if err.filename else "."
        skipped.append(Skipped(where, f"cannot list folder: {err.strerror}; check its permissions"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=on_walk_error):
        folder = Path(dirpath)
        followed = []
        for name in sorted(dirnames):
            relpath = _relative(root, folder / name)
            reason = _folder_skip_reason(root, folder / name, name)
            if reason:
                skipped.append(Skipped(relpath, reason))
            else:
                followed.append(name)
        dirnames[:] = followed  # os.walk descends only into what is left here
        for name in sorted(filenames):
            relpath = _relative(root, folder / name)
            reason = junk_reason(name) or _name_reason(name)
            if reason:
                skipped.append(Skipped(relpath, reason))
                continue
            size_or_reason = _regular_file_size(root, folder / name)
            if isinstance(size_or_reason, str):
                skipped.append(Skipped(relpath, size_or_reason))
            else:
                entries.append(Entry(relpath, size_or_reason))
    return entries, skipped


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _name_reason(name: str) -> str | None:
    if not _is_utf8(name):
        return f"file name {name!r} is not valid UTF-8; rename it"
    if "\r" in name or "\n" in name:  # a CSV row (the manifest) cannot carry it back unchanged
        return f"file name {name!r} holds a line break; rename it"
    return None


def _folder_skip_reason(root: Path, path: Path, name: str) -> str | None:
    reason = junk_reason(name) or _name_reason(name)
    if reason or not path.is_symlink():
        return reason
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return "broken symlink (its target does not exist)"
    except (OSError, RuntimeError):
        return "symlink loop"
    if path.parent.resolve().is_relative_to(target):
        return f"symlink loop (folder link to its own ancestor {target})"
    if not target.is_relative_to(root):
        return f"symlinked folder points outside the source ({target}); copy the images into the source"
    return "symlinked folder not followed (it could repeat or loop); copy the images into the source"


def _regular_file_size(root: Path, path: Path) -> int | str:
    """Size of the file (following a symlink only to a target inside the source), or a skip reason."""
    try:
        if path.is_symlink():
            target = path.resolve(strict=True)
            if not target.is_relative_to(root):
                return f"symlink points outside the source ({target}); copy the file into the source"
            info = target.stat()
        else:
            info = path.lstat()
    except FileNotFoundError:
        return "broken symlink (its target does not exist)"
    except RuntimeError:  # Python 3.11 reports symlink loops from resolve(strict=True) this way
        return "symlink loop"
    except OSError as err:
        return "symlink loop" if err.errno == getattr(os, "ELOOP", 40) else f"cannot read: {err.strerror}"
    if not stat.S_ISREG(info.st_mode):
        # FIFOs, sockets and devices would block or stream forever when read.
        return "not a regular file (device, pipe or socket)"
    return info.st_size


def _read_folder_file(source: Path, relpath: str, max_bytes: int) -> bytes:
    root = source.resolve(strict=True)
    if _unsafe_path_reason(relpath):
        raise FileNotFoundError(f"{relpath!r} is not a path inside {source}")
    path = (root / relpath).resolve(strict=True)
    if not path.is_relative_to(root):  # a symlink swapped in after listing must not leak outside files
        raise FileNotFoundError(f"{source}/{relpath} resolves outside the source ({path})")
    # The resolved path names no link: one swapped in now is refused, not followed.
    return read_file(path, max_bytes, follow_symlinks=False, name=relpath)


# ---------------------------------------------------------------------------------------- zips

def _unsafe_path_reason(name: str) -> str | None:
    if name.startswith("/"):
        return "unsafe zip member: absolute path"
    if _DRIVE_LETTER.match(name):
        return "unsafe zip member: Windows drive letter"
    if ".." in name.split("/"):
        return "unsafe zip member: '..' escapes the source root"
    return None


def _member_skip_reason(info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symlink stored in the zip (not followed)"
    if info.flag_bits & 0x1:
        return "encrypted zip member; re-zip without a password"
    return None


def _build_zip_index(archive: zipfile.ZipFile) -> _ZipIndex:
    skipped: list[Skipped] = []
    candidates: list[tuple[list[str], zipfile.ZipInfo]] = []
    junk: list[tuple[list[str], str]] = []
    for info in archive.infolist():
        # Some Windows tools store backslashes; they are separators, and must not hide a '..'.
        name = info.filename.replace("\\", "/")
        if name.endswith("/"):
            continue  # folder records carry no data; their files are listed themselves
        reason = _unsafe_path_reason(name)
        if reason:
            skipped.append(Skipped(info.filename, reason))
            continue
        parts = [p for p in name.split("/") if p not in ("", ".")]
        reason = (next((r for part in parts if (r := junk_reason(part) or _name_reason(part))), None)
                  or _member_skip_reason(info))
        if reason:
            junk.append((parts, reason))
        else:
            candidates.append((parts, info))

    wrapper = _single_wrapper_folder([parts for parts, _ in candidates])
    if wrapper:
        log.info("%s: every file is inside the folder '%s/'; paths are taken relative to it", archive.filename, wrapper)
    members: dict[str, zipfile.ZipInfo] = {}
    for parts, info in candidates:
        relpath = _unwrapped("/".join(parts), wrapper)
        if relpath in members:
            skipped.append(Skipped(info.filename, f"duplicate member name in the zip (same path as "
                                                  f"{members[relpath].filename!r})"))
        else:
            members[relpath] = info
    skipped.extend(Skipped(_unwrapped("/".join(parts), wrapper), reason) for parts, reason in junk)
    return _ZipIndex(members=dict(sorted(members.items())), skipped=skipped)


def _single_wrapper_folder(paths: list[list[str]]) -> str | None:
    """The one top-level folder a dataset sits in (`CMIL/<class>/x.png`), else None; folders and zips alike.

    `paths` are the files kept after junk (`__MACOSX/`, hidden files) is set aside. A source holding
    only `<class>/x.png` files is not wrapped: its single folder has no subfolders.
    """
    tops = {parts[0] for parts in paths}
    if len(tops) == 1 and all(len(parts) > 1 for parts in paths) and any(len(parts) > 2 for parts in paths):
        return tops.pop()
    return None


def _unwrapped(relpath: str, wrapper: str | None) -> str:
    """`relpath` relative to the wrapper folder; paths outside it (junk beside it) stay as they are."""
    if wrapper and relpath.startswith(wrapper + "/"):
        return relpath[len(wrapper) + 1:]
    return relpath


def _zip_stamp(source: Path) -> tuple[int, int]:
    info = source.stat()
    return info.st_mtime_ns, info.st_size


def _open_zip(source: Path) -> _OpenZip:
    key = (os.getpid(), str(source.resolve()))
    stamp = _zip_stamp(source)
    cached = _open_zips.get(key)
    if cached is not None and cached.stamp == stamp:
        return cached
    if cached is not None:
        cached.archive.close()
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as err:
        raise SourceError(f"{source}: not a folder and not a readable .zip ({err}); set `{PARAM_KEY}` "
                          "to the dataset folder or a valid zip of it") from None
    opened = _OpenZip(archive=archive, index=_build_zip_index(archive), stamp=stamp)
    _evict_old_zips()
    _open_zips[key] = opened
    return opened


def _evict_old_zips() -> None:
    pid = os.getpid()
    while len(_open_zips) >= _MAX_OPEN_ZIPS:
        key = next(iter(_open_zips))
        stale = _open_zips.pop(key)
        if key[0] == pid:  # a forked parent's handle is the parent's to close
            stale.archive.close()


def _zip_index_of(source: Path) -> _ZipIndex:
    if not zipfile.is_zipfile(source):
        raise SourceError(f"{source} is a file but not a .zip; set `{PARAM_KEY}` to the dataset folder "
                          "or a zip of it")
    return _open_zip(source).index


def _read_zip_member(source: Path, relpath: str, max_bytes: int) -> bytes:
    opened = _open_zip(source)
    info = opened.index.members.get(relpath)
    if info is None:
        raise FileNotFoundError(f"{relpath!r} is not a readable member of {source}")
    if info.file_size > max_bytes:  # the declared size: a zip bomb is refused before it inflates
        raise RefusedFileError(f"{relpath}: {info.file_size} bytes, more than the {max_bytes} allowed; not read")
    try:
        with opened.archive.open(info) as member:
            data = _read_at_most(member, max_bytes + 1)  # under the cap it reads to the end, where the CRC is checked
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError) as err:
        raise SourceError(f"{source}: zip member {info.filename!r} cannot be read "
                          f"({type(err).__name__}: {err}); re-create the zip") from None
    if len(data) > max_bytes:
        raise RefusedFileError(f"{relpath}: more than the {max_bytes} allowed bytes (more than it declares); "
                               "not read")
    return data
