"""What the reader workers send to the main process about one shard, in order:

``ShardStarted``, then any of ``Batch`` / ``Rejected`` / ``Members``, then ``ShardEnded`` -- or
``ShardFailed`` where the shard turns out unreadable (then nothing more comes for it).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ShardStarted:
    shard: int
    input_stat: dict | None  # size and mtime when the reader opened it


@dataclass
class Batch:
    shard: int
    batch_no: int
    items: list[Item]
    pixels: torch.Tensor  # uint8 N x 3 x H x W, edge-padded

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this
        self.pixels = self.pixels.pin_memory()
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
