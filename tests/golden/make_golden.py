"""Build the byte-identity fixtures of tests/test_golden.py: small inputs and the outputs of ``purify``.

Run once with the code whose output is the reference (it was run at commit 98ffd19, before the pipeline
redesign of issue 11; rerunning it at a later commit must change nothing), from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tests/golden/make_golden.py

Inputs (``tests/golden/in``): two tars of real CIFAR-10 images (png, jpg, two image fields per sample with an
upper-case extension, gif, tiff, an odd ``.txt`` field, a ``_private`` field, an undecodable image, a loose
extension-less member and a directory; several image sizes, so that bucketing matters) and, when ffcv is
installed, two ``.beton`` files (raw and jpg storage). Outputs (``tests/golden/out-<setting>``): the purified
shards of each setting in ``SETTINGS``, with the tiny denoiser of ``helpers.make_denoiser`` (seed 0).
Every file is stored gzipped (``.beton`` files are mostly zero padding).
"""

from __future__ import annotations

import gzip
import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# name -> (purifier settings, pipeline settings); every one with on_error="skip" and 4 images a batch
SETTINGS = {
    # the robust recipe at t* = 100: the default when these bytes were made (t* is 200 since 2026-12-07; the
    # bytes stay a check of the pipeline, so the setting is pinned)
    "default": ({"t_star": 100}, {}),
    "paper-steps2": ({"recipe": "paper", "steps": 2}, {}),
}
PIPELINE = {"batch_size": 4, "workers": 0, "on_error": "skip", "seed": 3}


def _encode(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _member(tf: tarfile.TarFile, name: str, data: bytes | None, kind=tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 0
    info.size = len(data) if data is not None else 0
    tf.addfile(info, io.BytesIO(data) if data is not None else None)


def build_inputs(d: Path, cifar: list) -> None:
    """The input shards (deterministic bytes: fixed images, mtime 0)."""
    d.mkdir(parents=True, exist_ok=True)
    rgbs = [np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")) for _, _, jpg in cifar]
    sizes = [(32, 32), (32, 32), (24, 40), (32, 32), (40, 24), (32, 32), (17, 30), (32, 32)]

    def image(i: int) -> np.ndarray:
        h, w = sizes[i % len(sizes)]
        if (h, w) == (32, 32):
            return rgbs[i]
        return np.asarray(Image.fromarray(rgbs[i]).resize((w, h), Image.BICUBIC))

    with tarfile.open(d / "a.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        _member(tf, "README", b"loose member before the first sample\n")
        for i in range(14):
            key = f"s{i:03d}"
            fields = {"cls": str(cifar[i][1]).encode(), "json": f'{{"i": {i}}}'.encode()}
            if i % 3 == 0:
                fields["png"] = _encode(image(i), "PNG")
            elif i % 3 == 1:
                fields["jpg"] = _encode(image(i), "JPEG", quality=90)
            else:
                fields["left.PNG"] = _encode(image(i), "PNG")
                fields["right.jpg"] = _encode(image(i + 20), "JPEG", quality=85, subsampling=0)
            if i == 5:
                fields["odd.txt"] = b"an odd field, copied unchanged"
                fields["_private"] = b"kept"
            if i == 7:
                fields = {"cls": b"1", "png": b"not an image at all"}  # rejected under on_error=skip
            for name in sorted(fields):
                _member(tf, f"{key}.{name}", fields[name])
            if i == 9:
                _member(tf, "somedir", None, tarfile.DIRTYPE)
    with tarfile.open(d / "b.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(14, 26):
            key = f"t{i:03d}"
            fields = {"cls": str(cifar[i][1]).encode()}
            if i % 4 == 0:
                fields["gif"] = _encode(image(i), "GIF")
            elif i % 4 == 1:
                fields["tiff"] = _encode(image(i), "TIFF")
            elif i % 4 == 2:
                fields["webp"] = _encode(image(i), "WEBP", lossless=True)
            else:
                fields["jpeg"] = _encode(image(i), "JPEG", quality=95)
            for name in sorted(fields):
                _member(tf, f"{key}.{name}", fields[name])
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    for mode, offset in (("raw", 26), ("jpg", 38)):
        rows = [(image(i), cifar[i][1], i / 8.0) for i in range(offset, offset + 12)]

        class Rows:
            def __len__(self):
                return len(rows)

            def __getitem__(self, i):
                return rows[i]

        fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=90), "label": IntField(),
                  "weight": FloatField()}
        DatasetWriter(str(d / f"c-{mode}.beton"), fields, num_workers=1).from_indexed_dataset(Rows())


def pack(folder: Path) -> None:
    """gzip every shard of ``folder`` in place (``.beton`` files are mostly zero pages: 16 MiB -> 25 KB)."""
    for p in sorted(folder.iterdir()):
        if p.suffix in (".tar", ".beton"):
            with open(p, "rb") as src, gzip.GzipFile(p.with_name(p.name + ".gz"), "wb", 9, mtime=0) as dst:
                shutil.copyfileobj(src, dst)
            p.unlink()


def unpack(folder: Path, dest: Path) -> Path:
    """The shards of a packed ``folder``, un-gzipped into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.glob("*.gz")):
        with gzip.open(p, "rb") as src, open(dest / p.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return dest


def run_settings(inputs: Path, out_root: Path, ckpt: Path) -> None:
    from eclipse_stream.pipeline import PurifyConfig, purify_shards
    from eclipse_stream.purifier import PurifierConfig

    for name, (pur, pipe) in SETTINGS.items():
        out = out_root / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = PurifyConfig(purifier=PurifierConfig.from_recipe(**pur), **{**PIPELINE, **pipe})
        purify_shards(inputs, out, ckpt, cfg, progress=False)
        for p in out.iterdir():  # keep only the shards: stats and manifest hold times and paths
            if p.suffix not in (".tar", ".beton"):
                p.unlink()


if __name__ == "__main__":
    import tempfile

    import torch

    torch.set_num_threads(1)
    from helpers import make_denoiser, read_cifar

    with tempfile.TemporaryDirectory() as tmp:
        shutil.rmtree(HERE / "in", ignore_errors=True)
        build_inputs(Path(tmp) / "in", read_cifar(50))
        run_settings(Path(tmp) / "in", HERE, make_denoiser(Path(tmp) / "tiny.safetensors"))
        shutil.copytree(Path(tmp) / "in", HERE / "in")
    for folder in [HERE / "in", *(HERE / f"out-{name}" for name in SETTINGS)]:
        pack(folder)
