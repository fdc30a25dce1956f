"""Decode and encode the one image field of a sample that ECLIPSE purifies.

The denoiser only ever sees 8-bit RGB (``H x W x 3`` uint8). Everything else about the stored image
(alpha, grayscale-ness, EXIF, ICC profile, DPI, file format) is either carried around the denoiser and put
back on encode, or refused with a clear reason, so that a purified dataset looks like the original one to
its readers and no sample silently loses information. Pillow does all decoding and encoding; this module
only picks the policy. It changes no global Pillow state (no ``MAX_IMAGE_PIXELS``, no
``LOAD_TRUNCATED_IMAGES``), so it is safe to import into any program.

Policy table (what happens to each kind of input)
-------------------------------------------------

=============================  ============================  =========  ================================
Input                          Denoiser sees                 Written    Notes
=============================  ============================  =========  ================================
0 bytes                        error                         -          "empty image field (0 bytes)"
not an image / garbage         error                         -          "undecodable image: ..."
cut-off data                   error                         -          "truncated image data: ..."
more than ``max_pixels``       error                         -          checked from the header, before
                                                                        any pixel is decoded
animated / multi-frame         error                         -          keeping only frame 1 would drop
                                                                        data silently (MPO camera JPEGs
                                                                        are the exception: frame 1 is
                                                                        the photo, the rest previews)
RGB                            as is                         RGB
L (8-bit gray), 1 (bilevel)    gray copied to 3 channels     L          written back as the luma of the
                                                                        purified RGB (``convert("L")``)
P (palette)                    palette looked up             RGB        not re-paletted (except GIF)
P / L / RGB with transparency  colours + alpha               RGBA / LA  alpha re-attached unchanged
RGBA                           RGB + alpha kept aside        RGBA       alpha re-attached unchanged
LA                             gray copied + alpha aside     LA         alpha re-attached unchanged
PA                             like P with alpha             RGBA
CMYK, YCbCr, LAB, HSV          ``convert("RGB")`` by PIL     RGB        stored back as RGB, and the ICC
                                                                        profile (which describes the old
                                                                        colour space) is dropped
16-bit PNG (any colour type),  the high byte of each value   8-bit,     recorded in
16-bit gray (I;16*)            (gray: ``value >> 8``)        same       ``DecodedImage.converted`` (purify:
                                                             colours    the shard's stats, ``converted``):
                                                                        purification moves every pixel by
                                                                        more than one 8-bit level, so the
                                                                        low byte cannot survive it anyway
32-bit (I, F), 16-bit colour   error                         -          "32-bit integer image (mode I) is
TIFF                                                                    not supported: convert it to 8-bit
                                                                        first" - never cut silently
EXIF orientation tag           pixels NOT rotated            same tag   stored pixels stay as they are;
                                                                        viewers rotate as before
=============================  ============================  =========  ================================

Encoding (``encode_image``) writes the format the field extension names (``jpg`` -> JPEG, ``png`` -> PNG,
...), whatever format the source bytes were in, and carries EXIF, ICC profile and DPI over:

* png: lossless (zlib level 6).
* jpg/jpeg: ``quality=jpeg_quality``. Chroma subsampling is the source's own (4:4:4, 4:2:2 or 4:2:0, read
  from the source JPEG) so re-encoding does not add a coarser chroma loss than the dataset already had;
  for non-JPEG sources it is 4:4:4 (Pillow's own default is 4:2:0 at every quality, which would blur the
  purified colours of an originally lossless image).
* webp: lossless if the source was lossless WebP (told from its ``VP8L`` chunk; Pillow does not report
  it), else lossy at ``quality=jpeg_quality``. WebP has no gray mode: L / LA are stored as RGB / RGBA.
* everything else: Pillow's ``save`` defaults for that format. A mode the format cannot hold (alpha in a
  JPEG, e.g. PNG bytes with transparency stored under ``.jpg``) raises ``ValueError`` rather than dropping
  the alpha.
* If the purified RGB has another size than the source, the kept alpha is resized to it with PIL's
  ``resize(BILINEAR)`` (smooth edges, no new values outside the old range).

Same input, same bytes: every encoder is called with fixed options, nothing time- or thread-dependent.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "ImageDecodeError",
    "decode_image",
    "encode_image",
    "find_image_key",
    "image_fields",
]

#: Field extensions treated as images (defaults.IMAGE_EXTENSIONS, the one list), in auto-detect priority.
#: DEFAULT_MAX_PIXELS: the largest image (width x height) decoded by default. It is Pillow's own hard
#: decompression-bomb limit (2 x ``PIL.Image.MAX_IMAGE_PIXELS`` = 2 x 89_478_485, about 13k x 13k, ~540 MB as
#: RGB): big enough for any real photo, small enough that one hostile sample cannot exhaust memory. Pillow
#: merely *warns* from 89_478_485 pixels on; we replace that warning with this explicit, user-adjustable limit.
from .defaults import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS  # noqa: E402

_GRAY_MODES = ("L", "1")
_RECOLOURED_MODES = ("CMYK", "YCbCr", "LAB", "HSV")  # converted by PIL; their ICC profile no longer fits
_HIGH_DEPTH = {"I": "32-bit integer", "F": "32-bit float"}
_PNG_COLOUR = {0: "gray", 2: "RGB", 3: "palette", 4: "gray + alpha", 6: "RGBA"}  # IHDR colour types


class ImageDecodeError(ValueError):
    """The image field cannot be purified. The text is only the reason; the caller adds shard and key."""


@dataclass
class DecodedImage:
    """One decoded image: the RGB the denoiser sees plus everything needed to write it back alike."""

    rgb: np.ndarray  # uint8 H x W x 3, C-contiguous
    alpha: np.ndarray | None  # uint8 H x W, re-attached unchanged on encode
    mode: str  # original PIL mode ("RGB", "L", "P", "RGBA", "CMYK", ...)
    format: str  # PIL format of the bytes ("JPEG", "PNG", "WEBP", ...)
    out_mode: str  # mode written back: "RGB", "L", "RGBA" or "LA"
    info: dict = field(default_factory=dict)  # exif / icc_profile / dpi, when present
    jpeg_subsampling: int | None = None  # source JPEG's subsampling (0=4:4:4, 1=4:2:2, 2=4:2:0)
    webp_lossless: bool = False  # source was lossless WebP
    converted: str | None = None  # what reading changed, e.g. "16-bit PNG (RGB) read as 8-bit"; else None


def find_image_key(sample: dict, image_key: str | None = None) -> str | None:
    """Return the field of ``sample`` to purify, or None when it has no image field.

    An explicit ``image_key`` must exist (a typo would otherwise pass every sample through unpurified);
    without one, the first of ``IMAGE_EXTENSIONS`` present wins. ``__key__``-style fields are metadata.
    """
    if image_key is not None:
        if image_key not in sample:
            fields = ", ".join(sorted(k for k in sample if not str(k).startswith("__"))) or "(none)"
            raise ValueError(f"sample has no field {image_key!r} (--image-key); its fields are: {fields}")
        return image_key
    keys = {k for k in sample if not str(k).startswith("__")}
    return next((ext for ext in IMAGE_EXTENSIONS if ext in keys), None)


def image_fields(fields: dict, image_key: str | None = None) -> list[str]:
    """Every field of a sample that ``eclipse-stream purify`` purifies, in sorted order.

    ``image_key`` names them (comma-separated; each must exist): other image fields, such as segmentation
    masks, are then left unchanged. Without it, every field whose last extension is one of
    ``IMAGE_EXTENSIONS`` (any case: ``jpg``, ``left.png``, ``JPG``) is an image: a sample is never half
    purified. ``fields`` holds the field names only (no ``__key__``).
    """
    if image_key is not None:
        names = [n.strip() for n in image_key.split(",") if n.strip()]
        missing = [n for n in names if n not in fields]
        if missing or not names:
            listed = ", ".join(sorted(fields)) or "(none)"
            raise ValueError(f"sample has no field {', '.join(map(repr, missing or [image_key]))} (--image-key); "
                             f"its fields are: {listed}")
        return sorted(set(names))
    return sorted(k for k in fields if str(k).rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode one image field following the policy table of this module; raise ImageDecodeError otherwise."""
    if len(data) == 0:
        raise ImageDecodeError("empty image field (0 bytes)")
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's warning (which would fire from 89M pixels on
        # even when the user allowed more). Pillow's hard error still applies; see _bomb_reason.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(_bomb_reason(e, max_pixels)) from None
        except UnidentifiedImageError:
            raise ImageDecodeError(
                f"undecodable image: Pillow cannot identify the format (first bytes {bytes(data[:8])!r})"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise _load_error(e, data) from None
        with im:
            return _decode_opened(im, data, max_pixels)


def _decode_opened(im: Image.Image, data: bytes, max_pixels: int) -> DecodedImage:
    width, height = im.size  # from the header: Image.open has not decoded any pixel yet
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels} "
            "(raise --max-pixels to allow it)"
        )
    mode, fmt = im.mode, im.format or "unknown"
    if mode in _HIGH_DEPTH:
        raise ImageDecodeError(
            f"{_HIGH_DEPTH[mode]} image (mode {mode}) is not supported: convert it to 8-bit first"
        )
    bits = _bits_per_sample(im, data)
    converted = None
    if mode.startswith("I;16") or (fmt == "PNG" and bits == 16):
        # Read as 8-bit, recorded: purification changes every pixel by more than one 8-bit level, so the low
        # byte could not survive it anyway (see the policy table). Pillow keeps the high byte of 16-bit colour
        # PNGs; 16-bit gray (I;16) is shifted the same way here (Pillow's convert("L") would clip it at 255).
        kind = _PNG_COLOUR.get(data[25], mode) if fmt == "PNG" else mode
        converted = f"16-bit {fmt} ({kind}) read as 8-bit"
    elif bits > 8:
        raise ImageDecodeError(f"{bits}-bit image ({fmt} {mode}) is not supported: convert it to 8-bit first")
    try:
        n_frames = getattr(im, "n_frames", 1)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _load_error(e, data) from None
    if n_frames > 1 and fmt != "MPO":
        raise ImageDecodeError(
            f"animated/multi-frame image ({fmt}, {n_frames} frames) is not supported: "
            "keeping only the first frame would silently drop the others"
        )
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(_bomb_reason(e, max_pixels)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _load_error(e, data) from None

    info = {k: im.info[k] for k in ("icc_profile", "dpi") if im.info.get(k)}  # read after load: PNG
    exif = im.info.get("exif")  # chunks after the pixel data only appear then
    if isinstance(exif, bytes) and exif:
        info["exif"] = exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif
    subsampling = None
    if fmt in ("JPEG", "MPO"):
        subsampling = JpegImagePlugin.get_sampling(im)
        subsampling = subsampling if subsampling >= 0 else None

    transparent = "transparency" in im.info
    alpha = None
    if mode.startswith("I;16"):
        wide = np.asarray(im).astype(np.uint16)
        rgb, out_mode = _gray_to_rgb((wide >> 8).astype(np.uint8)), "L"
        if transparent:  # one 16-bit gray value marks the transparent pixels
            alpha, out_mode = np.where(wide == im.info["transparency"], 0, 255).astype(np.uint8), "LA"
    elif mode == "RGBA" and converted and data[25] == 4:  # 16-bit gray + alpha: Pillow reads it as RGBA
        rgba = np.asarray(im)
        rgb, alpha, out_mode = rgba[..., :3], rgba[..., 3], "LA"
    elif mode in _GRAY_MODES and not transparent:
        rgb, out_mode = _gray_to_rgb(im.convert("L")), "L"
    elif mode == "RGB" and not transparent:
        rgb, out_mode = np.asarray(im), "RGB"
    elif mode == "LA" or (mode in _GRAY_MODES and transparent):
        la = np.asarray(im.convert("LA"))
        rgb, alpha, out_mode = _gray_to_rgb(la[..., 0]), la[..., 1], "LA"
    elif mode in ("RGBA", "PA") or (mode in ("P", "RGB") and transparent):
        rgba = np.asarray(im.convert("RGBA"))
        rgb, alpha, out_mode = rgba[..., :3], rgba[..., 3], "RGBA"
    elif mode == "P" or mode in _RECOLOURED_MODES:
        rgb, out_mode = np.asarray(im.convert("RGB")), "RGB"
        if mode in _RECOLOURED_MODES:
            info.pop("icc_profile", None)  # it describes the CMYK/Lab/... data, not the RGB we write
    else:
        raise ImageDecodeError(f"image mode {mode} ({fmt}) is not supported")
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb, dtype=np.uint8),
        alpha=None if alpha is None else np.ascontiguousarray(alpha, dtype=np.uint8),
        mode=mode,
        format=fmt,
        out_mode=out_mode,
        info=info,
        jpeg_subsampling=subsampling,
        webp_lossless=fmt == "WEBP" and _webp_is_lossless(data),
        converted=converted,
    )


def encode_image(rgb: np.ndarray, like: DecodedImage, ext: str, *, jpeg_quality: int = 95) -> bytes:
    """Encode purified ``rgb`` in the format field extension ``ext`` names, shaped like the source ``like``.

    See the module docstring for the per-format choices. ``ext`` may be a compound webdataset key such as
    ``"left.jpg"``; its last part names the format. Raises ValueError for a bad array, an unknown
    extension, or a mode the format cannot store.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 array, got {rgb.dtype} {rgb.shape}")
    suffix = ext.rsplit(".", 1)[-1].lower()
    fmt = Image.registered_extensions().get("." + suffix)
    if fmt is None:
        raise ValueError(f"field extension {ext!r} names no image format Pillow can write")

    img = Image.fromarray(np.ascontiguousarray(rgb))
    if like.out_mode in ("L", "LA"):
        img = img.convert("L")
    if like.out_mode in ("RGBA", "LA"):
        if like.alpha is None:
            raise ValueError(f"out_mode {like.out_mode} needs an alpha channel, but `like.alpha` is None")
        a = Image.fromarray(np.ascontiguousarray(like.alpha))
        if a.size != img.size:
            a = a.resize(img.size, Image.Resampling.BILINEAR)
        img = Image.merge(like.out_mode, (*img.split(), a))

    params = dict(like.info)
    if fmt == "JPEG":
        sub = like.jpeg_subsampling if like.jpeg_subsampling is not None else 0
        params.update(quality=jpeg_quality, subsampling=sub)
    elif fmt == "WEBP":
        if like.webp_lossless:
            params.update(lossless=True, exact=True)
        else:
            params.update(quality=jpeg_quality)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt, **params)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"cannot write a {like.out_mode} image (source {like.format} {like.mode}) as {fmt} "
            f"for field {ext!r}: {e}"
        ) from None
    return buf.getvalue()


def _gray_to_rgb(gray) -> np.ndarray:
    """Copy one gray channel into three: the denoiser is trained on RGB only."""
    return np.repeat(np.asarray(gray)[..., None], 3, axis=2)


def _load_error(e: BaseException, data: bytes) -> ImageDecodeError:
    """Sort a Pillow failure into 'truncated' (the data stops early) or 'undecodable' (anything else)."""
    msg = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "truncat" in msg.lower():
        return ImageDecodeError(f"truncated image data: {msg}")
    if data[:4] == b"RIFF" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        # libwebp only says "could not create decoder object"; the RIFF header tells the real cause
        declared = int.from_bytes(data[4:8], "little") + 8
        return ImageDecodeError(f"truncated image data: {len(data)} of {declared} bytes ({msg})")
    return ImageDecodeError(f"undecodable image: {msg}")


def _bomb_reason(e: BaseException, max_pixels: int) -> str:
    """Pillow refused the image itself (over 2 x MAX_IMAGE_PIXELS) before we could read its size."""
    reason = f"image is over Pillow's decompression-bomb limit ({e})"
    if Image.MAX_IMAGE_PIXELS and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        reason += (
            f"; --max-pixels {max_pixels} cannot go past Pillow's own limit of "
            f"{2 * Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS x 2)"
        )
    return reason


def _bits_per_sample(im: Image.Image, data: bytes) -> int:
    """Bit depth of 16-bit PNG/TIFF colour images, which Pillow would otherwise silently cut to 8 bits."""
    if im.format == "PNG" and data[12:16] == b"IHDR":
        return data[24]
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258) or (8,)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 8


def _webp_is_lossless(data: bytes) -> bool:
    """True when the WebP's image chunk is VP8L (lossless), not VP8 (lossy); Pillow does not report it."""
    pos = 12  # after "RIFF" <size> "WEBP"
    while pos + 8 <= len(data):
        tag = data[pos : pos + 4]
        if tag == b"VP8L":
            return True
        if tag in (b"VP8 ", b"ANMF"):
            return False
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
    return False
