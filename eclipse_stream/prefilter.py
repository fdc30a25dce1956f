"""Impulse filter: the pre-diffusion stage that removes what Gaussian noise cannot.

ECLIPSE's argument is that noise of std sigma absorbs any perturbation that is small
*per pixel*. A sparse, large-magnitude perturbation (the one-pixel shortcut: one pixel
per image set to an extreme colour, the same position and colour for a whole class)
survives noise of std 0.05 untouched, and the denoiser, which has learned that images
are mostly smooth but also contain sharp details, gives it back.

The filter here is a *switching* median filter (Sun & Neuvo 1994; the detector of
Chen & Wu's adaptive centre-weighted filters): a pixel is replaced only when it is an
isolated impulse, i.e. its colour differs by more than ``threshold`` (L-inf over the
channels, in [0, 1] units) from **every one** of its 8 neighbours. It is then replaced by
the per-channel median of those neighbours. Edges, thin lines and texture keep at least
one similar neighbour and pass unchanged, so clean images are almost untouched (measured
in docs/evaluation.md), while an isolated extreme pixel is always caught. Borders use
reflected neighbours (the pixel itself is never its own neighbour). An image in which more
than ``MAX_IMPULSE_FRACTION`` (2%) of the pixels are isolated is noise-like texture, not a
sparse perturbation, and is left unchanged: the filter is for sparse impulses only.

It is deterministic, elementwise over the batch, and runs on the batch's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .defaults import DEFAULT_IMPULSE_THRESHOLD, PREFILTERS

__all__ = ["DEFAULT_IMPULSE_THRESHOLD", "MAX_IMPULSE_FRACTION", "PREFILTERS", "impulse_filter", "impulse_filter_strips",
           "impulse_mask"]

MAX_IMPULSE_FRACTION = 0.02  # an image with more isolated pixels than this is texture, not a sparse poison


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """(8, N, C, H, W): the 8-neighbourhood of every pixel, borders reflected."""
    h, w = x.shape[-2:]
    return _shifted(_padded(x), h, w)


def _padded(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) < 2:
        raise ValueError(f"the impulse filter needs images of at least 2x2 pixels, got {h}x{w}")
    return F.pad(x, (1, 1, 1, 1), mode="reflect")


def _shifted(p: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(8, N, C, h, w): the 8 neighbours of the pixels of ``p`` without its 1-pixel frame."""
    return torch.stack([p[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)])


def impulse_mask(x: torch.Tensor, threshold: float = DEFAULT_IMPULSE_THRESHOLD,
                 max_fraction: float = MAX_IMPULSE_FRACTION) -> torch.Tensor:
    """(N, H, W) bool: the pixels the filter replaces.

    Pixels farther than ``threshold`` (L-inf, [0, 1] units) from all 8 neighbours, in images
    where such pixels are at most ``max_fraction`` of all. ``x`` is a float NCHW batch in [0, 1].
    """
    return _isolated(x, _neighbours(x), threshold, max_fraction)


def _isolated(x: torch.Tensor, neighbours: torch.Tensor, threshold: float, max_fraction: float) -> torch.Tensor:
    distance = (neighbours - x.unsqueeze(0)).abs().amax(dim=2)  # (8, N, H, W)
    isolated = distance.amin(dim=0) > threshold
    sparse = isolated.float().mean(dim=(1, 2)) <= max_fraction
    return isolated & sparse[:, None, None]


def impulse_filter(x: torch.Tensor, threshold: float = DEFAULT_IMPULSE_THRESHOLD,
                   max_fraction: float = MAX_IMPULSE_FRACTION) -> torch.Tensor:
    """Replace isolated impulses of a float NCHW batch in [0, 1] by their neighbours' median."""
    neighbours = _neighbours(x)
    isolated = _isolated(x, neighbours, threshold, max_fraction)
    ordered = neighbours.sort(dim=0).values
    median = (ordered[3] + ordered[4]) / 2  # the median of 8 values: mean of the middle two
    return torch.where(isolated.unsqueeze(1), median, x)


def impulse_filter_strips(x: torch.Tensor, threshold: float = DEFAULT_IMPULSE_THRESHOLD,
                          max_fraction: float = MAX_IMPULSE_FRACTION, strip_pixels: int = 1 << 16,
                          inplace: bool = False) -> torch.Tensor:
    """:func:`impulse_filter`, computed in strips of rows of about ``strip_pixels`` pixels (for large images).

    The same values bit for bit: each strip sees its neighbours through a 1-pixel halo of the whole image's
    reflected padding, the sparse-image test counts the whole image's isolated pixels as :func:`impulse_filter`
    does, and medians are computed only in strips that have a pixel to replace. Memory: a few copies of the
    image, not the 8 shifted copies (and their sort) of the whole image. ``inplace``: write into ``x``.
    """
    h, w = x.shape[-2:]
    if h * w <= strip_pixels:
        return impulse_filter(x, threshold, max_fraction)
    p, step = _padded(x), max(1, strip_pixels // w)
    strips = [(a, min(h, a + step)) for a in range(0, h, step)]
    isolated = torch.empty((x.shape[0], h, w), dtype=torch.bool, device=x.device)
    for a, b in strips:
        distance = (_shifted(p[..., a:b + 2, :], b - a, w) - x[..., a:b, :].unsqueeze(0)).abs().amax(dim=2)
        isolated[:, a:b] = distance.amin(dim=0) > threshold
    isolated &= (isolated.float().mean(dim=(1, 2)) <= max_fraction)[:, None, None]
    out = x if inplace else x.clone()  # strips read the padded copy only, so writing into x is safe
    for a, b in strips:
        mask = isolated[:, a:b]
        if mask.any():
            ordered = _shifted(p[..., a:b + 2, :], b - a, w).sort(dim=0).values
            out[..., a:b, :] = torch.where(mask.unsqueeze(1), (ordered[3] + ordered[4]) / 2, p[..., a + 1:b + 1, 1:-1])
    return out
