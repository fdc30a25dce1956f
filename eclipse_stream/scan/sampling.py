"""Which images a scan looks at: a seeded per-class reservoir over one pass of the input (never the whole
dataset in memory; only the chosen images are decoded, with purify's decoder and bad-input errors), for the
whole input and, beside it, for each group of shards (``ScanConfig.by``).

Shards are read through ``expand_shards`` and ``format_for(shard).labelled(...)`` only, so a new format or
source is scanned as soon as it is registered."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import EclipseError, InputError, SampleError
from ..formats import class_label, format_for, sample_label
from ..imageio import ImageDecodeError, decode_image
from ..sources import expand_shards, resize_center_crop
from ..storage import read_in_order
from .config import MIN_PER_CLASS, ScanConfig

__all__ = ["Sampled", "Sample", "sample_shards", "sample_samples", "sample_arrays", "subsample"]


@dataclass
class Sampled:
    """The chosen images of one input (or of one group of it), as probe-ready arrays."""

    images: np.ndarray          # (N, S, S, 3) uint8
    labels: np.ndarray          # (N,) int64 class indices into `classes`
    classes: list[str]          # class names (label values as text), sorted
    seen: dict[str, int]        # images per class in the whole input (or group)
    skipped: list[dict] = field(default_factory=list)  # {shard, key, reason} under on_error=skip
    sources: list[str] = field(default_factory=list)

    def per_class(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts)}


@dataclass
class Sample:
    """A whole-input sample and, per group (shard, input or user group), that group's own sample.

    ``groups`` maps a group's name to its ``Sampled`` (classes as the whole input's, so scores compare), or
    to a string saying why it cannot be scored on its own (e.g. it holds only some of the classes)."""

    whole: Sampled
    groups: dict[str, Sampled | str] = field(default_factory=dict)


class _Reservoir:
    """Uniform sample of up to ``n`` items per label from one pass over a stream (algorithm R)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n = n
        self.rng = rng
        self.buckets: dict = {}
        self.counts: dict = {}

    def add(self, label, item) -> None:
        count = self.counts.get(label, 0) + 1
        self.counts[label] = count
        bucket = self.buckets.setdefault(label, [])
        if len(bucket) < self.n:
            bucket.append(item)
        else:
            j = int(self.rng.integers(count))
            if j < self.n:
                bucket[j] = item


class _Collector:
    """One pass over the input feeds the whole-input reservoir and the reservoir of the item's group (made
    when the group first appears; at most ``cfg.max_groups`` of them, later groups count in the whole only)."""

    def __init__(self, cfg: ScanConfig, grouped: bool):
        self.cfg = cfg
        self.grouped = grouped and cfg.by != "none"
        self.whole = _Reservoir(cfg.per_class, np.random.default_rng(cfg.seed))
        self.groups: dict[str, _Reservoir] = {}
        self.ungrouped: list[str] = []  # groups past max_groups
        self.skipped: list[dict] = []
        self.number = 0

    def add(self, label, payload, group: str | None) -> None:
        item = (self.number, payload)  # the number identifies an item chosen by both reservoirs
        self.number += 1
        self.whole.add(label, item)
        if not self.grouped or group is None:
            return
        reservoir = self.groups.get(group)
        if reservoir is None:
            if len(self.groups) >= self.cfg.max_groups:
                if group not in self.ungrouped:
                    self.ungrouped.append(group)
                return
            reservoir = self.groups[group] = _Reservoir(
                self.cfg.group_per_class, np.random.default_rng([self.cfg.seed, len(self.groups)]))
        reservoir.add(label, item)

    def skip(self, e: SampleError) -> None:
        """Record a bad sample under on_error=skip; raise it otherwise."""
        if self.cfg.on_error == "fail":
            raise e
        self.skipped.append({"shard": e.shard, "key": e.key, "reason": e.reason})

    def finish(self, load, sources: list[str]) -> Sample:
        """Decode the chosen items once each (``load(payload) -> rgb``, raising SampleError)."""
        cache: dict[int, np.ndarray | None] = {}

        def view(item):
            number, payload = item
            if number not in cache:
                try:
                    cache[number] = _view(load(payload), self.cfg.probe_size, self.cfg.view)
                except SampleError as e:
                    self.skip(e)
                    cache[number] = None
            return cache[number]

        whole = _arrays(self.whole, view, None)
        if len(whole[2]) < 2:
            seen = {str(label): self.whole.counts[label] for label in _sort_labels(self.whole.buckets)}
            raise InputError(f"{', '.join(sources[:3]) + (' ...' if len(sources) > 3 else '')}: a scan needs at "
                             f"least 2 classes with {MIN_PER_CLASS}+ readable images each; images per class "
                             f"found: {seen or '(none)'}")
        groups: dict[str, Sampled | str] = {}
        for name, reservoir in (self.groups.items() if len(self.groups) > 1 else ()):
            images, labels, classes, seen = _arrays(reservoir, view, whole[2])
            missing = [c for c in whole[2] if c not in classes]
            if missing:  # its scores would not compare with the calibrated (all-class) ones
                more = " ..." if len(missing) > 5 else ""
                groups[name] = (f"holds {len(classes)} of the {len(whole[2])} classes with {MIN_PER_CLASS}+ "
                                f"images (none or too few of {', '.join(missing[:5])}{more})")
            else:
                groups[name] = Sampled(images, labels, whole[2], seen, [], [name])
        for name in self.ungrouped:
            groups[name] = f"not scored on its own: more than {self.cfg.max_groups} groups (--max-groups)"
        images, labels, classes, seen = whole
        return Sample(Sampled(images, labels, classes, seen, self.skipped, sources), groups)


def _arrays(reservoir: _Reservoir, view, classes: list[str] | None):
    """Decoded images and label indices of a reservoir; classes with fewer than MIN_PER_CLASS readable images
    are left out. ``classes``: index labels into this list (a group's labels into the whole input's)."""
    images, labels, kept = [], [], []
    for label in _sort_labels(reservoir.buckets):
        decoded = [v for v in (view(item) for item in reservoir.buckets[label]) if v is not None]
        if len(decoded) < MIN_PER_CLASS or (classes is not None and str(label) not in classes):
            continue
        kept.append(str(label))
        index = len(kept) - 1 if classes is None else classes.index(str(label))
        images += decoded
        labels += [index] * len(decoded)
    seen = {str(label): reservoir.counts[label] for label in _sort_labels(reservoir.buckets)}
    stacked = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    return stacked, np.asarray(labels, dtype=np.int64), kept, seen


def _sort_labels(labels) -> list:
    return sorted(labels, key=lambda v: (isinstance(v, str), v))


def _view(rgb: np.ndarray, size: int, view: str) -> np.ndarray:
    """What the probes see: the central size x size window at native resolution (``crop``, the default,
    so pixel-level patterns keep their pixels), or the whole image resized (``resize``). Images smaller
    than the window are resized (shorter side) and centre-cropped either way."""
    h, w = rgb.shape[:2]
    if view == "crop" and h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        return np.ascontiguousarray(rgb[top:top + size, left:left + size])
    return resize_center_crop(rgb, size)


def _shard_groups(shards: list, inputs: list, cfg: ScanConfig) -> tuple[list[str], list[str]]:
    """The group name of every shard, and the names in order (``by``: shard, input, none)."""
    if cfg.by == "none":
        return [""] * len(shards), [""]
    if cfg.by == "input":
        group_of: dict = {}
        for item in inputs:  # a shard named by two inputs belongs to the first (expand_shards drops the repeat)
            for shard in expand_shards(item):
                group_of.setdefault(shard, str(item))
        per_shard = [group_of[s] for s in shards]
        return per_shard, list(dict.fromkeys(per_shard))
    names = [str(s) for s in shards]
    if len(names) <= cfg.max_groups:
        return names, names
    # more shards than groups: consecutive runs of shards, named by their first and last shard
    bounds = np.linspace(0, len(names), cfg.max_groups + 1).round().astype(int)
    per_shard = [""] * len(names)
    order = []
    for a, b in zip(bounds, bounds[1:]):
        name = names[a] if b - a == 1 else f"{names[a]} .. {os.path.basename(names[b - 1])}"
        order.append(name)
        per_shard[a:b] = [name] * (b - a)
    return per_shard, order


def sample_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike], cfg: ScanConfig,
                  groups: bool = True, on_shard_error=None, expanded: bool = False) -> Sample:
    """Choose up to ``cfg.per_class`` images per class from shards of any registered format (one pass each),
    and ``cfg.group_per_class`` per class of each group: labels as each shard's format reads them, images
    decoded only for the chosen samples.

    A shard that cannot be read to its end (cut, corrupt, gone) raises, unless ``on_shard_error(shard, error)``
    is given: it is told, the samples read before the fault stay candidates, and the pass goes on.
    ``expanded``: ``inputs`` are shards as :func:`~eclipse_stream.sources.expand_shards` returned them (not
    listed again: on an object store that is one request per shard)."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    shards = inputs if expanded else expand_shards(inputs)
    per_shard, names = _shard_groups(shards, inputs, cfg) if groups else ([""] * len(shards), [""])
    collector = _Collector(cfg, grouped=len(names) > 1)
    with read_in_order(shards):  # a remote shard's next one is fetched while it is read (storage)
        for shard, group in zip(shards, per_shard):
            try:
                for item in format_for(shard).labelled(str(shard), cfg.label_key, cfg.image_key, cfg.max_pixels):
                    if item.error is not None:
                        collector.skip(SampleError(str(shard), item.key, item.error))
                    else:
                        collector.add(item.label, item.load, group)
            except (EclipseError, OSError) as e:
                if on_shard_error is None:
                    raise
                on_shard_error(str(shard), e)
    return collector.finish(lambda load: load(), [str(s) for s in shards])


def sample_samples(samples: Iterable[dict], cfg: ScanConfig, groups: bool = True) -> Sample:
    """Choose up to ``cfg.per_class`` images per class from WebDataset sample dicts (raw or decoded); the
    groups are the samples' ``__url__`` (their shard) unless ``cfg.by`` is ``none``."""
    collector = _Collector(cfg, grouped=groups)
    seen_urls: dict[str, None] = {}
    for number, sample in enumerate(samples):
        url = str(sample.get("__url__", "<samples>"))
        seen_urls.setdefault(url)
        where = (url, str(sample.get("__key__", f"#{number}")))
        try:
            label, image_field = sample_label(sample, cfg.label_key, cfg.image_key, where)
        except SampleError as e:
            collector.skip(e)
            continue
        collector.add(label, (where, sample[image_field]), url)
    return collector.finish(lambda item: _to_rgb(item[1], item[0], cfg.max_pixels), list(seen_urls))


def sample_arrays(images, labels, cfg: ScanConfig, groups: Sequence | None = None) -> Sample:
    """Choose up to ``cfg.per_class`` images per class of in-memory images (N x H x W x 3 uint8) and labels;
    ``groups``: optional group name of every image (per-group scores)."""
    images = np.asarray(images)
    labels = list(np.asarray(labels).tolist())
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"expected N x H x W x 3 uint8 images and N labels, got {images.dtype} {images.shape} "
                         f"and {len(labels)} labels")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"expected a group for each of the {len(labels)} images, got {len(groups)}")
    group_of = [str(g) for g in groups] if groups is not None else None
    collector = _Collector(cfg, grouped=group_of is not None)
    for i, label in enumerate(labels):
        collector.add(class_label(label, ("<arrays>", str(i)), "labels"), i, group_of[i] if group_of else None)
    return collector.finish(lambda i: images[i], ["<arrays>"])


def subsample(sampled: Sampled, per_class: int, seed: int) -> Sampled:
    """At most ``per_class`` images of each class (seeded), to match a reference's size."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(sampled.classes)):
        members = np.flatnonzero(sampled.labels == c)
        keep.append(np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False)))
    keep = np.concatenate(keep)
    return Sampled(sampled.images[keep], sampled.labels[keep], sampled.classes, sampled.seen,
                   sampled.skipped, sampled.sources)


def _to_rgb(value, where: tuple[str, str], max_pixels: int) -> np.ndarray:
    """uint8 H x W x 3 from encoded bytes (purify's decoder), a PIL image, an array or a tensor."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return decode_image(bytes(value), max_pixels=max_pixels).rgb
        except ImageDecodeError as e:
            raise SampleError(*where, str(e)) from None
    if hasattr(value, "convert") and hasattr(value, "size"):  # PIL image
        return np.asarray(value.convert("RGB"))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.ndim == 3 and value.shape[0] in (1, 3) and value.shape[-1] not in (1, 3):
            value = value.permute(1, 2, 0)  # CHW (torchrgb) -> HWC
        value = value.numpy()
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise SampleError(*where, f"image array of shape {value.shape} is not H x W x (1, 3 or 4)")
        arr = arr[..., :3] if arr.shape[2] >= 3 else np.repeat(arr, 3, axis=2)
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating):
                raise SampleError(*where, f"image array of dtype {arr.dtype} (expected uint8, or float in [0, 1])")
            arr = np.clip(np.rint(arr.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    raise SampleError(*where, f"image field holds {type(value).__name__}, not image bytes, a PIL image or an array")
