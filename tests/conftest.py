"""Shared fixtures: small real CIFAR-10 data read from ../shared, tiny denoisers, shard builders."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eclipse_stream.checkpoint import save_denoiser
from eclipse_stream.diffusion import DiffusionConfig
from eclipse_stream.unet import UNet, preset_config

# 2-core CI machines: one intra-op thread per process avoids OpenMP oversubscription stalls.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_cifar(n: int, split: str = "train", per_class: bool = True) -> list[tuple[str, int, bytes]]:
    """The first ``n`` JPEGs (name, label, bytes) of the shared CIFAR-10 tar, spread over classes."""
    path = CIFAR_DIR / f"{split}.tar.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shared CIFAR-10 data is missing (see shared/data/cifar10/README.md)")
    quota = dict.fromkeys(CLASSES, (n + 9) // 10 if per_class else n)
    out = []
    with tarfile.open(path, "r|gz") as tf:
        for m in tf:
            if not m.isfile() or not m.name.endswith(".jpg"):
                continue
            cls = m.name.split("/")[-2]
            if quota.get(cls, 0) <= 0:
                continue
            quota[cls] -= 1
            out.append((f"{cls}-{Path(m.name).stem}", CLASSES.index(cls), tf.extractfile(m).read()))
            if len(out) >= n:
                break
    return out


@pytest.fixture(scope="session")
def cifar64():
    return read_cifar(64)


def to_png(jpg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Write samples ({'__key__': k, ext: bytes}) with plain tarfile, in order."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def cifar_samples(items, fmt: str = "png") -> list[dict]:
    samples = []
    for name, label, jpg in items:
        img = {"png": to_png(jpg), "jpg": jpg}[fmt]
        samples.append({"__key__": name, fmt: img, "cls": str(label).encode(),
                        "json": f'{{"name": "{name}", "label": {label}}}'.encode()})
    return samples


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, cifar64):
    """Three small shards of real CIFAR-10 images: png+cls+json, jpg+cls+json, png+cls+json."""
    d = tmp_path_factory.mktemp("shards")
    write_tar(d / "part-000.tar", cifar_samples(cifar64[:12], "png"))
    write_tar(d / "part-001.tar", cifar_samples(cifar64[12:22], "jpg"))
    write_tar(d / "part-002.tar", cifar_samples(cifar64[22:30], "png"))
    return d


def make_denoiser(path: Path, seed: int = 0, steps: int = 4000, perturb: float = 0.02) -> Path:
    """An untrained tiny denoiser with small random output weights (so outputs depend on it)."""
    torch.manual_seed(seed)
    model = UNet(preset_config("tiny", 32))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, perturb)
    save_denoiser(path, model, DiffusionConfig(steps=steps), train_args={"test": True})
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_denoiser(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def rgb_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def cli_env() -> dict:
    """Environment for running the CLI in a subprocess: one thread, no progress bars."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
