"""Shard formats: one module per format, each a :class:`ShardFormat` registered under its file suffix.

A format reads one shard as :class:`Record` s, in order (a sample with the image fields to purify, a sample
that cannot be used with the reason, or container members that belong to no sample), and writes one output
shard through a :class:`ShardWriter`: ``write_sample`` / ``write_members`` in input order, then ``finish``
(complete the file at its temporary name and return its sha256) or ``abort``. The pipeline knows no format
by name: it asks :func:`format_for` with the shard's path; so does ``eclipse-stream scan``, which reads each
sample's class label and, only for the samples it keeps, the image (:meth:`ShardFormat.labelled`). Adding a
format is one module that subclasses :class:`ShardFormat`, calls :func:`register`, and is imported at the end
of this file.

    suffix   module      reader                                   writer
    .tar     tar.py      tarfile, WebDataset's grouping rules     tarfile, as webdataset's TarWriter
    .beton   beton.py    ffcv's Reader (memory-mapped)            ffcv's DatasetWriter, in a builder process
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import InputError, SampleError
from ..imageio import find_image_key
from ..storage import redact, shard_name


@dataclass(frozen=True)
class ReadPolicy:
    """What a reader needs from the run's settings."""

    image_key: str | None = None  # comma-separated fields to purify; None: every image field
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are rejected from their header


@dataclass(frozen=True)
class WritePolicy:
    """What a writer needs from the run's settings."""

    jpeg_quality: int = 95
    seed: int = 0  # the writer's own randomness (a .beton's 'proportion' storage), from the run's seed


@dataclass
class Image:
    """One image field of a sample to purify: ``rgb`` (uint8 H x W x 3) and, in ``source``, whatever the
    format needs to store the purified pixels like the original (e.g. a tar field's DecodedImage)."""

    field: str
    rgb: np.ndarray | None
    source: Any = None


@dataclass
class Record:
    """One step of a shard as read: a sample (``images`` to purify, ``fields`` written back unchanged), a
    sample that cannot be used (``error``), or members that belong to no sample (``members``, copied as they
    are). ``index`` counts every step; ``sample_no`` counts samples only."""

    index: int
    key: str | None
    sample_no: int | None = None
    fields: dict | None = None
    images: list[Image] | None = None
    error: str | None = None
    members: list | None = None


class Labelled(NamedTuple):
    """One sample as :meth:`ShardFormat.labelled` reads it: its class ``label`` (see :func:`class_label`) and
    ``load()`` -> its image as uint8 H x W x 3 (decoded only then; SampleError if it cannot be), or, for a
    sample that cannot be used, ``error`` (the reason; the caller records it or fails, as ``--on-error`` says)."""

    key: str
    label: int | str | None = None
    load: Callable[[], np.ndarray] | None = None
    error: str | None = None


class ShardWriter(ABC):
    """One output shard being written to a temporary path, in input order."""

    @abstractmethod
    def write_sample(self, key: str, fields: dict) -> None:
        """Append one sample (its fields, already encoded by the format's ``encode``)."""

    def write_members(self, members: list) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no members that belong to no sample")

    @abstractmethod
    def finish(self, stop=None) -> str | None:
        """Complete the file (closed and fsynced at its temporary path) and return its sha256, or None when
        the format wrote no file (nothing survived where the format cannot hold an empty shard). ``stop``, a
        threading.Event, asks a long finish to give up (it then raises)."""

    @abstractmethod
    def abort(self) -> None:
        """Drop everything written so far (best effort: the run is already failing)."""


class ShardFormat:
    """A shard format: its suffix, a reader of records and a writer of output shards.

    ``records`` / ``encode`` / ``open_writer`` / ``session`` / ``temporary_names`` serve ``purify``; ``images``
    serves training and previews; ``labelled`` serves ``scan``: each sample's class label at the cost of
    reading it (no image decoded where the format can avoid it), and the image only for the samples kept.
    A format may offer only some of these roles (e.g. read-only); the others raise NotImplementedError
    naming the format and the role.
    """

    suffix: str = ""

    def _lacks(self, role: str):
        return NotImplementedError(f"{self.suffix or type(self).__name__} shards cannot be {role}")

    def check_usable(self, path: str) -> None:
        """Raise InputError naming ``path`` if this format cannot be read or written here at all (a library
        missing); called once per format before a run starts, so it fails before any work or output."""

    def records(self, path: str, policy: ReadPolicy) -> Iterator[Record]:
        """The records of one shard, in order; a shard that cannot be read raises ShardError naming it."""
        raise self._lacks("read for purify")

    def images(self, path: str, image_key: str | None = None, skip_missing: bool = False) -> Iterator[tuple]:
        """``(key, image)`` for the samples of one shard, in order, one image each (``image_key``, else the
        sample's first image field): encoded bytes or uint8 H x W x 3 pixels, as the format stores them. For
        training sets, previews and the like. A sample without one raises SampleError (or is skipped)."""
        raise self._lacks("read as an image set")

    def labelled(self, path: str, label_key: str | None, image_key: str | None,
                 max_pixels: int | None) -> Iterator[Labelled]:
        """:class:`Labelled` for the samples of one shard, in order. The label is field ``label_key``, else the
        first of :data:`LABEL_KEYS` present (a format may add its own fallback), as :func:`class_label` reads
        it; the image is field ``image_key``, else the sample's first image field; images over ``max_pixels``
        pixels fail to load. A sample without a usable label or image field is yielded with ``error``; a
        shard that cannot be read (or, for a format whose fields are per shard, has no such field) raises."""
        raise self._lacks("scanned")

    def encode(self, image: Image, rgb: np.ndarray, policy: WritePolicy):
        """One purified image as the writer takes it (runs on the encode threads); ValueError/OSError if not."""
        raise self._lacks("written")

    def open_writer(self, tmp: str, source: str, policy: WritePolicy) -> ShardWriter:
        """A writer of the output of input shard ``source`` at the temporary path ``tmp``."""
        raise self._lacks("written")

    def session(self):
        """A context manager around one pipeline run, for what the format's writers share (a process, a
        pool); entered on the main thread before the run starts its threads and reader workers."""
        return contextlib.nullcontext(self)

    def temporary_names(self) -> str:
        """A regex (alternative) of the extra temporary names a writer leaves next to ``.<name>.partial-<pid>``
        when killed (a rerun removes them); '' if none."""
        return ""


#: Label fields tried in order when none is named (a tar sample's field extensions, a .beton's field names).
LABEL_KEYS = ("cls", "class", "label", "target")


def class_label(value, where: tuple[str, str], field_name: str) -> int | str:
    """A class label from a field value: int when it reads as one, else its text; SampleError at ``where``
    (shard, key) if it is neither (e.g. a dict, a float with a fraction, bytes that are not UTF-8)."""
    original = value  # what the error names: the field's own value, not what a failed conversion left
    torch = sys.modules.get("torch")  # a tensor's module is loaded; this one need not import it
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    elif isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            value = None
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value:
        try:
            return int(value)
        except ValueError:
            return value
    if isinstance(original, (bytes, bytearray, memoryview)):
        text = bytes(original)
        why = "empty" if not text.strip() else "not UTF-8 text"
        raise SampleError(*where, f"label field {field_name!r} holds bytes {text[:40]!r} ({why}), not a class label "
                                  "(an integer or a class name)")
    raise SampleError(*where, f"label field {field_name!r} holds {type(original).__name__} "
                              f"{str(original)[:40]!r}, not a class label (an integer or a class name)")


def label_of(sample: dict, label_key: str | None, where: tuple[str, str]) -> int | str:
    """The class label of a sample dict: field ``label_key``, else the first of :data:`LABEL_KEYS` present;
    SampleError at ``where`` naming the sample's fields when there is none."""
    fields = sorted(str(k) for k in sample if not str(k).startswith("__"))
    if label_key is not None and label_key not in sample:
        raise SampleError(*where, f"no label field {label_key!r} (--label-key); its fields are: "
                                  f"{', '.join(fields) or '(none)'}")
    key = label_key if label_key is not None else next((k for k in LABEL_KEYS if k in sample), None)
    if key is None:
        raise SampleError(*where, f"no label field (looked for {', '.join(LABEL_KEYS)}; name one with "
                                  f"--label-key); its fields are: {', '.join(fields) or '(none)'}")
    return class_label(sample[key], where, key)


def sample_label(sample: dict, label_key: str | None, image_key: str | None,
                 where: tuple[str, str]) -> tuple[int | str, str]:
    """(class label, image field name) of a WebDataset-style sample dict (``__``-prefixed keys are metadata),
    chosen as :meth:`ShardFormat.labelled` says; SampleError at ``where`` naming what is missing."""
    label = label_of(sample, label_key, where)
    fields = sorted(k for k in sample if not str(k).startswith("__"))
    try:
        image = find_image_key(sample, image_key)
    except ValueError as e:  # an explicit --image-key that the sample lacks
        raise SampleError(*where, str(e)) from None
    if image is None:
        raise SampleError(*where, f"no image field (fields: {fields})")
    return label, image


FORMATS: dict[str, ShardFormat] = {}


def register(fmt: ShardFormat) -> ShardFormat:
    FORMATS[fmt.suffix] = fmt
    return fmt


def suffixes() -> tuple[str, ...]:
    return tuple(FORMATS)


def format_for(path: str | os.PathLike) -> ShardFormat:
    """The format of a shard, by its file suffix (of a URL's path; of a ``pipe:`` command's shard name)."""
    suffix = os.path.splitext(shard_name(path, suffixes()))[1]
    try:
        return FORMATS[suffix]
    except KeyError:
        raise InputError(f"{redact(path)}: not a shard (expected a {' or '.join(FORMATS)} file)") from None


from . import tar  # noqa: E402,F401  (each registers itself, in this order)
from . import beton  # noqa: E402,F401,I001
