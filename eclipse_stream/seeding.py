"""Where every random number of purify comes from: a function of (seed, shard file name, batch number) only,
so output bytes do not depend on workers, processes, GPUs, the order shards finish in, or interruptions.
Images purified in tiles draw from their own generator, a function of (seed, shard file name, the sample's
position in the shard, the field), so their bytes do not depend on the batch they are in either."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["batch_generator", "image_generator", "stream_seed"]


def stream_seed(*parts) -> int:
    """A 63-bit seed that depends on ``parts`` only (not on process, worker or rank)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_generator(seed: int, shard_name: str, batch_no: int, device: torch.device) -> torch.Generator:
    """The noise source of one batch: a function of (seed, shard file name, batch number) only."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, shard_name, batch_no))


def image_generator(seed: int, shard_name: str, index: int, field: str, device: torch.device) -> torch.Generator:
    """The noise source of one image field purified on its own (in tiles): a function of (seed, shard file name,
    the sample's position in the shard, the field name) only."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, shard_name, "image", index, field))
