"""A corpus of the messy inputs real dataset folders contain, written on the fly for the tests.

`image_cases()` gives single files with the outcome the decoder must produce; `write_messy_dataset()`
lays out a whole CMIL-style folder (good images, every bad image, junk, duplicates, symlinks) and
returns what ingest must do with each file; the zip and csv helpers build hostile archives and
label files.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

POSITIVE = "globally_sclerotic_glomeruli"
NEGATIVE = "non_globally_sclerotic_glomeruli"
CLASS_DIRS = {POSITIVE: 1, NEGATIVE: 0}
GROUP_REGEX = r"^(?P<group>.+?)_PAS_"

ACCEPTED, UNREADABLE, TOO_LARGE = "rgb", "unreadable", "too large"


@dataclass(frozen=True)
class ImageCase:
    name: str                      # file name, as written into a class folder
    data: bytes
    outcome: str                   # ACCEPTED, UNREADABLE or TOO_LARGE
    shape: tuple[int, int] | None  # (height, width) of the decoded image when accepted
    reason: str = ""               # text the error (and the ingest skip reason) must contain


# ---------------------------------------------------------------------------------------- encoders

def random_rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode_cv2(array: np.ndarray, ext: str) -> bytes:
    """Encode with OpenCV (channel order BGR/BGRA, as OpenCV expects)."""
    ok, buffer = cv2.imencode(ext, array)
    assert ok, ext
    return buffer.tobytes()


def encode_pil(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def rgba_png(height: int, width: int, seed: int) -> bytes:
    """An opaque 8-bit RGBA PNG like the real CMIL images (distinct content per seed)."""
    rgb = random_rgb(height, width, seed)
    rgba = np.dstack([rgb, np.full((height, width), 255, np.uint8)])
    return encode_pil(Image.fromarray(rgba, "RGBA"), "PNG")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (a decompression bomb's header), with a stub IDAT."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def cmil_name(biopsy: str, k: int, n: int, seed: int) -> str:
    return f"{biopsy}_PAS_{k}of{n}_{seed:024x}.png"


# ---------------------------------------------------------------------------------------- single files

def image_cases() -> list[ImageCase]:
    """Every odd single file, with the decoder's expected outcome."""
    rgb = random_rgb(12, 20, seed=1)
    grey = rgb[:, :, 0]
    valid_png = rgba_png(40, 30, seed=2)
    transparent = np.dstack([rgb, np.tile(np.linspace(0, 255, 20, dtype=np.uint8), (12, 1))])
    deep = (np.random.default_rng(3).integers(0, 65536, (12, 20, 3))).astype(np.uint16)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey_alpha = Image.fromarray(np.dstack([grey, np.full_like(grey, 200)]), "LA")
    return [
        ImageCase("text_file.png", b"this is a text file, not an image\n", UNREADABLE, None, "not an image"),
        ImageCase("zero_bytes.png", b"", UNREADABLE, None, "empty file"),
        ImageCase("truncated.png", valid_png[: len(valid_png) // 2], UNREADABLE, None, "truncated"),
        ImageCase("png_named.jpg", rgba_png(9, 11, seed=4), ACCEPTED, (9, 11)),
        ImageCase("photo.jpg", encode_pil(Image.fromarray(rgb), "JPEG", quality=95), ACCEPTED, (12, 20)),
        ImageCase("scan.tif", encode_pil(Image.fromarray(rgb), "TIFF"), ACCEPTED, (12, 20)),
        ImageCase("bitmap.bmp", encode_pil(Image.fromarray(rgb), "BMP"), ACCEPTED, (12, 20)),
        ImageCase("deep_16bit.png", encode_cv2(deep, ".png"), ACCEPTED, (12, 20)),
        ImageCase("grey.png", encode_pil(Image.fromarray(grey), "PNG"), ACCEPTED, (12, 20)),
        ImageCase("grey_alpha.png", encode_pil(grey_alpha, "PNG"), ACCEPTED, (12, 20)),
        ImageCase("palette.png", encode_pil(palette, "PNG"), ACCEPTED, (12, 20)),
        ImageCase("transparent.png", encode_pil(Image.fromarray(transparent, "RGBA"), "PNG"), ACCEPTED, (12, 20)),
        ImageCase("one_pixel.png", encode_pil(Image.fromarray(rgb[:1, :1]), "PNG"), ACCEPTED, (1, 1)),
        ImageCase("bomb_30000x30000.png", png_with_declared_size(30000, 30000), TOO_LARGE, None, "max_pixels"),
        ImageCase("glom 1 é.png", rgba_png(10, 14, seed=5), ACCEPTED, (10, 14)),
    ]


# ---------------------------------------------------------------------------------------- a whole folder

KEPT = "kept"


def write_messy_dataset(root: Path, outside: Path) -> dict[str, str]:
    """Write a CMIL-style dataset full of problems under `root`; return relpath -> expected outcome.

    The outcome is KEPT, or text the file's skip reason must contain. `outside` is a folder beside
    the dataset that a symlink points into. Returns no entry for the labels csv (none is written).
    """
    pos, neg = root / POSITIVE, root / NEGATIVE
    pos.mkdir(parents=True)
    neg.mkdir(parents=True)
    expected: dict[str, str] = {}

    def write(relpath: str, data: bytes, outcome: str) -> None:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[relpath] = outcome

    # Good images: three biopsies per class, so both classes survive and groups are meaningful.
    for i in range(6):
        write(f"{POSITIVE}/{cmil_name(f'P{i % 3}', i + 1, 6, seed=100 + i)}", rgba_png(24, 30, seed=100 + i), KEPT)
        write(f"{NEGATIVE}/{cmil_name(f'N{i % 3}', i + 1, 6, seed=200 + i)}", rgba_png(30, 24, seed=200 + i), KEPT)

    for case in image_cases():
        write(f"{POSITIVE}/{case.name}", case.data, KEPT if case.outcome == ACCEPTED else case.reason)

    # The same file name in both class folders (different pixels): label is ambiguous.
    write(f"{POSITIVE}/same_name.png", rgba_png(8, 8, seed=300), "name_in_both_classes")
    write(f"{NEGATIVE}/same_name.png", rgba_png(8, 8, seed=301), "name_in_both_classes")
    # Exact duplicates: within a class the first by path is kept; across classes all are dropped.
    twin = rgba_png(16, 16, seed=400)
    write(f"{POSITIVE}/a_original.png", twin, KEPT)
    write(f"{POSITIVE}/b_copy.png", twin, f"duplicate of {POSITIVE}/a_original.png")
    clash = rgba_png(16, 16, seed=401)
    write(f"{POSITIVE}/clash_pos.png", clash, "duplicate with conflicting labels")
    write(f"{NEGATIVE}/clash_neg.png", clash, "duplicate with conflicting labels")

    # OS junk and hidden files.
    write(".DS_Store", b"\x00\x00\x00\x01Bud1", "hidden")
    write(f"{POSITIVE}/.DS_Store", b"\x00\x00\x00\x01Bud1", "hidden")
    write(f"{NEGATIVE}/Thumbs.db", b"\xd0\xcf\x11\xe0", "junk")
    write(f"{NEGATIVE}/desktop.ini", b"[.ShellClassInfo]\r\n", "junk")
    write(f"{NEGATIVE}/._resource_fork.png", b"\x00\x05\x16\x07", "hidden")
    write("__MACOSX/._x.png", b"\x00\x05\x16\x07", "__MACOSX")
    expected.pop("__MACOSX/._x.png")
    expected["__MACOSX"] = "__MACOSX"  # the folder is skipped as a whole
    write(".hidden_folder/inside.png", rgba_png(8, 8, seed=500), "hidden")
    expected.pop(".hidden_folder/inside.png")
    expected[".hidden_folder"] = "hidden"

    # Files outside the class folders.
    write("notes/readme.txt", b"notes", "outside the class folders")
    write(f"{POSITIVE}/nested/deeper.png", rgba_png(8, 8, seed=600), "outside the class folders")

    # Symlinks: a loop, a dangling link, one leaving the dataset, one staying inside it.
    os.symlink("..", pos / "loop", target_is_directory=True)
    expected[f"{POSITIVE}/loop"] = "symlink loop"
    os.symlink("does_not_exist.png", pos / "broken.png")
    expected[f"{POSITIVE}/broken.png"] = "broken symlink"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(rgba_png(8, 8, seed=700))
    os.symlink(outside / "secret.png", pos / "outside_link.png")
    expected[f"{POSITIVE}/outside_link.png"] = "outside the source"
    os.symlink(cmil_name("P0", 1, 6, seed=100), pos / "z_inside_link.png")
    expected[f"{POSITIVE}/z_inside_link.png"] = f"duplicate of {POSITIVE}/{cmil_name('P0', 1, 6, seed=100)}"
    return expected


def write_clean_dataset(root: Path, per_class: int = 4) -> dict[str, bytes]:
    """A small valid CMIL-style folder; returns relpath -> bytes."""
    files = {}
    for i in range(per_class):
        files[f"{POSITIVE}/{cmil_name(f'P{i % 2}', i + 1, per_class, seed=800 + i)}"] = rgba_png(20, 26, seed=800 + i)
        files[f"{NEGATIVE}/{cmil_name(f'N{i % 2}', i + 1, per_class, seed=900 + i)}"] = rgba_png(26, 20, seed=900 + i)
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    return files


@contextlib.contextmanager
def fifo(path: Path, release_after_s: float = 20.0):
    """A named pipe at `path`. A reader that blocks on it (the bug the tests look for) is released with an
    end of file after `release_after_s`, so a regression fails its test instead of hanging the suite."""
    os.mkfifo(path)
    done = threading.Event()

    def release() -> None:
        while not done.wait(release_after_s):
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading, nothing to release
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=release, daemon=True).start()
    try:
        yield path
    finally:
        done.set()


# ---------------------------------------------------------------------------------------- zips

def write_zip(path: Path, members: dict[str, bytes], wrapper: str | None = None) -> Path:
    """Zip `members` (relpath -> bytes), optionally all inside one top-level `wrapper` folder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if wrapper:
            archive.writestr(zipfile.ZipInfo(f"{wrapper}/"), b"")
        for relpath, data in members.items():
            archive.writestr(zipfile.ZipInfo(f"{wrapper}/{relpath}" if wrapper else relpath), data)
    return path


def hostile_zip_members() -> dict[str, str]:
    """Member name -> expected skip reason text, for names that must never be read or written."""
    return {
        "../escape.png": "'..' escapes",
        "/abs.png": "absolute path",
        "C:/drive.png": "drive letter",
        "..\\backslash_escape.png": "'..' escapes",
        f"{POSITIVE}/../../sneaky.png": "'..' escapes",
    }


def add_members(path: Path, members: dict[str, bytes]) -> None:
    """Append raw members (names kept exactly, even hostile ones) to an existing zip."""
    with zipfile.ZipFile(path, "a") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)


def add_macosx_members(path: Path, relpaths: list[str]) -> list[str]:
    """Add the `__MACOSX/._name` resource forks macOS Archive Utility writes; returns their names."""
    names = [f"__MACOSX/{os.path.dirname(r)}/._{os.path.basename(r)}".replace("//", "/") for r in relpaths]
    add_members(path, {name: b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" for name in names})
    return names


def mark_encrypted(path: Path, member: str) -> None:
    """Set the 'encrypted' flag of one member in the central directory (zipfile cannot write encrypted zips)."""
    data = bytearray(path.read_bytes())
    offset = data.find(b"PK\x01\x02")
    while offset != -1:
        name_length = struct.unpack_from("<H", data, offset + 28)[0]
        if data[offset + 46: offset + 46 + name_length].decode("utf-8") == member:
            flags = struct.unpack_from("<H", data, offset + 8)[0]
            struct.pack_into("<H", data, offset + 8, flags | 0x1)
            path.write_bytes(bytes(data))
            return
        offset = data.find(b"PK\x01\x02", offset + 46)
    raise KeyError(member)


def declare_member_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size one member declares in the central directory (a lying zip)."""
    data = bytearray(path.read_bytes())
    offset = data.find(b"PK\x01\x02")
    while offset != -1:
        name_length = struct.unpack_from("<H", data, offset + 28)[0]
        if data[offset + 46: offset + 46 + name_length].decode("utf-8") == member:
            struct.pack_into("<I", data, offset + 24, size)
            path.write_bytes(bytes(data))
            return
        offset = data.find(b"PK\x01\x02", offset + 46)
    raise KeyError(member)


# ---------------------------------------------------------------------------------------- labels csv

def labels_csv(rows: list[tuple[str, str]], bom: bool = False, crlf: bool = False,
               header: str = "name,ground truth") -> bytes:
    """A labels csv; rows are (file name, label text) so invalid labels can be written too."""
    newline = "\r\n" if crlf else "\n"
    text = newline.join([header] + [f"{name},{label}" for name, label in rows]) + newline
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


# ---------------------------------------------------------------------------------------- decoder noise

def png_with_bad_filter(height: int = 8, width: int = 8) -> bytes:
    """A well-formed PNG (valid CRCs, IEND) whose first row names filter type 9: libpng fails while
    decoding and prints `libpng error: bad adaptive filter value` on the C-level stderr."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = b"".join(bytes([9 if y == 0 else 0]) + bytes(range(3 * width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))
