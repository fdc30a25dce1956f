"""Finding inputs and reading samples: shard lists, WebDataset tars, FFCV betons, image folders.

``expand_shards`` turns what a user typed (a folder, a brace pattern, a list of files)
into a sorted list of shard paths. ``read_tar`` streams one tar with ``tarfile``, grouping
members into samples by WebDataset's rules and keeping every other member, and turns every
way a tar can be broken or incomplete into a :class:`~eclipse_stream.errors.ShardError` that
names the file; ``iter_tar_samples`` is its sample-only view. ``load_training_images``
reads a small clean set (image folder, tars or a beton) into one uint8 tensor.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from .errors import InputError, SampleError, ShardError
from .imageio import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, find_image_key

SHARD_SUFFIXES = (".tar", ".beton")


def expand_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard paths named by ``inputs``: folders (their *.tar and *.beton), brace patterns or files.

    Order is the order given, each folder or pattern sorted; duplicates are removed.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        item = str(item)
        p = Path(item)
        if p.is_dir():
            # every entry named like a shard is one: a broken link or unreadable file is an error, never skipped
            shards = sorted(_checked_shard(q) for q in p.iterdir() if q.suffix in SHARD_SUFFIXES)
            if not shards:
                raise InputError(f"{p}: no .tar or .beton shards in this folder")
            found += shards
            continue
        names = sorted(set(braceexpand(item)))
        if len(names) == 1 and any(c in item for c in "*?["):
            names = sorted(glob.glob(item))
            if not names:  # never drop a pattern silently, even when other inputs do name shards
                raise InputError(f"{item}: no files match this pattern")
        for name in names:
            q = Path(name)
            if not q.is_file() and not q.is_symlink():
                raise InputError(f"{q}: no such shard")
            if q.suffix not in SHARD_SUFFIXES:
                raise InputError(f"{q}: not a shard (expected a {' or '.join(SHARD_SUFFIXES)} file)")
            found.append(_checked_shard(q))
    if not found:
        raise InputError(f"no shards found in {list(map(str, inputs))}")
    return list(dict.fromkeys(found))


def _checked_shard(q: Path) -> Path:
    """``q`` if it is a readable regular file; otherwise an InputError naming it and saying why."""
    if q.is_symlink() and not q.exists():
        raise InputError(f"{q}: broken symbolic link (-> {os.readlink(q)}); fix or remove it")
    if not q.is_file():
        raise InputError(f"{q}: not a regular file")
    try:
        with open(q, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"{q}: cannot read: {e.strerror or e}") from e
    return q


class TarItem(NamedTuple):
    """One step of a WebDataset tar, in file order: a sample, or members that belong to no sample.

    A sample (``key`` set) maps each field name (the member name after the key's first dot, case kept) to its
    bytes. ``members`` (``key`` None) holds ``(TarInfo, bytes | None)`` pairs that WebDataset's reader skips:
    links, directories and other non-regular members, regular members without a field name (no extension,
    a name starting with a dot) and top-level ``__name__`` metadata members. They are copied unchanged.
    """

    key: str | None
    fields: dict[str, bytes] | None = None
    members: list | None = None


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's top-level metadata members (e.g. __index__)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then all extensions
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


def _field_of(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, field) of a member WebDataset reads as a sample field, else None (a member copied as is)."""
    name = info.name
    if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
        return None
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def read_tar(path: str | os.PathLike) -> Iterator[TarItem]:
    """The samples (grouped by key as WebDataset groups them) and other members of one tar, in file order.

    The shard must be complete: after its last member come the two zero blocks that end a tar archive, and
    nothing but zeros follows them (tar's record padding). A tar cut anywhere, even exactly at a member
    boundary, or with data after its end, raises :class:`ShardError` naming the file, the byte offset and the
    last sample known to be complete (one followed by a member of another sample). gzip/bz2/xz-compressed
    tars are read too. A sample field name repeated within one sample is a ShardError, as in WebDataset.
    """
    path = str(path)
    complete = complete_fields = None  # the last sample followed by a member of another sample, its fields
    pending: dict | None = None  # the sample being read: {"key", "fields"}
    loose: list = []
    info = reading = None  # the last member header read; the member whose data is being read

    def where() -> str:
        """The last complete sample. At an abrupt end (no member being read), the sample read last counts as
        complete when it has the same fields as the one before it: tar has no sample boundaries to tell."""
        last = complete
        if (pending is not None and reading is None and complete_fields is not None
                and set(pending["fields"]) == complete_fields):
            last = pending["key"]
        return f"after sample {last!r}" if last is not None else "before its first complete sample"

    try:
        with open(path, "rb") as raw:
            magic = raw.read(6)
            raw.seek(0)
            kind = next((k for m, k in _COMPRESSED if magic.startswith(m)), None)
            stream = raw if kind is None else importlib.import_module(kind).open(raw, "rb")
            tf = tarfile.open(fileobj=stream, mode="r:")
            while (info := tf.next()) is not None:
                tf.members = []  # no index of every member: memory stays flat over big shards
                kf = _field_of(info)
                if kf is None:
                    reading = info
                    data = tf.extractfile(info).read() if info.isreg() else None
                    reading = None
                    loose.append((info, data))
                    continue
                key, field = kf
                if pending is not None and key != pending["key"]:
                    yield TarItem(pending["key"], pending["fields"])
                    complete, complete_fields, pending = pending["key"], set(pending["fields"]), None
                if pending is None:
                    # other members met since the last sample started go right after it (before the first)
                    if loose:
                        yield TarItem(None, members=loose)
                        loose = []
                    pending = {"key": key, "fields": {}}
                if field in pending["fields"]:
                    raise ShardError(path, f"corrupt tar ({where()}): member {info.name!r} appears twice in "
                                           f"sample {key!r}")
                reading = info
                pending["fields"][field] = tf.extractfile(info).read()
                reading = None
            _check_end(stream, tf.offset)
            if pending is not None:
                yield TarItem(pending["key"], pending["fields"])
            if loose:
                yield TarItem(None, members=loose)
    except ShardError:
        raise
    except _Incomplete as e:
        raise ShardError(path, f"incomplete tar ({where()}): {e}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        reason = str(e) or type(e).__name__
        if reading is not None:
            reason += f" in member {reading.name!r} (header at byte {reading.offset})"
        elif info is not None:
            reason += f" after member {info.name!r} (header at byte {info.offset})"
        raise ShardError(path, f"corrupt or truncated tar ({where()}): {reason}") from e


class _Incomplete(Exception):
    pass


def _check_end(stream, offset: int) -> None:
    """After the last member at ``offset``: two zero blocks, then only zeros (the record padding)."""
    stream.seek(offset)
    marker = stream.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.count(0) != len(marker):
        if marker.count(0) != len(marker):
            what = "an unreadable member header follows it (cut short or corrupt)"
        else:
            what = (f"the file ends {len(marker)} bytes later, where a tar ends with two 512-byte zero blocks"
                    if marker else "the file ends there, where a tar ends with two 512-byte zero blocks")
        raise _Incomplete(f"no end-of-archive marker after the last complete member (byte {offset}): {what}")
    pos = offset + len(marker)
    while block := stream.read(1 << 16):
        if block.count(0) != len(block):
            first = pos + next(i for i, b in enumerate(block) if b)
            raise _Incomplete(f"data after the end-of-archive marker (byte {first}); "
                              "concatenated tars are not read (split them into shards)")
        pos += len(block)


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Samples of one WebDataset tar in file order, fields as raw bytes, names as stored.

    Field names keep their case so they can be written back unchanged; members that are not sample fields
    are left out (see :func:`read_tar`, which the purify pipeline uses to copy them too). A truncated or
    corrupt tar raises :class:`ShardError` naming the file.
    """
    for item in read_tar(path):
        if item.key is not None:
            yield {**item.fields, "__key__": item.key, "__url__": str(path)}


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """The training-set size policy: scale the shorter side to ``size`` (bicubic), then centre crop."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(img)[top:top + size, left:left + size]


def _folder_images(folder: Path) -> tuple[list[Path], list[Path]]:
    images, others = [], []
    exts = {"." + e for e in IMAGE_EXTENSIONS}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            (images if p.suffix.lower() in exts else others).append(p)
    return images, others


def _iter_training_items(source: str) -> Iterator[tuple[str, bytes | np.ndarray]]:
    """(name, encoded bytes or decoded RGB array) for every image of a training source."""
    p = Path(source)
    if p.is_dir() and not any(q.suffix in SHARD_SUFFIXES for q in p.iterdir()):
        images, others = _folder_images(p)
        if not images:
            listed = ", ".join(q.name for q in others[:5])
            raise InputError(f"{p}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
                             + (f"; {len(others)} other files ignored: {listed}" if others else "") + ")")
        for q in images:
            yield str(q), q.read_bytes()
        return
    for shard in expand_shards(source):
        if shard.suffix == ".beton":
            from .formats.beton import BetonReader, require_ffcv
            require_ffcv(shard)
            reader = BetonReader(shard)
            for sample in reader:
                yield f"{shard}:{sample['__key__']}", sample[reader.image_field]
            continue
        for sample in iter_tar_samples(shard):
            key = find_image_key(sample)
            if key is None:
                raise SampleError(str(shard), sample["__key__"], "no image field "
                                  f"(fields: {sorted(k for k in sample if not k.startswith('__'))})")
            yield f"{shard}:{sample['__key__']}", sample[key]


def load_training_images(source: str, image_size: int) -> tuple[torch.Tensor, str]:
    """All images of a (small) clean set as a uint8 tensor (N, 3, S, S), plus a hash of the names.

    The sparse set is a few percent of a dataset, so it is held in memory; images whose size
    differs from ``image_size`` are resized (shorter side) and centre-cropped.
    """
    arrays, names = [], []
    for name, item in _iter_training_items(source):
        if isinstance(item, (bytes, bytearray)):
            try:
                item = decode_image(bytes(item)).rgb
            except ImageDecodeError as e:
                raise InputError(f"{name}: {e}") from e
        arrays.append(resize_center_crop(item, image_size))
        names.append(name)
    if not arrays:
        raise InputError(f"{source}: no training images found")
    data = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return data, digest
