"""The resolution policy and bucketing: which images of a shard go to the device together.

Batches are formed per shard, in a fixed way from the shard's own images, so they (and the noise drawn for
them) never depend on the number of reader workers, processes or GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

__all__ = ["Bucketer", "resize_for_model"]


def resize_for_model(rgb: np.ndarray, size: int) -> np.ndarray:
    """'model' resolution: shorter side to the denoiser's size, aspect ratio kept (bicubic)."""
    h, w = rgb.shape[:2]
    if min(h, w) == size:
        return rgb
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC))


class Bucketer:
    """Groups a shard's images by padded size into batches, deterministically.

    Each image is edge-padded to a multiple of ``multiple`` in both sides; images of the same padded size share
    a bucket. A bucket is emitted when it holds ``batch_size`` images or ``max_batch_pixels`` pixels; if more
    than ``max_pending`` images wait in all buckets, the bucket holding the oldest image (smallest
    ``item.index``) is emitted early, so a shard of all-different sizes keeps memory bounded. :meth:`flush`
    emits what is left, oldest first. A batch is ``(items, pixels)``: the items in the order they were added
    and a uint8 N x 3 x H x W tensor.

    ``tiled = (tile_size, pixels)``: buckets of a padded size with a side longer than ``tile_size`` (images the
    purifier tiles, one by one, so batching does not change their bytes) are emitted before they would pass
    ``pixels`` pixels (a batch of one image may), so that batches of large images hold no more pixels than
    batches of small ones.
    """

    def __init__(self, batch_size: int, multiple: int, max_batch_pixels: int, max_pending: int,
                 tiled: tuple[int, int] | None = None):
        self.batch_size, self.multiple = batch_size, multiple
        self.max_batch_pixels, self.max_pending = max_batch_pixels, max_pending
        self.tiled = tiled
        self.buckets: dict[tuple[int, int], list] = {}
        self.pending = 0

    def padded(self, h: int, w: int) -> tuple[int, int]:
        m = self.multiple
        return -(-h // m) * m, -(-w // m) * m

    def is_full(self, size: tuple[int, int], count: int) -> bool:
        """Whether a bucket of ``count`` images of this padded size is emitted."""
        pixels = size[0] * size[1]
        if count >= self.batch_size:
            return True
        if self.tiled is not None and max(size) > self.tiled[0]:
            return (count + 1) * pixels > self.tiled[1]  # one more would pass the bound
        return count * pixels >= self.max_batch_pixels

    def add(self, item, rgb: np.ndarray) -> Iterator[tuple[list, torch.Tensor]]:
        size = self.padded(*rgb.shape[:2])
        bucket = self.buckets.setdefault(size, [])
        bucket.append((item, rgb))
        self.pending += 1
        if self.is_full(size, len(bucket)):
            yield self._emit(size)
        elif self.pending > self.max_pending:
            yield self._emit(self._oldest())

    def flush(self) -> Iterator[tuple[list, torch.Tensor]]:
        while self.buckets:
            yield self._emit(self._oldest())

    def _oldest(self) -> tuple[int, int]:
        return min(self.buckets, key=lambda s: self.buckets[s][0][0].index)

    def _emit(self, size: tuple[int, int]) -> tuple[list, torch.Tensor]:
        entries = self.buckets.pop(size)
        self.pending -= len(entries)
        ph, pw = size
        pixels = np.empty((len(entries), ph, pw, 3), np.uint8)
        for out, (_, rgb) in zip(pixels, entries):  # edge padding, as np.pad(mode="edge"), without its overhead
            h, w = rgb.shape[:2]
            out[:h, :w] = rgb
            out[:h, w:] = rgb[:, w - 1:w]
            out[h:] = out[h - 1:h]
        return [item for item, _ in entries], torch.from_numpy(pixels).permute(0, 3, 1, 2)
