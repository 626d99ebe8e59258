"""The shared decoder and preprocessing: every bad input is refused or normalised to RGB uint8."""

from __future__ import annotations

import hashlib
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from badfiles import (ACCEPTED, TOO_LARGE, UNREADABLE, encode_cv2, encode_pil, image_cases, png_with_declared_size,
                      random_rgb, rgba_png)
from glomeruli.images import (ImageError, ImageInfo, ImageTooLargeError, content_hash, decode_rgb,
                              load_model_input, probe_image, resize_and_pad)

MAX_PIXELS = 40_000_000
CASES = image_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_corpus_file_is_decoded_or_refused_with_its_reason(case):
    if case.outcome == ACCEPTED:
        image = decode_rgb(case.data, case.name, MAX_PIXELS)
        assert image.shape == (*case.shape, 3)
        assert image.dtype == np.uint8 and image.flags.c_contiguous
    else:
        expected = ImageTooLargeError if case.outcome == TOO_LARGE else ImageError
        with pytest.raises(expected, match=case.reason) as err:
            decode_rgb(case.data, case.name, MAX_PIXELS)
        assert case.name in str(err.value)
        assert case.outcome != UNREADABLE or not isinstance(err.value, ImageTooLargeError)


def test_probe_reads_the_header_only():
    data = rgba_png(37, 53, seed=0)
    assert probe_image(data, "x.png", MAX_PIXELS) == ImageInfo(width=53, height=37, channels=4)


def test_a_bomb_header_is_refused_before_any_decode():
    bomb = png_with_declared_size(30000, 30000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match=r"30000x30000 = 900000000 pixels.*ingest.max_pixels"):
        probe_image(bomb, "bomb.png", MAX_PIXELS)
    # Above Pillow's own limit (~179 Mpx raises) our limit is the one that decides.
    assert probe_image(bomb, "bomb.png", 10**9) == ImageInfo(30000, 30000, 4)


def test_the_pixel_limit_is_inclusive():
    data = rgba_png(10, 10, seed=0)
    assert probe_image(data, "x.png", 100).width == 10
    with pytest.raises(ImageTooLargeError):
        decode_rgb(data, "x.png", 99)


def test_truncated_pngs_are_refused_at_every_cut():
    data = rgba_png(60, 50, seed=1)
    for cut in (len(data) // 2, len(data) - 12, len(data) - 1):
        with pytest.raises(ImageError, match="x.png"):
            decode_rgb(data[:cut], "x.png", MAX_PIXELS)


def test_opencv_itself_refuses_a_png_cut_in_half():
    # The IEND check is a safety net; this documents that the pinned OpenCV also refuses it.
    data = rgba_png(60, 50, seed=1)
    assert cv2.imdecode(np.frombuffer(data[: len(data) // 2], np.uint8), cv2.IMREAD_UNCHANGED) is None


def test_truncated_jpeg_is_refused():
    data = encode_pil(Image.fromarray(random_rgb(64, 64, 2)), "JPEG")
    with pytest.raises(ImageError, match="y.jpg"):
        decode_rgb(data[: len(data) // 2], "y.jpg", MAX_PIXELS)


def test_bytes_after_iend_are_allowed():
    data = rgba_png(5, 5, seed=1)
    assert decode_rgb(data + b"trailing junk", "x.png", MAX_PIXELS).shape == (5, 5, 3)


def test_opaque_rgba_gives_exactly_the_rgb_pixels():
    rgb = random_rgb(17, 23, seed=3)
    data = encode_pil(Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA"), "PNG")
    for background in [(0, 0, 0), (255, 255, 255), (12, 200, 7)]:
        np.testing.assert_array_equal(decode_rgb(data, "x.png", MAX_PIXELS, background), rgb)


def test_transparency_is_composited_over_the_background():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = (200, 100, 50)
    rgba[0, :, 3] = (0, 128, 255)
    data = encode_pil(Image.fromarray(rgba, "RGBA"), "PNG")
    out = decode_rgb(data, "x.png", MAX_PIXELS, background=(10, 20, 30))
    np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
    expected_half = [round((c * 128 + b * 127) / 255) for c, b in zip((200, 100, 50), (10, 20, 30))]
    np.testing.assert_array_equal(out[0, 1], expected_half)
    np.testing.assert_array_equal(out[0, 2], (200, 100, 50))


def test_channel_order_is_rgb():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    for data in (encode_pil(Image.fromarray(red), "PNG"), encode_pil(Image.fromarray(red), "BMP"),
                 encode_pil(Image.fromarray(red), "TIFF")):
        np.testing.assert_array_equal(decode_rgb(data, "red", MAX_PIXELS)[0, 0], (255, 0, 0))


def test_sixteen_bit_is_scaled_with_rounding():
    values = np.array([[0, 128, 129, 257, 32767, 32768, 65278, 65535]], np.uint16)
    out = decode_rgb(encode_cv2(values, ".png"), "deep.png", MAX_PIXELS)
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert list(expected[0]) == [0, 0, 1, 1, 127, 128, 254, 255]


def test_sixteen_bit_rgba_is_scaled_and_composited():
    rgba = np.full((2, 2, 4), 65535, np.uint16)
    rgba[..., 0] = 0  # OpenCV order: B=0, G=R=max -> RGB (255, 255, 0)
    out = decode_rgb(encode_cv2(rgba, ".png"), "deep.png", MAX_PIXELS)
    np.testing.assert_array_equal(out[0, 0], (255, 255, 0))


def test_grey_becomes_three_equal_channels():
    grey = random_rgb(6, 7, seed=4)[..., 0]
    out = decode_rgb(encode_pil(Image.fromarray(grey), "PNG"), "g.png", MAX_PIXELS)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)


def test_grey_with_alpha_is_composited():
    la = np.dstack([np.full((2, 2), 100, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)])
    out = decode_rgb(encode_pil(Image.fromarray(la, "LA"), "PNG"), "la.png", MAX_PIXELS, background=(9, 9, 9))
    np.testing.assert_array_equal(out[..., 1], [[9, 100], [100, 9]])


def test_palette_png_matches_its_rgb_conversion():
    palette = Image.fromarray(random_rgb(8, 9, seed=5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    out = decode_rgb(encode_pil(palette, "PNG"), "p.png", MAX_PIXELS)
    np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB")))


def test_format_comes_from_content_not_extension():
    rgb = random_rgb(5, 6, seed=6)
    png = encode_pil(Image.fromarray(rgb), "PNG")
    np.testing.assert_array_equal(decode_rgb(png, "misnamed.jpg", MAX_PIXELS), rgb)


def test_unsupported_pixel_types_are_refused():
    floats = encode_pil(Image.fromarray(np.ones((3, 3), np.float32)), "TIFF")
    with pytest.raises(ImageError, match="unsupported pixel type"):
        decode_rgb(floats, "float.tif", MAX_PIXELS)


# ---------------------------------------------------------------------------------------- resize and pad

def test_resize_keeps_aspect_and_pads_centred():
    image = np.full((50, 100, 3), 200, np.uint8)
    out = resize_and_pad(image, 300, (1, 2, 3))
    assert out.shape == (300, 300, 3) and out.dtype == np.uint8
    rows = np.where((out != (1, 2, 3)).any(axis=2).any(axis=1))[0]
    assert (rows.min(), rows.max()) == (75, 224)  # 150 content rows, 75 padding above and below
    np.testing.assert_array_equal(out[0, 0], (1, 2, 3))
    np.testing.assert_array_equal(out[150, 150], (200, 200, 200))


def test_resize_rounds_the_short_side_and_splits_odd_padding():
    out = resize_and_pad(np.full((250, 950, 3), 255, np.uint8), 300, (0, 0, 0))
    content = np.where(out[:, 150, 0] == 255)[0]
    assert len(content) == 79  # 250 * 300 / 950 = 78.9
    assert content.min() == (300 - 79) // 2


@pytest.mark.parametrize(("shape", "interpolation"), [((600, 400), cv2.INTER_AREA), ((60, 40), cv2.INTER_CUBIC)])
def test_shrinking_uses_area_and_enlarging_cubic(shape, interpolation):
    image = random_rgb(*shape, seed=7)
    out = resize_and_pad(image, 300, (0, 0, 0))
    expected = cv2.resize(image, (200, 300), interpolation=interpolation)
    np.testing.assert_array_equal(out[:, 50:250], expected)


def test_resize_of_a_single_pixel_and_of_the_exact_size():
    one = np.array([[[10, 20, 30]]], np.uint8)
    np.testing.assert_array_equal(resize_and_pad(one, 32, (0, 0, 0)), np.tile(one, (32, 32, 1)))
    exact = random_rgb(32, 32, seed=8)
    np.testing.assert_array_equal(resize_and_pad(exact, 32, (0, 0, 0)), exact)
    thin = resize_and_pad(random_rgb(1, 500, seed=9), 32, (7, 7, 7))
    assert thin.shape == (32, 32, 3)


def test_resize_is_deterministic():
    image = random_rgb(123, 457, seed=10)
    np.testing.assert_array_equal(resize_and_pad(image, 300, (0, 0, 0)), resize_and_pad(image, 300, (0, 0, 0)))


def test_resize_refuses_non_rgb_input():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        resize_and_pad(np.zeros((4, 4), np.uint8), 8, (0, 0, 0))


def test_model_input_stays_in_0_255_and_uses_fill_for_transparency():
    rgba = np.zeros((20, 10, 4), np.uint8)
    rgba[..., :3] = 250
    rgba[:10, :, 3] = 255  # top half opaque, bottom half transparent
    data = encode_pil(Image.fromarray(rgba, "RGBA"), "PNG")
    out = load_model_input(data, "x.png", size=40, fill=(5, 6, 7), max_pixels=MAX_PIXELS)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert out.max() > 1  # not divided by 255 (cubic overshoot at the edge may reach 255)
    np.testing.assert_array_equal(out[39, 20], (5, 6, 7))  # transparent pixel became the fill colour
    np.testing.assert_array_equal(out[5, 20], (250, 250, 250))


def test_content_hash_is_sha256():
    assert content_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("mode,shape", [("RGBA", (950, 700, 4)), ("RGB", (333, 512, 3)), ("RGBA", (301, 300, 4))])
def test_opaque_images_shrunk_before_colour_conversion_give_the_same_pixels(mode, shape):
    # load_model_input resizes opaque colour images before reordering channels (faster); the result
    # must equal the general path: convert at full size, then resize and pad.
    rng = np.random.default_rng(shape[0])
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 255
    pixels[: shape[0] // 3] //= 3  # structure, not only noise
    data = encode_pil(Image.fromarray(pixels, mode), "PNG")
    fast = load_model_input(data, "x.png", size=300, fill=(5, 6, 7), max_pixels=MAX_PIXELS)
    general = resize_and_pad(decode_rgb(data, "x.png", MAX_PIXELS, background=(5, 6, 7)), 300, (5, 6, 7))
    np.testing.assert_array_equal(fast, general)


def test_decoder_lines_are_captured_and_other_output_is_written_back(capfd):
    """While a decode runs, fd 2 is captured: libpng's lines become ours, another writer's text is not lost."""
    from glomeruli.images import _decoder_messages_captured

    said: list[str] = []
    with _decoder_messages_captured(said):
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\nanother thread's line\n")
    err = capfd.readouterr().err
    assert said == ["iCCP: known incorrect sRGB profile"]
    assert err == "another thread's line\n"
