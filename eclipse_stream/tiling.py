"""Large images in overlapping tiles: the denoiser sees contexts of the size it was trained on.

A denoiser trained on S x S images (S = 32 for the shipped one) is fully convolutional, so it runs on any
size, but on a large image its attention spans the whole image (cost and memory grow with the square of the
pixel count) and its group norms and attention see a context it never saw in training; measured on real photos
it also removes less noise there than on tiles (docs/large-images.md). The tiled path therefore computes the
denoiser's output (epsilon and the variance interpolation v) on overlapping tiles of S to 2S pixels a side, with
attention inside a tile limited to S-pixel windows, and blends the tiles' outputs with weights that ramp
linearly across each overlap (a partition of unity, as MultiDiffusion and tiled super-resolution blend). The
diffusion chain itself is unchanged: it calls :func:`blended_output` where it would call the UNet.

* :func:`plan_tiles` chooses, per axis, the tile length in [S, 2S] (a multiple of the UNet's downsampling
  factor) and the number of tiles that cover the axis with at least ``overlap`` pixels between neighbours and the
  fewest pixels computed; ties go to the smaller tile. An axis no longer than 2S is one tile.
* :func:`blended_output` runs an image's tiles through the UNet in calls of at most ``batch_pixels`` pixels
  (never mixed with another image's tiles, so an image's result does not depend on its batch) and yields the
  blended output in horizontal bands as soon as no later tile touches them, so that the chain can go on
  band by band and memory stays bounded by the call size plus a few copies of the image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TilePlan", "axis_plan", "blended_output", "plan_tiles"]


def axis_plan(length: int, min_tile: int, max_tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """(tile length, tile starts) along one axis of ``length`` pixels.

    ``length <= max_tile``: one tile, the whole axis. Otherwise, among tile lengths from ``min_tile`` to
    ``max_tile`` in steps of ``multiple``, the one whose tiles, overlapping by at least ``overlap``, cover the axis
    with the fewest pixels computed (ties: the smaller tile). Starts are spread evenly (gaps differ by at most one
    pixel), the first at 0 and the last at ``length - tile``.
    """
    if length <= max_tile:
        return length, [0]
    best = None
    for tile in range(min_tile, max_tile + 1, multiple):
        if tile <= overlap:
            continue
        n = -(-(length - overlap) // (tile - overlap))  # ceil: n tiles with gaps <= tile - overlap
        if best is None or n * tile < best[0]:
            best = (n * tile, tile, n)
    if best is None:
        raise ValueError(f"no tile length in [{min_tile}, {max_tile}] is longer than the overlap {overlap}")
    _, tile, n = best
    return tile, [i * (length - tile) // (n - 1) for i in range(n)]


def _axis_weights(length: int, tile: int, starts: list[int]) -> list[torch.Tensor]:
    """Per tile, its blending weights along the axis (float32, ``tile`` long): a linear ramp across each overlap
    with a neighbour (1 at the image's edges), normalised so the weights of the tiles covering a pixel sum to 1."""
    raw = []
    for i, s in enumerate(starts):
        p = np.arange(tile) + 0.5
        w = np.ones(tile)
        if i > 0 and starts[i - 1] + tile > s:
            w = np.minimum(w, p / (starts[i - 1] + tile - s))
        if i + 1 < len(starts) and s + tile > starts[i + 1]:
            w = np.minimum(w, (tile - p) / (s + tile - starts[i + 1]))
        raw.append(w)
    total = np.zeros(length)
    for s, w in zip(starts, raw):
        total[s:s + tile] += w
    return [torch.from_numpy((w / total[s:s + tile]).astype(np.float32)) for s, w in zip(starts, raw)]


@dataclass(frozen=True)
class TilePlan:
    """How an H x W image is cut: tile height/width, the tiles' top rows and left columns, blending weights."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def tiles(self) -> list[tuple[int, int]]:
        """(row index, column index) of every tile, in raster order."""
        return [(i, j) for i in range(len(self.rows)) for j in range(len(self.cols))]

    @property
    def computed_pixels(self) -> int:
        return len(self.rows) * len(self.cols) * self.tile_h * self.tile_w

    def weights(self, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return ([w.to(device) for w in _axis_weights(self.height, self.tile_h, list(self.rows))],
                [w.to(device) for w in _axis_weights(self.width, self.tile_w, list(self.cols))])


def plan_tiles(height: int, width: int, min_tile: int, max_tile: int, overlap: int, multiple: int) -> TilePlan:
    """The tiles of an image (sides multiples of ``multiple``); see :func:`axis_plan`."""
    th, rows = axis_plan(height, min_tile, max_tile, overlap, multiple)
    tw, cols = axis_plan(width, min_tile, max_tile, overlap, multiple)
    return TilePlan(height, width, th, tw, tuple(rows), tuple(cols))


#: net(tiles (k, C, th, tw), model timesteps (k,)) -> output (k, C', th, tw)
TileNet = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def blended_output(net: TileNet, x: torch.Tensor, t_model: torch.Tensor, plan: TilePlan,
                   batch_pixels: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The net's output on image ``x`` (1, C, H, W), blended over the tiles of ``plan``, in horizontal bands.

    Yields ``(row0, row1, output)``, ``output`` being (1, C', row1 - row0, W) float32, top to bottom, covering
    every row once; a band is yielded as soon as every tile that overlaps it is done. Tiles go to ``net`` in
    raster order, as many per call as fit in ``batch_pixels`` (at least one); the calls depend on the image's size
    and ``batch_pixels`` only. ``t_model`` is the (1,) model timestep.
    """
    wy, wx = plan.weights(x.device)
    th, tw, rows, cols = plan.tile_h, plan.tile_w, plan.rows, plan.cols
    tiles = plan.tiles
    per_call = max(1, batch_pixels // (th * tw))
    acc, top, done = None, 0, 0  # acc: the blended output of rows [top, top + acc rows), not yet yielded
    for k in range(0, len(tiles), per_call):
        chunk = tiles[k:k + per_call]
        inp = torch.cat([x[..., rows[i]:rows[i] + th, cols[j]:cols[j] + tw] for i, j in chunk])
        # channels-last, the layout purify's batches arrive in: CPU convolutions run ~1.4x faster in it
        out = net(inp.contiguous(memory_format=torch.channels_last), t_model.expand(len(chunk)))
        if acc is None:
            acc = out.new_zeros((1, out.shape[1], 0, plan.width), dtype=torch.float32)
        bottom = rows[chunk[-1][0]] + th
        if top + acc.shape[2] < bottom:  # grow the band buffer down to the last tile of this call
            grown = acc.new_zeros((1, acc.shape[1], bottom - top, plan.width))
            grown[:, :, :acc.shape[2]] = acc
            acc = grown
        for (i, j), o in zip(chunk, out):
            y = rows[i] - top
            acc[0, :, y:y + th, cols[j]:cols[j] + tw] += o.float() * (wy[i][:, None] * wx[j][None, :])
        final = rows[tiles[k + per_call][0]] if k + per_call < len(tiles) else plan.height
        if final > done:  # rows above the next tile's top get nothing more
            yield done, final, acc[:, :, :final - top]
            acc, top, done = acc[:, :, final - top:], final, final
