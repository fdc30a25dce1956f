"""Shared plumbing: where the data lives, WebDataset shard I/O, provenance of results.

Every tool reads and writes the same shard layout, so the pieces (prepare, poison,
purify, victim) can be run separately and resumed: a split is a folder of
``<prefix>-NNNNNN.tar`` shards plus a ``manifest.json`` written last (its presence
means the folder is complete).
"""

from __future__ import annotations

import glob
import heapq
import json
import os
import platform
import socket
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import click
import numpy as np
import torch
import webdataset as wds

from eclipse_stream.devices import resolve_device
from eclipse_stream.fsutil import atomic_path
from eclipse_stream.fsutil import write_json as _write_json
from eclipse_stream.imageio import decode_image as _decode

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = PROJECT_ROOT / "runs" / "eval"  # git-ignored
MANIFEST = "manifest.json"


class ToolError(click.ClickException):
    """A user-facing failure: printed as one line by click, exit status 2."""

    exit_code = 2


def default_data_dir() -> Path:
    """The shared CIFAR-10 tars sit beside the project, not inside it (see the data README)."""
    return PROJECT_ROOT.parent / "shared" / "data" / "cifar10"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """Return the CIFAR-10 folder, or fail naming the path, so a wrong setup is obvious at once."""
    path = Path(data_dir) if data_dir else default_data_dir()
    missing = [name for name in ("train.tar.gz", "test.tar.gz") if not (path / name).is_file()]
    if not path.is_dir():
        raise ToolError(f"CIFAR-10 data folder not found: {path} (pass --data-dir DIR holding "
                        "train.tar.gz and test.tar.gz)")
    if missing:
        raise ToolError(f"CIFAR-10 data folder {path} lacks {', '.join(missing)} (pass --data-dir)")
    return path


def iter_cifar_tar(tar_path: Path, limit_per_class: int | None = None) -> list[tuple[str, int, bytes]]:
    """Stream one CIFAR-10 tar.gz and return (class, number, jpeg bytes), sorted by class then number.

    With a limit, the lowest-numbered files of each class are kept whatever the
    archive order, so a subset is the same on every machine.
    """
    heaps: dict[str, list[tuple[int, bytes]]] = {name: [] for name in CLASSES}
    with tarfile.open(tar_path, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2 or parts[-2] not in heaps:
                continue
            number = int(Path(parts[-1]).stem)
            heap = heaps[parts[-2]]
            if limit_per_class is not None and len(heap) >= limit_per_class and -heap[0][0] < number:
                continue
            item = (-number, tar.extractfile(member).read())
            if limit_per_class is not None and len(heap) >= limit_per_class:
                heapq.heapreplace(heap, item)
            else:
                heapq.heappush(heap, item)
    return [(name, -neg, data) for name in CLASSES for neg, data in sorted(heaps[name], reverse=True)]


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes to uint8 HWC RGB (the library's decoder): the decoded pixels are the clean image."""
    return _decode(data).rgb


def unit_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images as a float NCHW batch in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_split(out_dir: Path, prefix: str, keys: list[str], images: np.ndarray, labels: np.ndarray,
                shard_size: int, extra: dict | None = None) -> dict:
    """Write samples as ``.png`` + ``.cls`` WebDataset shards, then the manifest (last, as a done-marker).

    PNG is lossless, so a perturbation stored here is exactly the one measured.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(str(out_dir / f"{prefix}-*.tar")):
        os.remove(stale)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    shards = []
    for start in range(0, len(keys), shard_size):
        name = shard_name(prefix, start // shard_size)
        with atomic_path(out_dir / name) as tmp, wds.TarWriter(str(tmp)) as sink:
            for i in range(start, min(start + shard_size, len(keys))):
                sink.write({"__key__": keys[i], "png": images[i], "cls": int(labels[i])})
        shards.append(name)
    manifest = {"prefix": prefix, "count": len(keys), "shard_size": shard_size, "shards": shards,
                "classes": list(CLASSES), **(extra or {})}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def split_shards(path: Path) -> list[str]:
    """The shard files of a split folder, in order; a folder without a manifest is unfinished."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise ToolError(f"no such shard folder: {path}")
    if not (path / MANIFEST).is_file():
        raise ToolError(f"{path} has no {MANIFEST}: it was not written completely (rerun the step)")
    shards = sorted(glob.glob(str(path / "*.tar")))
    if not shards:
        raise ToolError(f"no .tar shards in {path}")
    return shards


def is_complete(path: Path) -> bool:
    """A split folder is complete once its manifest exists (written after every shard)."""
    return (Path(path) / MANIFEST).is_file()


def iter_samples(shards: Iterable[str]) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, uint8 HWC image, label) in shard order, decoded by webdataset."""
    dataset = wds.WebDataset(list(shards), shardshuffle=False, empty_check=False)
    yield from dataset.decode("rgb8").to_tuple("__key__", "png", "cls")


def read_split(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Load a whole split into memory: CIFAR-sized data fits, and training then needs no I/O."""
    keys, images, labels = [], [], []
    for key, image, label in iter_samples(split_shards(path)):
        keys.append(key)
        images.append(image)
        labels.append(int(label))
    if not keys:
        raise ToolError(f"{path}: no samples")
    return keys, np.stack(images), np.asarray(labels, dtype=np.int64)


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (a reader or a resumed run never sees half a file), keys in insertion order."""
    _write_json(path, obj, sort_keys=False)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def git_commit() -> str:
    """The commit the numbers were produced with (``+dirty`` when the tools tree has local edits)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--", "tools", "eclipse_stream").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str | None) -> str:
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(device: torch.device | str) -> dict:
    """What a results file must say about where and with what it was measured."""
    return {"host": socket.gethostname(), "device": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "git_commit": git_commit()}


