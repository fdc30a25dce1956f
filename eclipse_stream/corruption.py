"""Corruption compensation C(x; p, sigma) (ECLIPSE Eq. 13): random grayscale, then Gaussian noise.

With probability ``p`` an image becomes its luma (ITU-R 601 weights, torchvision's
``rgb_to_grayscale``) replicated to 3 channels; then N(0, sigma^2) noise is added in
[0, 1] pixel units and the result clamped.

Beyond the paper, ``lowfreq_sigma`` adds smooth Gaussian noise (:func:`lowfreq_noise`: one
N(0, lowfreq_sigma^2) value per channel on a 4 x 4 lattice, bilinearly upsampled). White
noise of std sigma averages to sigma/8 over an 8 x 8 patch, too little to hide a patch-wise
shortcut such as LSP, which purification leaves almost untouched (it is low-frequency); the
smooth term does not average away. ``lowfreq_sigma=0`` is the paper's corruption, drawing
exactly the same random numbers. The default (``DEFAULT_LOWFREQ_SIGMA``) is the measured one
(docs/results/cpu-grid.md).

Also beyond the paper, ``jpeg_quality=(lo, hi)`` first JPEG-quantizes each image
(:func:`eclipse_stream.jpegsim.jpeg_quantize`) at a quality drawn uniformly from [lo, hi]. Dense
adversarial poisons (TAP, SEP) pass the one-step purification and the noise almost intact; coarse
DCT quantization, fresh every epoch, rounds most of them away (docs/evaluation.md, "JPEG term").
The default since 2026-12-08 quantizes **luma only** (``DEFAULT_JPEG_CHROMA = False``: the colour is kept
exact) at a quality drawn from ``DEFAULT_JPEG_QUALITY`` = (10, 50): what a victim learns of what purification
leaves of a dense adversarial poison is its luma texture, not its colour, and a JPEG's chroma quantization cost
clean accuracy for nothing there (docs/evaluation.md, "A luma-only JPEG term"). ``jpeg_chroma=True`` quantizes
chroma as a JPEG file does (4:2:0 and the chroma table; with (20, 60), the default from 2026-12-06 to 2026-12-08).
``jpeg_quality=None`` draws nothing; with ``lowfreq_sigma=0`` it is the paper's corruption. The same random
numbers are drawn with either ``jpeg_chroma``.

The paper applies it once; the reference code
applies it afresh every time an image is read (per epoch), which is what
:class:`RandomCorruption` and :func:`corrupt_samples` do. ``purify --corruption baked``
applies one fixed draw of the paper's corruption and stores it (no low-frequency term: a fixed
smooth field would itself be a pattern to learn; use the fresh per-epoch corruption instead).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.functional import rgb_to_grayscale
from webdataset.filters import pipelinefilter

__all__ = ["DEFAULT_GRAY_P", "DEFAULT_JPEG_CHROMA", "DEFAULT_JPEG_QUALITY", "DEFAULT_LOWFREQ_SIGMA", "DEFAULT_SIGMA",
           "RandomCorruption", "corrupt", "corrupt_samples", "lowfreq_noise"]

from .config import check_corruption  # noqa: E402
from .defaults import (DEFAULT_GRAY_P, DEFAULT_JPEG_CHROMA, DEFAULT_JPEG_QUALITY,  # noqa: E402
                       DEFAULT_LOWFREQ_SIGMA, DEFAULT_SIGMA, IMAGE_EXTENSIONS, LOWFREQ_GRID)
from .jpegsim import jpeg_quantize  # noqa: E402

_check = check_corruption  # the one check of these settings, shared with PurifierConfig


def lowfreq_noise(shape, sigma: float, generator: torch.Generator | None = None, device=None,
                  grid: int = LOWFREQ_GRID) -> torch.Tensor:
    """Smooth noise of an (N, C, H, W) batch: N(0, sigma^2) per channel on a grid x grid lattice,
    bilinearly upsampled to (H, W), so each region of about (H/grid) x (W/grid) pixels moves together."""
    n, c, h, w = shape
    coarse = sigma * torch.randn((n, c, grid, grid), device=device, generator=generator)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def corrupt(x: torch.Tensor, p: float = DEFAULT_GRAY_P, sigma: float = DEFAULT_SIGMA,
            generator: torch.Generator | None = None, lowfreq_sigma: float = DEFAULT_LOWFREQ_SIGMA,
            jpeg_quality: tuple[int, int] | None = DEFAULT_JPEG_QUALITY,
            jpeg_chroma: bool = DEFAULT_JPEG_CHROMA) -> torch.Tensor:
    """Corrupt a float batch in [0, 1], shape (N, 3, H, W) or (3, H, W); one draw per image.

    Order: JPEG quantization (quality uniform in ``jpeg_quality``; luma only when ``jpeg_chroma`` is False),
    grayscale, white noise, smooth noise. ``lowfreq_sigma=0, jpeg_quality=None`` is the paper's corruption
    (grayscale, white noise)."""
    _check(p, sigma, lowfreq_sigma, jpeg_quality, jpeg_chroma)
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an RGB batch (N, 3, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    if jpeg_quality is not None:
        lo, hi = jpeg_quality
        quality = torch.randint(lo, hi + 1, (x.shape[0],), device=x.device, generator=generator)
        x = jpeg_quantize(x, quality, chroma=jpeg_chroma)
    gray = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    x = torch.where(gray[:, None, None, None], rgb_to_grayscale(x, num_output_channels=3), x)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
    if lowfreq_sigma > 0:
        x = x + lowfreq_noise(x.shape, lowfreq_sigma, generator, x.device)
    x = x.clamp(0.0, 1.0)
    return x[0] if single else x


def _to_unit(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.dtype == torch.uint8:
        return x.float() / 255.0, True
    if not x.is_floating_point():
        raise TypeError(f"expected a uint8 or floating-point image tensor, got {x.dtype}")
    return x, False


def _from_unit(x: torch.Tensor, was_uint8: bool, dtype: torch.dtype) -> torch.Tensor:
    return (x * 255.0).round().to(torch.uint8) if was_uint8 else x.to(dtype)


class RandomCorruption(nn.Module):
    """Training-time corruption of image batches: a fresh draw per image on every call.

    Accepts uint8 (0..255) or float ([0, 1]) tensors, NCHW or CHW, on any device, and returns
    the same dtype (uint8 results are rounded). Use it after ``ToDevice`` in an FFCV pipeline
    or on batches from a DataLoader.
    """

    def __init__(self, p: float = DEFAULT_GRAY_P, sigma: float = DEFAULT_SIGMA,
                 generator: torch.Generator | None = None, lowfreq_sigma: float = DEFAULT_LOWFREQ_SIGMA,
                 jpeg_quality: tuple[int, int] | None = DEFAULT_JPEG_QUALITY,
                 jpeg_chroma: bool = DEFAULT_JPEG_CHROMA):
        super().__init__()
        jpeg_quality = tuple(jpeg_quality) if isinstance(jpeg_quality, list) else jpeg_quality
        _check(p, sigma, lowfreq_sigma, jpeg_quality, jpeg_chroma)
        self.p, self.sigma, self.generator, self.lowfreq_sigma = p, sigma, generator, lowfreq_sigma
        self.jpeg_quality, self.jpeg_chroma = jpeg_quality, jpeg_chroma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit, was_uint8 = _to_unit(x)
        out = corrupt(unit, self.p, self.sigma, self.generator, self.lowfreq_sigma, self.jpeg_quality,
                      self.jpeg_chroma)
        return _from_unit(out, was_uint8, x.dtype)

    def extra_repr(self) -> str:
        return (f"p={self.p}, sigma={self.sigma}, lowfreq_sigma={self.lowfreq_sigma}, "
                f"jpeg_quality={self.jpeg_quality}, jpeg_chroma={self.jpeg_chroma}")


def _corrupt_value(value, p, sigma, generator, lowfreq_sigma, jpeg_quality, jpeg_chroma):
    """Corrupt one decoded image of whatever type a WebDataset decoder produced; keep that type."""
    if isinstance(value, Image.Image):
        arr = torch.from_numpy(np.array(value.convert("RGB"))).permute(2, 0, 1)
        out = corrupt(arr.float() / 255.0, p, sigma, generator, lowfreq_sigma, jpeg_quality, jpeg_chroma)
        return Image.fromarray((out * 255).round().byte().permute(1, 2, 0).numpy())
    if isinstance(value, np.ndarray):  # HWC, uint8 or float in [0, 1]
        t = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
        unit, was_uint8 = _to_unit(t)
        out = _from_unit(corrupt(unit, p, sigma, generator, lowfreq_sigma, jpeg_quality, jpeg_chroma), was_uint8,
                         t.dtype)
        return out.permute(1, 2, 0).numpy()
    if torch.is_tensor(value):  # CHW
        unit, was_uint8 = _to_unit(value)
        return _from_unit(corrupt(unit, p, sigma, generator, lowfreq_sigma, jpeg_quality, jpeg_chroma), was_uint8,
                          value.dtype)
    raise TypeError(f"cannot corrupt a {type(value).__name__}; decode images first (e.g. .decode('pil'))")


def _corrupt_samples(data, p: float = DEFAULT_GRAY_P, sigma: float = DEFAULT_SIGMA,
                     image_key: str = ";".join(IMAGE_EXTENSIONS), seed: int | None = None,
                     lowfreq_sigma: float = DEFAULT_LOWFREQ_SIGMA,
                     jpeg_quality: tuple[int, int] | None = DEFAULT_JPEG_QUALITY,
                     jpeg_chroma: bool = DEFAULT_JPEG_CHROMA):
    """WebDataset stage: corrupt each decoded sample's image afresh; other fields untouched."""
    jpeg_quality = tuple(jpeg_quality) if isinstance(jpeg_quality, list) else jpeg_quality
    _check(p, sigma, lowfreq_sigma, jpeg_quality, jpeg_chroma)
    keys = image_key.split(";")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for sample in data:
        key = next((k for k in keys if k in sample), None)
        if key is not None:
            sample = {**sample, key: _corrupt_value(sample[key], p, sigma, generator, lowfreq_sigma, jpeg_quality,
                                                    jpeg_chroma)}
        yield sample


corrupt_samples = pipelinefilter(_corrupt_samples)
