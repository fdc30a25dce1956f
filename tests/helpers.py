"""Test helpers: small real CIFAR-10 data read from ../shared, tiny denoisers, shard builders.

Import them from here (``from helpers import ...``); ``conftest.py`` only holds the fixtures.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eclipse_stream.checkpoint import save_denoiser
from eclipse_stream.diffusion import DiffusionConfig
from eclipse_stream.unet import UNet, preset_config

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, ~10x slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return True  # not Linux: keep the recipes' bf16
    return "avx512_bf16" in flags or "amx_bf16" in flags


# The precision the model-training tests run in: the recipes' bf16 where the CPU has it, else fp32 (on an AMD VM
# without it, emulated bf16 made one victim test 664 s and the UC/HYP/UAP poison tests 163/130/81 s).
CPU_PRECISION = "bf16" if native_bf16() else "fp32"


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


def rgb_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def hidden_files(folder: Path) -> list[str]:
    """Hidden names (temporary files, the lock) left in an output folder; none where purify removed the empty
    folder it had made (a run that failed before writing anything)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def cli_env() -> dict:
    """Environment for running the CLI in a subprocess: one thread, no progress bars."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]

