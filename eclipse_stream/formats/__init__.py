"""Shard formats: one module per format, each a :class:`ShardFormat` registered under its file suffix.

A format reads one shard as :class:`Record` s, in order (a sample with the image fields to purify, a sample
that cannot be used with the reason, or container members that belong to no sample), and writes one output
shard through a :class:`ShardWriter`: ``write_sample`` / ``write_members`` in input order, then ``finish``
(complete the file at its temporary name and return its sha256) or ``abort``. The pipeline knows no format
by name: it asks :func:`format_for` with the shard's path. Adding a format is one module that subclasses
:class:`ShardFormat`, calls :func:`register`, and is imported at the end of this file.

    suffix   module      reader                                   writer
    .tar     tar.py      tarfile, WebDataset's grouping rules     tarfile, as webdataset's TarWriter
    .beton   beton.py    ffcv's Reader (memory-mapped)            ffcv's DatasetWriter, in a builder process
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import InputError


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


class ShardWriter:
    """One output shard being written to a temporary path, in input order."""

    def write_sample(self, key: str, fields: dict) -> None:
        raise NotImplementedError

    def write_members(self, members: list) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no members that belong to no sample")

    def finish(self, stop=None) -> str | None:
        """Complete the file (closed and fsynced at its temporary path) and return its sha256, or None when
        the format wrote no file (nothing survived where the format cannot hold an empty shard). ``stop``, a
        threading.Event, asks a long finish to give up (it then raises)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop everything written so far (best effort: the run is already failing)."""
        raise NotImplementedError


class ShardFormat:
    """A shard format: its suffix, a reader of records and a writer of output shards."""

    suffix: str = ""

    def records(self, path: str, policy: ReadPolicy) -> Iterator[Record]:
        """The records of one shard, in order; a shard that cannot be read raises ShardError naming it."""
        raise NotImplementedError

    def images(self, path: str, image_key: str | None = None, skip_missing: bool = False) -> Iterator[tuple]:
        """``(key, image)`` for the samples of one shard, in order, one image each (``image_key``, else the
        sample's first image field): encoded bytes or uint8 H x W x 3 pixels, as the format stores them. For
        training sets, previews and the like. A sample without one raises SampleError (or is skipped)."""
        raise NotImplementedError

    def encode(self, image: Image, rgb: np.ndarray, policy: WritePolicy):
        """One purified image as the writer takes it (runs on the encode threads); ValueError/OSError if not."""
        raise NotImplementedError

    def open_writer(self, tmp: str, source: str, policy: WritePolicy) -> ShardWriter:
        """A writer of the output of input shard ``source`` at the temporary path ``tmp``."""
        raise NotImplementedError

    def session(self):
        """A context manager around one pipeline run, for what the format's writers share (a process, a
        pool); entered on the main thread before the run starts its threads and reader workers."""
        return contextlib.nullcontext(self)

    def temporary_names(self) -> str:
        """A regex (alternative) of the extra temporary names a writer leaves next to ``.<name>.partial-<pid>``
        when killed (a rerun removes them); '' if none."""
        return ""


FORMATS: dict[str, ShardFormat] = {}


def register(fmt: ShardFormat) -> ShardFormat:
    FORMATS[fmt.suffix] = fmt
    return fmt


def suffixes() -> tuple[str, ...]:
    return tuple(FORMATS)


def format_for(path: str | os.PathLike) -> ShardFormat:
    """The format of a shard, by its file suffix."""
    suffix = os.path.splitext(os.fspath(path))[1]
    try:
        return FORMATS[suffix]
    except KeyError:
        raise InputError(f"{os.fspath(path)}: not a shard (expected a {' or '.join(FORMATS)} file)") from None


from . import tar  # noqa: E402,F401  (each registers itself, in this order)
from . import beton  # noqa: E402,F401,I001
