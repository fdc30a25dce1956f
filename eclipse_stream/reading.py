"""Stage 1 of purify, in DataLoader worker processes: read, decode and batch whole shards.

:func:`read_shard` turns one shard's records (from its format's reader) into events: the resolution policy
is applied to each image, images are bucketed into batches (``bucketing``), and bad samples, other members
and an unreadable shard become their own events. :class:`ShardEvents` gives worker w the tasks w, w + n, ...
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from .bucketing import Bucketer, resize_for_model
from .defaults import READ_AHEAD_MIB
from .errors import EclipseError, SampleError, ShardError
from .events import Batch, Item, Members, Rejected, ShardEnded, ShardFailed, ShardStarted
from .formats import Image, ReadPolicy, label_of
from .outdir import Task
from .storage import ReadOrder, identity

__all__ = ["ReadSettings", "ShardEvents", "read_shard", "reader_worker_init", "record_label"]


def record_label(rec, label_key: str | None, shard: str) -> str:
    """A sample's class label as text (``formats.label_of``: ``label_key``, else the first of LABEL_KEYS)."""
    return str(label_of(rec.fields or {}, label_key, (shard, rec.key)))


@dataclass(frozen=True)
class ReadSettings:
    """What stage 1 needs: the format readers' policy, the resolution policy and the batching limits."""

    policy: ReadPolicy
    model_size: int | None  # the denoiser's image size, for resolution 'model'
    resolution: str = "native"
    batch_size: int = 64
    bucket_multiple: int = 32
    max_batch_pixels: int = 64 * 256 * 256
    tile_size: int | None = None  # the purifier tiles images with a longer padded side, one by one
    read_ahead_mib: int = READ_AHEAD_MIB  # remote shards: read ahead per stream, the next shard started early
    labels: bool = False  # read every sample's class label (purify --class-kernels)
    label_key: str | None = None  # None: the first of formats.LABEL_KEYS present
    labels_optional: bool = False  # a sample without a label passes unchanged (--deblur auto), not rejected

    @classmethod
    def from_config(cls, cfg, model_size: int | None, tile_size: int | None = None,
                    labels: bool | None = None) -> ReadSettings:
        """``labels``: read labels (the run deblurs by class); None: when ``cfg.class_kernels`` is given. A
        sample without one is rejected under ``--class-kernels`` (the user asked for it), passed unchanged under
        ``--deblur auto``."""
        return cls(ReadPolicy(cfg.image_key, cfg.max_pixels), model_size, cfg.resolution, cfg.batch_size,
                   cfg.bucket_multiple, cfg.max_batch_pixels, tile_size, cfg.read_ahead_mib,
                   cfg.class_kernels is not None if labels is None else labels, cfg.label_key,
                   cfg.class_kernels is None)

    def bucketer(self) -> Bucketer:
        tiled = None
        if self.tile_size is not None and self.model_size:
            # Images purified in tiles are purified one by one, whatever their batch, so a batch of them holds what
            # a full batch of training-size images holds (or one image): memory does not grow with image size.
            tiled = (self.tile_size, min(self.max_batch_pixels, self.batch_size * self.model_size ** 2))
        return Bucketer(self.batch_size, self.bucket_multiple, self.max_batch_pixels,
                        max_pending=4 * self.batch_size, tiled=tiled)


def read_shard(task: Task, settings: ReadSettings) -> Iterator:
    """Events for one shard, in order: ShardStarted, (Batch | Rejected | Members)*, ShardEnded -- or ShardFailed."""
    try:
        # size and mtime; an object's size and ETag as listed (no request); compared afresh before it is marked done
        ident = identity(task.path, fresh=False)
    except (OSError, EclipseError) as e:
        yield ShardStarted(task.index, None)
        yield ShardFailed(task.index, f"cannot read: {getattr(e, 'strerror', None) or e}")
        return
    yield ShardStarted(task.index, ident)
    bucketer = settings.bucketer()
    batch_no = count = 0
    try:
        for rec in task.format.records(task.path, settings.policy):
            count = rec.index + 1
            if rec.members is not None:
                yield Members(task.index, rec.index, rec.members)
            elif rec.error is not None:
                yield Rejected(task.index, rec.index, rec.sample_no, rec.key, rec.error)
            else:
                label = None
                if settings.labels:
                    try:
                        label = record_label(rec, settings.label_key, task.name)
                    except SampleError as e:
                        if not settings.labels_optional:
                            yield Rejected(task.index, rec.index, rec.sample_no, rec.key, e.reason)
                            continue
                for part, image in enumerate(rec.images):
                    rgb = image.rgb
                    if settings.resolution == "model":
                        rgb = resize_for_model(rgb, settings.model_size)
                    item = Item(rec.index, rec.sample_no, rec.key, Image(image.field, None, image.source),
                                len(rec.images), rgb.shape[:2], rec.fields if part == 0 else None, label)
                    for items, pixels in bucketer.add(item, rgb):
                        yield Batch(task.index, batch_no, items, pixels.permute(0, 2, 3, 1).numpy())
                        batch_no += 1
        for items, pixels in bucketer.flush():
            yield Batch(task.index, batch_no, items, pixels.permute(0, 2, 3, 1).numpy())
            batch_no += 1
    except ShardError as e:
        yield ShardFailed(task.index, e.reason)
        return
    except EclipseError as e:  # e.g. ffcv missing
        yield ShardFailed(task.index, str(e))
        return
    yield ShardEnded(task.index, count)


class ShardEvents(IterableDataset):
    """Each DataLoader worker reads whole shards: worker w takes tasks w, w + n, ...; a remote one's next shard
    is started while one is decoded (``storage.ReadOrder``)."""

    def __init__(self, tasks: list[Task], settings: ReadSettings):
        self.tasks, self.settings = tasks, settings

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.tasks[wid::nw]
        order = ReadOrder([task.path for task in mine], self.settings.read_ahead_mib)
        events = None
        try:
            for task in mine:
                events = read_shard(task, self.settings)
                while True:
                    with order.active():  # only while reading: not across the yield (workers=0 shares the thread)
                        event = next(events, None)
                    if event is None:
                        break
                    yield event
        finally:
            if events is not None:
                events.close()  # its open shard, if this generator is abandoned mid-way
            order.close()


def reader_worker_init(_worker_id: int, parent: int) -> None:
    """In each reader worker: die with the main process, whatever kills it; SIGTERM just ends the worker
    (the main process, which gets it too, cleans up)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the inherited handler of the CLI's main process
    with contextlib.suppress(Exception):  # Linux only: PR_SET_PDEATHSIG = 1
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def as_is(event):
    """DataLoader collate that leaves events alone."""
    return event
