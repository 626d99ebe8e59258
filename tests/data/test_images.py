"""The shared decoder and preprocessing: every bad input is refused or normalised to RGB uint8."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from badfiles import (ACCEPTED, TOO_LARGE, UNREADABLE, encode_cv2, encode_pil, image_cases, png_with_declared_size,
                      random_rgb, rgba_png)
from glomeruli.data.images import (ImageError, ImageInfo, ImageTooLargeError, content_hash, decode_rgb,
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


def test_a_png_cut_in_half_with_its_end_marker_put_back_is_still_refused():
    # The IEND check cannot see this cut: the decoder's failure must still reach the user as our error, by name.
    data = rgba_png(60, 50, seed=1)
    iend = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    with pytest.raises(ImageError, match=r"x\.png: corrupt or truncated image"):
        decode_rgb(data[: len(data) // 2] + iend, "x.png", MAX_PIXELS)


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


def test_palette_png_gives_each_index_its_palette_colour():
    colours = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 30], [200, 201, 202]], np.uint8)
    indices = np.array([[0, 1, 2, 3, 0], [3, 3, 1, 0, 2]], np.uint8)
    palette = Image.fromarray(indices, "P")
    palette.putpalette(colours.ravel().tolist())
    out = decode_rgb(encode_pil(palette, "PNG"), "p.png", MAX_PIXELS)
    np.testing.assert_array_equal(out, colours[indices])


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
    expected = np.empty((300, 300, 3), np.uint8)
    expected[:] = (1, 2, 3)
    expected[75:225] = 200  # 100 -> 300 wide, so 50 -> 150 high; 75 rows of fill above and below
    np.testing.assert_array_equal(out, expected)


def test_resize_rounds_the_short_side_and_splits_odd_padding():
    out = resize_and_pad(np.full((250, 950, 3), 255, np.uint8), 300, (0, 0, 0))
    content = np.where(out[:, 150, 0] == 255)[0]
    assert len(content) == 79  # 250 * 300 / 950 = 78.9
    assert content.min() == (300 - 79) // 2


def _three_by_three_blocks(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of 3x3 blocks whose mean is a known value but whose centre pixel is not (centre +8, the other
    eight -1): shrinking 3:1 by averaging gives exactly the block values; sampling would give the centres."""
    means = np.random.default_rng(seed).integers(8, 248, (height // 3, width // 3, 3))
    offsets = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]])
    image = np.repeat(np.repeat(means, 3, axis=0), 3, axis=1) + np.tile(offsets, (height // 3, width // 3))[..., None]
    return image.astype(np.uint8), means.astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBA with one transparent pixel"])
def test_an_image_larger_on_both_sides_is_shrunk_by_averaging_without_squashing(mode):
    # 900x600 -> 300x200 content (3:1 on both axes), 50 columns of fill left and right. Opaque colour images
    # take load_model_input's shrink-first path, the transparent one the general path: same pixels.
    rgb, means = _three_by_three_blocks(900, 600, seed=11)
    fill = (9, 8, 7)
    pixels = rgb if mode == "RGB" else np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    if mode == "RGBA with one transparent pixel":
        pixels[0, 0, 3] = 0
    out = load_model_input(encode_pil(Image.fromarray(pixels, mode[:4]), "PNG"), "x.png", size=300, fill=fill,
                           max_pixels=MAX_PIXELS)
    expected = np.empty((300, 300, 3), np.uint8)
    expected[:] = fill
    expected[:, 50:250] = means
    if mode == "RGBA with one transparent pixel":  # the fill replaces one pixel (mean - 1) of the top-left block
        expected[0, 50] = [round((9 * m - (m - 1) + c) / 9) for m, c in zip(means[0, 0].tolist(), fill)]
    np.testing.assert_array_equal(out, expected)


def test_enlarging_keeps_flat_regions_exact_and_edges_sharp():
    # 10x20 -> 150x300: flat halves stay exactly flat away from the edge; the edge is interpolated (not
    # nearest-neighbour blocks) with the small over- and undershoot of cubic interpolation (not linear).
    image = np.empty((10, 20, 3), np.uint8)
    image[:, :10], image[:, 10:] = 50, 200
    out = resize_and_pad(image, 300, (1, 2, 3))
    np.testing.assert_array_equal(out[:75], np.full((75, 300, 3), (1, 2, 3), np.uint8))
    np.testing.assert_array_equal(out[225:], np.full((75, 300, 3), (1, 2, 3), np.uint8))
    content = out[75:225]
    np.testing.assert_array_equal(content[:, :120], np.full((150, 120, 3), 50, np.uint8))
    np.testing.assert_array_equal(content[:, 180:], np.full((150, 120, 3), 200, np.uint8))
    assert (content == content[:1]).all()  # every row alike: nothing vertical happened
    edge = content[0, 120:180, 0].astype(int)
    assert len(set(edge.tolist())) > 20  # a ramp, not a jump
    assert edge.min() < 50 and edge.max() > 200  # cubic's overshoot


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
    out = load_model_input(data, "x.png", size=20, fill=(5, 6, 7), max_pixels=MAX_PIXELS)
    expected = np.empty((20, 20, 3), np.uint8)
    expected[:] = (5, 6, 7)  # padding (columns 0-4 and 15-19) and the transparent bottom half alike
    expected[:10, 5:15] = 250  # not divided by 255: EfficientNet normalises internally
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def _encoded(kind: str, height: int, width: int) -> tuple[bytes, np.ndarray]:
    """(file bytes, the RGB pixels a correct decoder gives with fill (9, 8, 7))."""
    rgb = random_rgb(height, width, seed=12)
    grey = rgb[..., 0]
    fill = np.array([9, 8, 7])
    if kind == "RGB":
        return encode_pil(Image.fromarray(rgb), "PNG"), rgb
    if kind == "RGBA":  # every 7th pixel transparent, every 7th from the 4th half: (c * 128 + fill * 127 + 127) // 255
        alpha = np.full((height, width), 255, np.uint8)
        alpha.flat[::7], alpha.flat[3::7] = 0, 128
        expected = rgb.copy()
        expected[alpha == 0] = fill
        expected[alpha == 128] = (rgb[alpha == 128].astype(int) * 128 + fill * 127 + 127) // 255
        return encode_pil(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), expected
    if kind == "grey":
        return encode_pil(Image.fromarray(grey, "L"), "PNG"), np.dstack([grey] * 3)
    if kind == "grey+alpha":  # every other pixel transparent
        alpha = np.full((height, width), 255, np.uint8)
        alpha.flat[::2] = 0
        expected = np.dstack([grey] * 3)
        expected[alpha == 0] = fill
        return encode_pil(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), expected
    if kind == "16-bit RGB":  # v * 257 is exactly v on 8 bits; OpenCV writes BGR order
        return encode_cv2(np.ascontiguousarray(rgb[..., ::-1]).astype(np.uint16) * 257, ".png"), rgb
    if kind == "16-bit grey":
        return encode_cv2(grey.astype(np.uint16) * 257, ".png"), np.dstack([grey] * 3)
    if kind == "palette":
        colours = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 30]], np.uint8)
        indices = (np.arange(height * width).reshape(height, width) % 3).astype(np.uint8)
        image = Image.fromarray(indices, "P")
        image.putpalette(colours.ravel().tolist())
        return encode_pil(image, "PNG"), colours[indices]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["RGB", "RGBA", "grey", "grey+alpha", "16-bit RGB", "16-bit grey", "palette"])
def test_model_input_of_every_pixel_layout_is_its_rgb_pixels_padded_centred(kind):
    # The longer side is already the target size: no resampling, so every output pixel is known.
    fill = (9, 8, 7)
    data, rgb = _encoded(kind, 6, 10)
    wide = load_model_input(data, "x.png", size=10, fill=fill, max_pixels=MAX_PIXELS)
    expected = np.empty((10, 10, 3), np.uint8)
    expected[:] = fill
    expected[2:8] = rgb  # 4 rows of fill, 2 above and 2 below
    assert wide.dtype == np.uint8
    np.testing.assert_array_equal(wide, expected)

    data, rgb = _encoded(kind, 10, 6)
    tall = load_model_input(data, "x.png", size=10, fill=fill, max_pixels=MAX_PIXELS)
    expected[:] = fill
    expected[:, 2:8] = rgb  # 2 columns of fill left and right
    assert tall.dtype == np.uint8
    np.testing.assert_array_equal(tall, expected)


def test_odd_padding_puts_the_extra_row_below_and_column_right():
    out = load_model_input(encode_pil(Image.fromarray(np.full((5, 10, 3), 100, np.uint8)), "PNG"), "x.png",
                           size=10, fill=(0, 0, 0), max_pixels=MAX_PIXELS)
    assert out[:, 0, 0].tolist() == [0, 0, 100, 100, 100, 100, 100, 0, 0, 0]
    out = load_model_input(encode_pil(Image.fromarray(np.full((10, 5, 3), 100, np.uint8)), "PNG"), "x.png",
                           size=10, fill=(0, 0, 0), max_pixels=MAX_PIXELS)
    assert out[0, :, 0].tolist() == [0, 0, 100, 100, 100, 100, 100, 0, 0, 0]


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
    from glomeruli.data.images import _decoder_messages_captured

    said: list[str] = []
    with _decoder_messages_captured(said):
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\nanother thread's line\n")
    err = capfd.readouterr().err
    assert said == ["iCCP: known incorrect sRGB profile"]
    assert err == "another thread's line\n"
