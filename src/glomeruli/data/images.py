"""The one image decoding and preprocessing path, shared by ingest, training and prediction.

Images arrive as bytes (from a folder or a zip). `probe_image` reads only the header so that
oversized images are refused before any pixel is allocated; `decode_rgb` then decodes with
OpenCV and turns every supported layout (grey, grey+alpha, palette, 16-bit, BGR, BGRA) into
HxWx3 uint8 RGB; `resize_and_pad` fits it into the square model input without squashing.

`load_model_input` is the only path from file bytes to model input (decode, fit, normalise the stain,
pad); preprocess (hence training and evaluation) and `glomeruli predict` both call it, so they see the
same pixels. Values stay 0-255: EfficientNetB3 normalises internally. While OpenCV decodes, file
descriptor 2 points at a scratch file (one lock per process), so the native decoders' own lines
(`libpng error: ...`) become part of our message about the file instead of stray stderr noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import tempfile
import threading
import typing
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from glomeruli.core.errors import UserError
from glomeruli.data.stain import NO_NORMALIZATION, StainNormalization, normalize_stain

log = logging.getLogger(__name__)

# Our own `max_pixels` (ingest.max_pixels) is the limit that applies, checked in probe_image before
# any decode. Pillow's built-in bomb check would otherwise warn or refuse at its own fixed limit
# (about 89 Mpx), and Pillow is only used here to read headers, never to decode pixels.
Image.MAX_IMAGE_PIXELS = None

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND_CHUNK = b"IEND\xaeB`\x82"  # chunk type + its fixed CRC
_UINT16_MAX = 65535


class ImageError(UserError, ValueError):
    """A user-caused bad image (empty, corrupt, truncated, too large...): the message names the file."""


class ImageTooLargeError(ImageError):
    """The header declares more pixels than allowed; nothing was decoded."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of the file bytes (finds exact duplicates, ties outputs to inputs)."""
    return hashlib.sha256(data).hexdigest()


def probe_image(data: bytes, name: str, max_pixels: int) -> ImageInfo:
    """Read only the header: size and channel count; refuse empty, non-image or oversized data."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes); re-export or remove it")
    try:
        # Image.open is lazy: it parses the header and allocates no pixel buffer.
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            channels = len(image.getbands())
            image_format = image.format
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (no known image format in its first bytes); "
                         "remove it or replace it with a PNG") from None
    except Exception as err:  # noqa: BLE001 - Pillow plugins raise many types on hostile headers; all mean a bad file
        raise ImageError(f"{name}: unreadable image header ({type(err).__name__}: {err})") from None
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {image_format} header declares {width}x{height} = {width * height} pixels, more than "
            f"ingest.max_pixels = {max_pixels}; downscale the image, or raise ingest.max_pixels if it is genuine")
    return ImageInfo(width=width, height=height, channels=channels)


def decode_rgb(data: bytes, name: str, max_pixels: int,
               background: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Decode image bytes to HxWx3 uint8 RGB; transparent pixels are composited over `background`."""
    return _to_rgb(_decode(data, name, max_pixels), name, background)


def _decode(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Checked decode to uint8 in OpenCV's channel order (grey, grey+alpha, BGR or BGRA)."""
    info = probe_image(data, name, max_pixels)
    _refuse_truncated_png(data, name)
    said: list[str] = []
    try:
        with _decoder_messages_captured(said):
            decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise ImageError(f"{name}: OpenCV failed to decode it ({str(err).strip()})") from None
    if decoded is None:
        detail = f": {'; '.join(said)}" if said else ""
        raise ImageError(f"{name}: corrupt or truncated image (OpenCV could not decode it{detail}); "
                         "re-export the file or remove it")
    for message in said:  # warnings on an image that decoded (e.g. a bad colour profile): not the user's problem
        log.debug("%s: decoder said: %s", name, message)
    if decoded.shape[:2] != (info.height, info.width):
        # A header that disagrees with the pixels could also slip past the max_pixels check.
        raise ImageError(f"{name}: header says {info.width}x{info.height} but the pixels decode as "
                         f"{decoded.shape[1]}x{decoded.shape[0]}; re-export the file")
    return _to_uint8(decoded, name)


# Native decoder libraries (libpng, libjpeg, libtiff) print their own errors and warnings to file
# descriptor 2 (`libpng error: bad adaptive filter value`), beside our message about the file and out
# of reach of Python's sys.stderr and OpenCV's log level. While a decode runs, fd 2 points at a scratch
# file; afterwards the decoder's lines become part of our message, and anything else that reached fd 2
# meanwhile (another thread's output) is written back, so nothing is lost, only delayed. The lock keeps
# two threads of one process from swapping fd 2 at once; worker processes each have their own.
_DECODER_LINE_PREFIXES = ("libpng ", "libjpeg", "libtiff", "TIFFRead", "Corrupt JPEG", "Premature end of JPEG")
_stderr_lock = threading.Lock()
_scratch: dict[int, typing.IO[bytes]] = {}  # pid -> that process's scratch file


def _reset_after_fork() -> None:
    global _stderr_lock
    _stderr_lock = threading.Lock()  # a lock held by another thread at fork time would never be released


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _scratch_fd() -> int:
    pid = os.getpid()
    if pid not in _scratch:  # a forked child must not share its parent's file offset
        _scratch.clear()
        _scratch[pid] = tempfile.TemporaryFile()
    return _scratch[pid].fileno()


@contextlib.contextmanager
def _decoder_messages_captured(messages: list[str]):
    """Run the body with fd 2 redirected; the native decoders' lines are appended to `messages`."""
    with _stderr_lock:
        scratch = _scratch_fd()
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()  # Python's buffered text goes out before the switch, not into the scratch file
        saved = os.dup(2)
        os.dup2(scratch, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured = b""
            if os.lseek(scratch, 0, os.SEEK_CUR):  # something was written: read it, then empty the file
                os.lseek(scratch, 0, os.SEEK_SET)
                while chunk := os.read(scratch, 1 << 16):
                    captured += chunk
                os.ftruncate(scratch, 0)
                os.lseek(scratch, 0, os.SEEK_SET)
    others = []
    for line in captured.decode("utf-8", "replace").splitlines(keepends=True):
        if line.startswith(_DECODER_LINE_PREFIXES):
            messages.append(line.strip().removeprefix("libpng error: ").removeprefix("libpng warning: "))
        else:
            others.append(line)
    if others:
        os.write(2, "".join(others).encode("utf-8", "replace"))


def _refuse_truncated_png(data: bytes, name: str) -> None:
    # OpenCV 4.14 already rejects cut PNGs, but older libpng/OpenCV builds returned the rows they
    # had; an IEND check costs nothing and keeps the guarantee independent of the library version.
    # Searched anywhere, not only at the very end, because trailing bytes after IEND are legal.
    # rfind searches from the end, where IEND sits: microseconds, where `in` scans the whole file.
    if data.startswith(_PNG_SIGNATURE) and data.rfind(_PNG_IEND_CHUNK) < 0:
        raise ImageError(f"{name}: truncated PNG (its IEND end marker is missing); the copy is incomplete, "
                         "copy or download it again")


def _to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # Round, not truncate: 65535 -> 255 and mid-grey stays mid-grey.
        scaled = (image.astype(np.uint32) * 255 + _UINT16_MAX // 2) // _UINT16_MAX
        return scaled.astype(np.uint8)
    raise ImageError(f"{name}: unsupported pixel type {image.dtype} (only 8- and 16-bit images are "
                     "supported); convert it to an 8-bit PNG")


def _to_rgb(image: np.ndarray, name: str, background: tuple[int, int, int]) -> np.ndarray:
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        grey = image.reshape(image.shape[:2])
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if channels == 2:
        grey, alpha = image[:, :, 0], image[:, :, 1]
        colour = np.repeat(grey[:, :, None], 3, axis=2)
        return _composite(colour, alpha, background)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        colour = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)  # on the whole (contiguous) array: a strided view is far slower
        return _composite(colour, image[:, :, 3], background)
    raise ImageError(f"{name}: {channels} colour channels are not supported; convert it to an RGB(A) PNG")


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Alpha-blend over a flat colour in integer arithmetic, so alpha 255 returns the pixels exactly."""
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)  # fully opaque, as the CMIL images are: nothing to blend
    a = alpha.astype(np.uint16)[:, :, None]
    bg = np.asarray(background, dtype=np.uint16).reshape(1, 1, 3)
    # At most 255 * 255 + 127, so uint16 cannot overflow.
    blended = (rgb.astype(np.uint16) * a + bg * (255 - a) + 127) // 255
    return np.ascontiguousarray(blended.astype(np.uint8))


def resize_and_pad(image: np.ndarray, size: int, fill: tuple[int, int, int]) -> np.ndarray:
    """Scale the longer side to `size` keeping the aspect ratio, then pad centred to size x size."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"resize_and_pad expects HxWx3 uint8 RGB, got shape {image.shape} {image.dtype}")
    return _pad(_scale(image, size), size, fill)


def _scale(image: np.ndarray, size: int) -> np.ndarray:
    """The longer side to `size`, aspect ratio kept; any number of channels."""
    if size < 1:
        raise ValueError(f"resize_and_pad: size must be >= 1, got {size}")
    height, width = image.shape[:2]
    longer = max(height, width)
    if longer == size:
        return image
    # Integer round-half-up of side * size / longer: exact and identical on every platform.
    new_width = max(1, (2 * width * size + longer) // (2 * longer))
    new_height = max(1, (2 * height * size + longer) // (2 * longer))
    interpolation = cv2.INTER_AREA if size < longer else cv2.INTER_CUBIC
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def _pad(image: np.ndarray, size: int, fill: tuple[int, int, int]) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = (size - height) // 2, (size - width) // 2
    return cv2.copyMakeBorder(image, top, size - height - top, left, size - width - left, cv2.BORDER_CONSTANT,
                              value=tuple(int(c) for c in fill))


def load_model_input(data: bytes, name: str, size: int, fill: tuple[int, int, int],
                     max_pixels: int, stain: StainNormalization = NO_NORMALIZATION) -> np.ndarray:
    """Bytes -> size x size x 3 uint8 RGB, 0..255 (the model normalises internally); `stain` normalises the
    fitted image before it is padded, so the padding stays `fill`."""
    decoded = _decode(data, name, max_pixels)
    shrinks = max(decoded.shape[:2]) > size
    if shrinks and decoded.ndim == 3 and (decoded.shape[2] == 3 or (decoded.shape[2] == 4 and decoded[:, :, 3].min() == 255)):
        # Opaque colour, as the CMIL PNGs are: shrink first, then reorder the small image's channels.
        # The same pixels (INTER_AREA treats channels alike; tested) for a fraction of the work.
        code = cv2.COLOR_BGR2RGB if decoded.shape[2] == 3 else cv2.COLOR_BGRA2RGB
        fitted = cv2.cvtColor(_scale(decoded, size), code)
    else:
        fitted = _scale(_to_rgb(decoded, name, fill), size)
    return _pad(normalize_stain(fitted, stain), size, fill)
