"""What the reader workers send to the main process about one shard, in order:

``ShardStarted``, then any of ``Batch`` / ``Rejected`` / ``Members``, then ``ShardEnded`` -- or
``ShardFailed`` where the shard turns out unreadable (then nothing more comes for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .formats import Image

__all__ = ["Batch", "Item", "Members", "Rejected", "ShardEnded", "ShardFailed", "ShardStarted"]


@dataclass
class Item:
    """One image field in a batch, and where it goes: step ``index`` of the shard (sample ``sample_no``,
    ``key``), one of the sample's ``parts`` image fields. The first part carries the sample's other fields."""

    index: int
    sample_no: int
    key: str
    image: Image  # its ``rgb`` travels in the batch tensor (None here)
    parts: int
    size: tuple[int, int]  # the image's own height and width (before padding)
    fields: dict | None = None
    label: str | None = None  # the sample's class label as text, read only when purify deblurs by class


@dataclass
class ShardStarted:
    shard: int
    input_stat: dict | None  # size and mtime when the reader opened it


@dataclass
class Batch:
    """``pixels``: uint8 N x H x W x 3 numpy (edge-padded), so it travels inside the event's pickle: a tensor
    would be passed through shared memory, one file descriptor and a socket round trip per batch."""

    shard: int
    batch_no: int
    items: list[Item]
    pixels: np.ndarray | torch.Tensor

    def tensor(self) -> torch.Tensor:
        """The batch as the purifier takes it: uint8 N x 3 x H x W (a view, no copy)."""
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels
        return torch.from_numpy(self.pixels).permute(0, 3, 1, 2)

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this, in its pinning thread
        self.pixels = self.tensor().pin_memory()
        return self


@dataclass
class Rejected:
    shard: int
    index: int
    sample_no: int
    key: str
    reason: str


@dataclass
class Members:
    shard: int
    index: int
    members: list


@dataclass
class ShardEnded:
    shard: int
    count: int  # steps in the shard (samples + member groups)


@dataclass
class ShardFailed:
    shard: int
    reason: str
