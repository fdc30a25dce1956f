"""Finding inputs: shard lists, and the small clean set of training (image folder, tars or a beton).

``expand_shards`` turns what a user typed (a folder, a brace pattern, a list of files, URLs: see
``storage``) into a sorted list of shard paths and URLs, of every suffix the format registry (``formats``)
knows. ``load_training_images`` reads a small
clean set into one uint8 tensor. Reading one shard is its format's job (``formats/tar.py``,
``formats/beton.py``); ``read_tar`` and ``iter_tar_samples`` are re-exported from there.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from .errors import InputError
from .formats import format_for, suffixes
from .formats.tar import TarItem, iter_tar_samples, read_tar  # noqa: F401  (re-exported)
from .imageio import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from .storage import kind_of, list_shards, local_path, redact, scheme_of, shard_name



def expand_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path | str]:
    """Shards named by ``inputs``, each a local :class:`~pathlib.Path` or a URL ``str``.

    Local: folders (their *.tar and *.beton), brace patterns, globs or files, or ``file://`` URLs of them.
    Streamed (``storage.kind_of`` 'stream'): ``http(s)://`` URLs and ``pipe:`` commands, brace patterns
    expanded as WebDataset expands them; they are not opened here. fsspec URLs (``s3://``, ``gs://``, ...):
    an object, a prefix ("folder": its shards), a glob, or brace patterns of them; listed here, so a missing
    object is an error now. Order is the order given, each folder or pattern sorted; duplicates are removed.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path | str] = []
    for item in inputs:
        item = str(item)
        kind = kind_of(item)
        if kind == "stream":
            for url in braceexpand(item):
                if not shard_name(url, suffixes()).endswith(suffixes()):
                    what = ("a word of the command" if scheme_of(url) == "pipe" else "the URL's path")
                    raise InputError(f"{redact(url)}: not a shard: {what} must end in {' or '.join(suffixes())} "
                                     "(it names the output shard and its format)")
                found.append(url)
            continue
        if kind == "fsspec":
            for url in dict.fromkeys(braceexpand(item)):
                found += list_shards(url, suffixes())
            continue
        item = local_path(item)
        p = Path(item)
        if p.is_dir():
            # every entry named like a shard is one: a broken link or unreadable file is an error, never skipped
            shards = sorted(_checked_shard(q) for q in p.iterdir() if q.suffix in suffixes())
            if not shards:
                raise InputError(f"{p}: no {' or '.join(suffixes())} shards in this folder")
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
            if q.suffix not in suffixes():
                raise InputError(f"{q}: not a shard (expected a {' or '.join(suffixes())} file)")
            found.append(_checked_shard(q))
    if not found:
        raise InputError(f"no shards found in {[redact(i) for i in map(str, inputs)]}")
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


def image_folder(source: str) -> Path | None:
    """The local folder ``source`` if it holds images rather than shards (a training source of that kind)."""
    p = Path(local_path(source) or "")
    if kind_of(source) == "local" and p.is_dir() and not any(q.suffix in suffixes() for q in p.iterdir()):
        return p
    return None


def _iter_training_items(source: str) -> Iterator[tuple[str, bytes | np.ndarray]]:
    """(name, encoded bytes or decoded RGB array) for every image of a training source."""
    p = image_folder(source)
    if p is not None:
        images, others = _folder_images(p)
        if not images:
            listed = ", ".join(q.name for q in others[:5])
            raise InputError(f"{p}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
                             + (f"; {len(others)} other files ignored: {listed}" if others else "") + ")")
        for q in images:
            yield str(q), q.read_bytes()
        return
    for shard in expand_shards(source):
        for key, image in format_for(shard).images(str(shard)):
            yield f"{redact(shard)}:{key}", image


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
