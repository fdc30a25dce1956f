"""CIFAR-10 tars -> WebDataset shards (train, test, sparse clean set) and an FFCV .beton.

Protocol (docs/evaluation.md): the defender's sparse clean set (2,000 images, 200 per
class, chosen with seed 0) comes from the training split; the attacker poisons all
training images; accuracy is measured on the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eclipse_stream.fsutil import atomic_path

from .common import (
    CLASS_INDEX,
    MANIFEST,
    ToolError,
    decode_image,
    is_complete,
    iter_cifar_tar,
    read_json,
    resolve_data_dir,
    write_split,
)

DEFAULT_SHARD_SIZE = 2500
SPARSE_PER_CLASS = 200  # 2,000 images = 4% of CIFAR-10's training split, as in the paper
SPARSE_SEED = 0


def load_tar_split(data_dir: Path, split: str, limit_per_class: int | None):
    """Decode one split; keys like ``train-airplane-0000`` name the source file, so they stay stable."""
    items = iter_cifar_tar(data_dir / f"{split}.tar.gz", limit_per_class)
    keys = [f"{split}-{name}-{number:04d}" for name, number, _ in items]
    labels = np.asarray([CLASS_INDEX[name] for name, _, _ in items], dtype=np.int64)
    images = np.stack([decode_image(data) for _, _, data in items])
    return keys, images, labels


def choose_sparse(labels: np.ndarray, per_class: int, seed: int = SPARSE_SEED) -> np.ndarray:
    """Class-balanced random indices (sorted): the defender's small clean sample of the training set."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Raw RGB + int label FFCV file; ffcv is imported here only, so the rest works without it."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class _Pairs:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    with atomic_path(path) as tmp:
        writer = DatasetWriter(str(tmp), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                               num_workers=1)
        writer.from_indexed_dataset(_Pairs())


def _check_reusable(out_dir: Path, settings: dict) -> None:
    """Refuse to reuse splits written with other settings (a 10-per-class test grid must not feed a full one)."""
    for split in ("train", "sparse", "test"):
        manifest = out_dir / split / MANIFEST
        if not manifest.is_file():
            continue
        saved = read_json(manifest)
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            said = ", ".join(f"{k}={old!r} there, {new!r} asked" for k, (old, new) in changed.items())
            raise ToolError(f"{out_dir / split} was prepared with other settings ({said}); "
                            "use --force or another work dir")


def prepare(data_dir, out_dir: Path, limit_per_class: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
            sparse_per_class: int = SPARSE_PER_CLASS, beton: bool = True, force: bool = False,
            test_limit_per_class: int | None | str = "same") -> dict:
    """Write ``train/``, ``test/``, ``sparse/`` shard folders and ``train.beton``; skip finished parts.

    ``limit_per_class`` keeps the first N images per class of the training split; the test split
    gets ``test_limit_per_class`` ("same": the training limit; None: all 1,000 per class).
    """
    data_dir = resolve_data_dir(data_dir)
    out_dir = Path(out_dir)
    test_limit = limit_per_class if test_limit_per_class == "same" else test_limit_per_class
    settings = {"limit_per_class": limit_per_class, "shard_size": shard_size}
    if test_limit != limit_per_class:
        settings["test_limit_per_class"] = test_limit
    if not force:
        _check_reusable(out_dir, settings)
    done = {}
    train = None
    if force or not all(is_complete(out_dir / s) for s in ("train", "sparse")) or (
            beton and not (out_dir / "train.beton").is_file()):
        train = load_tar_split(data_dir, "train", limit_per_class)
    if train is not None and (force or not is_complete(out_dir / "train")):
        done["train"] = write_split(out_dir / "train", "train", *train, shard_size, settings)
    if train is not None and (force or not is_complete(out_dir / "sparse")):
        keys, images, labels = train
        idx = choose_sparse(labels, sparse_per_class)
        done["sparse"] = write_split(out_dir / "sparse", "sparse", [keys[i] for i in idx], images[idx],
                                     labels[idx], shard_size,
                                     {**settings, "seed": SPARSE_SEED, "per_class": sparse_per_class})
    if force or not is_complete(out_dir / "test"):
        done["test"] = write_split(out_dir / "test", "test", *load_tar_split(data_dir, "test", test_limit),
                                   shard_size, settings)
    if beton and train is not None and (force or not (out_dir / "train.beton").is_file()):
        write_beton(out_dir / "train.beton", train[1], train[2])
        done["beton"] = str(out_dir / "train.beton")
    return done
