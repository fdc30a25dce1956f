"""Corruption compensation C(x; p, sigma) (ECLIPSE Eq. 13): random grayscale, then Gaussian noise.

With probability ``p`` an image becomes its luma (ITU-R 601 weights, torchvision's
``rgb_to_grayscale``) replicated to 3 channels; then N(0, sigma^2) noise is added in
[0, 1] pixel units and the result clamped. The paper applies it once; the reference code
applies it afresh every time an image is read (per epoch), which is what
:class:`RandomCorruption` and :func:`corrupt_samples` do. ``purify --corruption baked``
applies one fixed draw and stores it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import rgb_to_grayscale
from webdataset.filters import pipelinefilter

__all__ = ["DEFAULT_GRAY_P", "DEFAULT_SIGMA", "RandomCorruption", "corrupt", "corrupt_samples"]

from .defaults import DEFAULT_GRAY_P, DEFAULT_SIGMA  # noqa: E402


def _check(p: float, sigma: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"grayscale probability must be in [0, 1], got {p}")
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")


def corrupt(x: torch.Tensor, p: float = DEFAULT_GRAY_P, sigma: float = DEFAULT_SIGMA,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupt a float batch in [0, 1], shape (N, 3, H, W) or (3, H, W); one draw per image."""
    _check(p, sigma)
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an RGB batch (N, 3, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    gray = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    x = torch.where(gray[:, None, None, None], rgb_to_grayscale(x, num_output_channels=3), x)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
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
                 generator: torch.Generator | None = None):
        super().__init__()
        _check(p, sigma)
        self.p, self.sigma, self.generator = p, sigma, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit, was_uint8 = _to_unit(x)
        return _from_unit(corrupt(unit, self.p, self.sigma, self.generator), was_uint8, x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, sigma={self.sigma}"


def _corrupt_value(value, p, sigma, generator):
    """Corrupt one decoded image of whatever type a WebDataset decoder produced; keep that type."""
    if isinstance(value, Image.Image):
        arr = torch.from_numpy(np.array(value.convert("RGB"))).permute(2, 0, 1)
        out = corrupt(arr.float() / 255.0, p, sigma, generator)
        return Image.fromarray((out * 255).round().byte().permute(1, 2, 0).numpy())
    if isinstance(value, np.ndarray):  # HWC, uint8 or float in [0, 1]
        t = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
        unit, was_uint8 = _to_unit(t)
        out = _from_unit(corrupt(unit, p, sigma, generator), was_uint8, t.dtype)
        return out.permute(1, 2, 0).numpy()
    if torch.is_tensor(value):  # CHW
        unit, was_uint8 = _to_unit(value)
        return _from_unit(corrupt(unit, p, sigma, generator), was_uint8, value.dtype)
    raise TypeError(f"cannot corrupt a {type(value).__name__}; decode images first (e.g. .decode('pil'))")


def _corrupt_samples(data, p: float = DEFAULT_GRAY_P, sigma: float = DEFAULT_SIGMA,
                     image_key: str = "jpg;jpeg;png;webp", seed: int | None = None):
    """WebDataset stage: corrupt each decoded sample's image afresh; other fields untouched."""
    _check(p, sigma)
    keys = image_key.split(";")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for sample in data:
        key = next((k for k in keys if k in sample), None)
        if key is not None:
            sample = {**sample, key: _corrupt_value(sample[key], p, sigma, generator)}
        yield sample


corrupt_samples = pipelinefilter(_corrupt_samples)
