"""Policies of eclipse_stream.imageio, on images made in memory with Pillow."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from eclipse_stream.imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    encode_image,
    find_image_key,
)


def _noise(h=24, w=32, c=3, seed=0) -> np.ndarray:
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth(h=32, w=48) -> np.ndarray:
    """A gradient: JPEG reproduces it closely, unlike noise."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], axis=2).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _reopen(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# --- round trips -------------------------------------------------------------------------------------


def test_rgb_png_round_trip_is_exact():
    px = _noise()
    dec = decode_image(_save(Image.fromarray(px), "PNG"))
    assert (dec.mode, dec.format, dec.out_mode, dec.alpha) == ("RGB", "PNG", "RGB", None)
    assert dec.rgb.dtype == np.uint8 and dec.rgb.flags.c_contiguous
    np.testing.assert_array_equal(dec.rgb, px)
    out = _reopen(encode_image(dec.rgb, dec, "png"))
    assert out.format == "PNG" and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), px)


def test_jpg_round_trip_close_and_deterministic():
    px = _smooth()
    dec = decode_image(_save(Image.fromarray(px), "JPEG", quality=95, subsampling=2))
    assert dec.format == "JPEG" and dec.jpeg_subsampling == 2
    a = encode_image(dec.rgb, dec, "jpg")
    assert a == encode_image(dec.rgb.copy(), dec, "jpg")
    out = _reopen(a)
    assert out.format == "JPEG" and JpegImagePlugin.get_sampling(out) == 2  # source subsampling kept
    assert np.abs(np.asarray(out).astype(int) - px.astype(int)).mean() < 3


def test_jpg_from_lossless_source_uses_444():
    dec = decode_image(_save(Image.fromarray(_smooth()), "PNG"))
    assert JpegImagePlugin.get_sampling(_reopen(encode_image(dec.rgb, dec, "jpeg"))) == 0


def test_webp_lossy_and_lossless():
    px = _smooth()
    lossy = decode_image(_save(Image.fromarray(px), "WEBP", quality=90))
    assert lossy.format == "WEBP" and not lossy.webp_lossless
    enc = encode_image(lossy.rgb, lossy, "webp")
    assert enc == encode_image(lossy.rgb, lossy, "webp") and enc[12:16] == b"VP8 "
    assert np.abs(np.asarray(_reopen(enc)).astype(int) - px.astype(int)).mean() < 6

    noise = _noise()
    lossless = decode_image(_save(Image.fromarray(noise), "WEBP", lossless=True))
    assert lossless.webp_lossless
    np.testing.assert_array_equal(lossless.rgb, noise)
    enc = encode_image(lossless.rgb, lossless, "webp")
    np.testing.assert_array_equal(np.asarray(_reopen(enc)), noise)


# --- find_image_key ------------------------------------------------------------------------------------


def test_find_image_key_priority_and_explicit():
    assert IMAGE_EXTENSIONS[:4] == ("jpg", "jpeg", "png", "webp")
    assert find_image_key({"__key__": "a", "png": b"", "jpg": b"", "cls": b"1"}) == "jpg"
    assert find_image_key({"__key__": "a", "webp": b"", "png": b""}) == "png"
    assert find_image_key({"__key__": "a", "cls": b"1", "json": b"{}"}) is None
    assert find_image_key({"__jpg": b""}) is None  # dunder fields are metadata
    assert find_image_key({"jpg": b"", "seg.png": b""}, "seg.png") == "seg.png"


def test_find_image_key_missing_explicit_lists_fields():
    with pytest.raises(ValueError, match=r"'png'.*cls, jpg, json") as ei:
        find_image_key({"__key__": "k", "jpg": b"", "cls": b"", "json": b""}, "png")
    assert "__key__" not in str(ei.value)


# --- decode errors -------------------------------------------------------------------------------------


def test_zero_bytes():
    with pytest.raises(ImageDecodeError, match=r"^empty image field \(0 bytes\)$"):
        decode_image(b"")


def test_garbage_bytes():
    with pytest.raises(ImageDecodeError, match=r"^undecodable image: ") as ei:
        decode_image(b"<html>not an image</html>")
    assert "0x" not in str(ei.value)  # no BytesIO memory address in user-facing text
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated(fmt):
    data = _save(Image.fromarray(_noise(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match=r"^truncated image data: "):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_checked_from_header():
    data = _save(Image.fromarray(_noise(20, 20)), "PNG")
    with pytest.raises(ImageDecodeError) as ei:
        decode_image(data, max_pixels=100)
    assert str(ei.value) == (
        "image is 20 x 20 = 400 pixels, over the limit of 100 (raise --max-pixels to allow it)"
    )
    assert decode_image(data, max_pixels=400).rgb.shape == (20, 20, 3)  # the limit is inclusive
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485


def test_pillow_bomb_limit_and_warning(monkeypatch):
    data = _save(Image.fromarray(_noise(20, 20)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 px: Pillow warns, our limit allows it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data).rgb.shape == (20, 20, 3)
    with pytest.raises(ImageDecodeError, match="over the limit of 399"):
        decode_image(data, max_pixels=399)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 400 > 2 x 150: Pillow itself refuses
    with pytest.raises(ImageDecodeError, match="Pillow's decompression-bomb limit.*cannot go past"):
        decode_image(data)


def test_no_global_pil_state_changed():
    from PIL import ImageFile

    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    decode_image(_save(Image.fromarray(_noise(20, 20)), "PNG"), max_pixels=10**12)
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_16bit_gray_png_is_read_as_8bit_and_says_so():
    wide = np.arange(100, dtype=np.uint16).reshape(10, 10) * 600
    data = _save(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = decode_image(data)
    assert img.converted == "16-bit PNG (gray) read as 8-bit" and img.out_mode == "L"
    assert np.array_equal(img.rgb[..., 0], (wide >> 8).astype(np.uint8))  # the high byte, not clipped at 255
    assert Image.open(io.BytesIO(encode_image(img.rgb, img, "png"))).mode == "L"


def _png16(colour_type: int, channels: int, w: int = 3, h: int = 2) -> tuple[bytes, np.ndarray]:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    values = (0x1234 + 0x101 * np.arange(h * w * channels)).reshape(h, w, channels).astype(">u2")
    rows = b"".join(b"\x00" + values[y].tobytes() for y in range(h))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return data, (values >> 8).astype(np.uint8)


@pytest.mark.parametrize("colour_type, channels, out_mode, kind", [
    (2, 3, "RGB", "RGB"), (6, 4, "RGBA", "RGBA"), (4, 2, "LA", "gray + alpha")])
def test_16bit_colour_png_is_read_as_8bit_and_says_so(colour_type, channels, out_mode, kind):
    """Pillow reads these as 8-bit (the high byte); the decoder now says so instead of refusing them."""
    data, high = _png16(colour_type, channels)
    img = decode_image(data)
    assert img.converted == f"16-bit PNG ({kind}) read as 8-bit" and img.out_mode == out_mode
    colour = high[..., :3] if channels >= 3 else np.repeat(high[..., :1], 3, axis=2)
    assert np.array_equal(img.rgb, colour)
    if channels in (2, 4):
        assert np.array_equal(img.alpha, high[..., -1])
    assert Image.open(io.BytesIO(encode_image(img.rgb, img, "png"))).mode == out_mode


def test_8bit_images_are_not_marked_converted():
    assert decode_image(_save(Image.fromarray(_noise(8, 8)), "PNG")).converted is None


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_modes_refused(mode):
    data = _save(Image.new(mode, (4, 4)), "TIFF")
    with pytest.raises(ImageDecodeError, match=rf"32-bit .*\(mode {mode}\) is not supported"):
        decode_image(data)


def test_animated_refused():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError, match=r"2 frames.*first frame"):
        decode_image(buf.getvalue())


# --- modes ---------------------------------------------------------------------------------------------


def test_gray_l_round_trip():
    gray = _noise(c=1)
    dec = decode_image(_save(Image.fromarray(gray), "PNG"))
    assert (dec.mode, dec.out_mode, dec.alpha) == ("L", "L", None)
    for c in range(3):
        np.testing.assert_array_equal(dec.rgb[..., c], gray)
    out = _reopen(encode_image(dec.rgb, dec, "png"))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), gray)  # luma of equal channels is the gray value


def test_bilevel_is_gray():
    dec = decode_image(_save(Image.fromarray(_noise(c=1) > 127), "PNG"))
    assert (dec.mode, dec.out_mode) == ("1", "L")
    assert set(np.unique(dec.rgb)) <= {0, 255}


def test_rgba_alpha_preserved_exactly_through_png():
    px = _noise(c=4, seed=1)
    dec = decode_image(_save(Image.fromarray(px), "PNG"))
    assert (dec.mode, dec.out_mode) == ("RGBA", "RGBA")
    np.testing.assert_array_equal(dec.alpha, px[..., 3])
    np.testing.assert_array_equal(dec.rgb, px[..., :3])
    purified = 255 - dec.rgb
    out = _reopen(encode_image(purified, dec, "png"))
    assert out.mode == "RGBA"
    got = np.asarray(out)
    np.testing.assert_array_equal(got[..., 3], px[..., 3])
    np.testing.assert_array_equal(got[..., :3], purified)


def test_la_round_trip():
    px = _noise(c=2, seed=2)
    la = Image.merge("LA", [Image.fromarray(px[..., 0]), Image.fromarray(px[..., 1])])
    dec = decode_image(_save(la, "PNG"))
    assert (dec.mode, dec.out_mode) == ("LA", "LA")
    np.testing.assert_array_equal(dec.rgb[..., 1], px[..., 0])
    np.testing.assert_array_equal(dec.alpha, px[..., 1])
    out = _reopen(encode_image(dec.rgb, dec, "png"))
    assert out.mode == "LA"
    np.testing.assert_array_equal(np.asarray(out), px)


def _palette_image() -> Image.Image:
    im = Image.new("P", (6, 4))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    im.putdata([i % 3 for i in range(24)])
    return im


def test_palette_without_transparency():
    dec = decode_image(_save(_palette_image(), "PNG"))
    assert (dec.mode, dec.out_mode, dec.alpha) == ("P", "RGB", None)
    assert tuple(dec.rgb[0, 0]) == (255, 0, 0) and tuple(dec.rgb[0, 1]) == (0, 255, 0)
    assert _reopen(encode_image(dec.rgb, dec, "png")).mode == "RGB"


def test_palette_with_transparency():
    dec = decode_image(_save(_palette_image(), "PNG", transparency=1))
    assert (dec.mode, dec.out_mode) == ("P", "RGBA")
    assert dec.alpha[0, 1] == 0 and dec.alpha[0, 0] == 255  # index 1 is the transparent one
    out = _reopen(encode_image(dec.rgb, dec, "png"))
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3], dec.alpha)


def test_cmyk_jpeg_written_as_rgb():
    red_ink = Image.new("CMYK", (16, 8), (0, 255, 255, 0))
    data = _save(red_ink, "JPEG", quality=95, icc_profile=b"fake-cmyk-profile")
    dec = decode_image(data)
    assert (dec.mode, dec.format, dec.out_mode) == ("CMYK", "JPEG", "RGB")
    assert dec.rgb.shape == (8, 16, 3) and dec.rgb[..., 0].mean() > 200 and dec.rgb[..., 1].mean() < 50
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == b"fake-cmyk-profile"
    assert "icc_profile" not in dec.info  # it describes CMYK, not the RGB we write
    assert _reopen(encode_image(dec.rgb, dec, "jpg")).mode == "RGB"


def test_jpeg_with_alpha_refused_on_encode():
    dec = decode_image(_save(Image.fromarray(_noise(c=4)), "PNG"))  # PNG bytes under a .jpg field
    with pytest.raises(ValueError, match="cannot write a RGBA image .* as JPEG"):
        encode_image(dec.rgb, dec, "jpg")


# --- metadata and resizing -----------------------------------------------------------------------------


def test_exif_orientation_carried_and_not_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    icc = b"fake-icc-profile-bytes"
    px = _smooth(16, 40)
    dec = decode_image(_save(Image.fromarray(px), "JPEG", exif=exif, icc_profile=icc, dpi=(300, 300)))
    assert dec.rgb.shape == (16, 40, 3)  # stored orientation, not rotated
    out = _reopen(encode_image(dec.rgb, dec, "jpg"))
    assert out.size == (40, 16)
    assert out.getexif()[0x0112] == 6
    assert out.info["icc_profile"] == icc and out.info["dpi"] == (300, 300)
    png = _reopen(encode_image(dec.rgb, dec, "png"))  # and across formats
    assert png.getexif()[0x0112] == 6


def test_alpha_resized_when_rgb_size_differs():
    alpha = np.zeros((10, 10), np.uint8)
    alpha[:, 5:] = 255
    rgba = np.dstack([_noise(10, 10), alpha])
    dec = decode_image(_save(Image.fromarray(rgba), "PNG"))
    out = np.asarray(_reopen(encode_image(np.zeros((20, 30, 3), np.uint8), dec, "png")))
    assert out.shape == (20, 30, 4)
    expected = np.asarray(Image.fromarray(alpha).resize((30, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[..., 3], expected)
    assert out[0, 0, 3] == 0 and out[0, -1, 3] == 255


def test_encode_rejects_bad_input():
    dec = decode_image(_save(Image.fromarray(_noise()), "PNG"))
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        encode_image(dec.rgb.astype(np.float32), dec, "png")
    with pytest.raises(ValueError, match="names no image format"):
        encode_image(dec.rgb, dec, "cls")
