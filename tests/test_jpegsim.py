"""jpegsim: the JPEG-style quantization the training-time corruption uses."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eclipse_stream.jpegsim import _dct_matrix, jpeg_quantize, quant_tables


def _smooth_images(n, h=32, w=32, seed=0):
    """Natural-ish test images: random fields at a few scales (no downloads)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 3, h, w)
    for grid, amp in ((2, 0.3), (4, 0.2), (8, 0.1), (32, 0.04)):
        out += amp * F.interpolate(torch.randn(n, 3, grid, grid, generator=g), size=(h, w), mode="bilinear",
                                   align_corners=False)
    return (out + 0.5).clamp(0, 1).mul(255).round().div(255)


def _pil_jpeg(x, quality):
    out = []
    for img in (x * 255).round().byte().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _rms255(a, b):
    return (a - b).pow(2).mean().sqrt().item() * 255


def test_gray_image_luma_blocks_are_quantized_to_the_table():
    """A gray image has no chroma, so each 8 x 8 block's DCT coefficients must be multiples of the luma table
    (up to the final rounding to 8-bit levels)."""
    x = _smooth_images(6)[:, :1].expand(-1, 3, -1, -1)
    x = (0.5 + 0.3 * (x - 0.5)).mul(255).round().div(255)  # no pixel clamped at 0 or 255 after quantization
    out = jpeg_quantize(x, 10)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1 / 255) and torch.allclose(out[:, 1], out[:, 2], atol=1 / 255)
    luma_t, _ = quant_tables(torch.tensor([10]))
    d = _dct_matrix("cpu", torch.float64)
    y = out[:, 0].double() * 255 - 128
    blocks = y.view(6, 4, 8, 4, 8).permute(0, 1, 3, 2, 4)
    ratio = (d @ blocks @ d.T) / luma_t[0]
    assert (ratio - ratio.round()).abs().max() < 0.15
    assert (ratio.round() == 0).float().mean() > 0.8  # quality 10 keeps few coefficients


def test_matches_libjpeg_statistically():
    """Not bit-exact with PIL/libjpeg, but it removes as much: the error to the original is within 10% of
    PIL's at every quality, and the two outputs are closer to each other than either is to the original."""
    x = _smooth_images(64, seed=1)
    for q in (10, 30, 50, 90):
        ours, pil = jpeg_quantize(x, q), _pil_jpeg(x, q)
        assert abs(_rms255(ours, x) - _rms255(pil, x)) <= 0.1 * _rms255(pil, x) + 0.2, q
        assert _rms255(ours, pil) < _rms255(pil, x), q


def test_lower_quality_removes_more_and_100_is_nearly_lossless():
    x = _smooth_images(16, seed=2)
    errors = [_rms255(jpeg_quantize(x, q), x) for q in (5, 10, 30, 60, 90)]
    assert errors == sorted(errors, reverse=True)
    gray = x[:, :1].expand(-1, 3, -1, -1)  # no chroma, so 4:2:0 subsampling loses nothing
    assert _rms255(jpeg_quantize(gray, 100), gray) < 1.0


def test_one_quality_per_image_and_any_size():
    x = _smooth_images(3, h=20, w=27, seed=3)
    out = jpeg_quantize(x, torch.tensor([10, 50, 90]))
    assert out.shape == x.shape and out.dtype == x.dtype
    for i, q in enumerate((10, 50, 90)):
        assert torch.equal(out[i:i + 1], jpeg_quantize(x[i:i + 1], q))
    half = jpeg_quantize(x.to(torch.bfloat16), 30)
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("shape, quality, match", [((2, 1, 8, 8), 10, "RGB"), ((2, 3, 8, 8), 0, "1..100"),
                                                   ((2, 3, 8, 8), 101, "1..100"), ((2, 3, 8, 8), [10, 20, 30], "one quality")])
def test_bad_input_is_refused(shape, quality, match):
    with pytest.raises(ValueError, match=match):
        jpeg_quantize(torch.rand(shape), quality)


def test_luma_only_quantizes_the_luma_as_a_jpeg_does_and_keeps_the_colour():
    """chroma=False: the luma plane comes out as the full round trip's luma (same table, same blocks), while the
    chroma planes stay the input's (up to 8-bit rounding and clipping), unlike a JPEG's, which loses colour."""
    x = _smooth_images(6)

    def ycc(t):
        r, g, b = (t * 255).unbind(1)
        return (0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b,
                0.5 * r - 0.418688 * g - 0.081312 * b)

    for q in (10, 30, 60):
        luma_only, full = jpeg_quantize(x, q, chroma=False), jpeg_quantize(x, q)
        (y0, cb0, cr0), (y1, cb1, cr1), (y2, cb2, cr2) = ycc(x), ycc(luma_only), ycc(full)
        # the same luma quantization, up to the 8-bit rounding and clipping of the two colours (< 1/255) ...
        assert (y1 - y2).abs().mean() < 1.0
        assert (y1 - y0).abs().mean() > 4.0  # ... and a real one (4.5-7 /255 here)
        colour_kept = torch.stack([cb1 - cb0, cr1 - cr0]).abs().mean()
        colour_lost = torch.stack([cb2 - cb0, cr2 - cr0]).abs().mean()
        assert colour_kept < 0.5 and colour_lost > 6.0
    assert torch.equal(jpeg_quantize(x, 40, chroma=False), jpeg_quantize(x, torch.full((6,), 40), chroma=False))
    odd = torch.rand(2, 3, 13, 21)  # any size: the luma blocks pad to multiples of 8
    assert jpeg_quantize(odd, 20, chroma=False).shape == odd.shape
