"""``EclipseTransform``: purification as a WebDataset pipeline stage.

It takes an iterator of *decoded* samples and yields the same samples, in the same
order, with each image purified; every other field (``__key__`` included) passes through
untouched. Samples are buffered ``batch_size`` at a time, grouped by image size and
purified on the device in one call per group. Works in ``wds.DataPipeline(...)`` and in
``wds.WebDataset(...).compose(...)``. Images larger than one tile (twice the denoiser's training size) are
purified in tiles (``large_images``, see :mod:`eclipse_stream.tiling`), each with noise from its own generator,
seeded with ``(seed, the sample's position in the stream, the field)``: their output does not depend on
``batch_size`` or on the other samples of the buffer. ``EclipseTransform.purifier`` is the underlying
:class:`~eclipse_stream.purifier.Purifier`, an ``nn.Module`` for GPU batches (e.g. in an
FFCV pipeline after ``ToDevice``/``ToTorchImage``).

``class_kernels`` (a file from ``eclipse-stream fit-kernels`` or a :class:`~eclipse_stream.deblur.ClassKernels`)
deconvolves each image with its class's kernel first (the label from ``label_key``, default the first of
cls/class/label/target) and refills every labelled image's border ring after purifying; on device batches use
:class:`~eclipse_stream.deblur.ClasswiseDeblur` before the purifier and its ``refill`` after it.

Image values may be PIL images, HWC numpy arrays (uint8 or float in [0, 1]) or CHW
torch tensors (uint8 or float in [0, 1]); each comes back as the same type. A PIL image
in L/LA/RGBA mode comes back in that mode with its alpha channel unchanged (the denoiser
sees RGB; other modes such as P or CMYK come back as RGB).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .checkpoint import Denoiser, load_denoiser
from .config import PurifierConfig
from .defaults import IMAGE_EXTENSIONS
from .devices import resolve_device
from .purifier import Purifier
from .seeding import stream_seed

__all__ = ["EclipseTransform"]

DEFAULT_IMAGE_KEYS = ";".join(IMAGE_EXTENSIONS)  # the one list of image fields, as purify and scan


def _to_tensor(value) -> tuple[torch.Tensor, str]:
    """A CHW tensor (uint8 for 8-bit inputs, so 4x fewer bytes go to the device; float in [0, 1]
    otherwise) and a tag saying how to convert back."""
    if isinstance(value, Image.Image):
        return torch.from_numpy(np.asarray(value.convert("RGB")).copy()).permute(2, 0, 1), "pil"
    if isinstance(value, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
        return (t, "np8") if value.dtype == np.uint8 else (t.float(), f"np:{value.dtype}")
    if torch.is_tensor(value):
        return (value, "t8") if value.dtype == torch.uint8 else (value.float(), f"t:{value.dtype}")
    raise TypeError(f"cannot purify a {type(value).__name__}: decode images first (e.g. .decode('pil'))")


def _from_tensor(x: torch.Tensor, tag: str, like):
    if tag == "pil":
        # as eclipse_stream.imageio does for stored images: gray stays gray, alpha is re-attached unchanged
        img = Image.fromarray(x.permute(1, 2, 0).numpy())
        if like.mode in ("L", "LA"):
            img = img.convert("L")
        if "A" in like.getbands():
            img.putalpha(like.getchannel("A"))
        return img
    if tag == "np8":
        return x.permute(1, 2, 0).numpy()
    if tag.startswith("np:"):
        return x.permute(1, 2, 0).numpy().astype(like.dtype)
    if tag == "t8":
        return x.to(like.device)
    return x.to(device=like.device, dtype=like.dtype)


class EclipseTransform:
    """A WebDataset stage that purifies each sample's image (see the module docstring).

    ``denoiser``: a checkpoint path, a loaded :class:`Denoiser`, or None for the shipped default.
    Purifier settings left None are the recipe's / :class:`PurifierConfig`'s defaults. ``image_key``: the
    fields to look for, ';'-separated, first present wins (default: every image extension purify knows).
    Randomness comes from one generator seeded with ``seed``: the same stream in the same
    order gives the same output.
    """

    def __init__(self, denoiser: str | os.PathLike | Denoiser | None = None, *, recipe: str | None = None,
                 t_star: int | None = None, steps: int | None = None, precision: str | None = None,
                 corruption: str | None = None, prefilter: str | None = None, large_images: str | None = None,
                 batch_size: int = 64, device: str | torch.device | None = None, image_key: str = DEFAULT_IMAGE_KEYS,
                 seed: int = 0, class_kernels=None, label_key: str | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        device = resolve_device(device)
        if denoiser is None:
            from .defaults import default_denoiser_path
            denoiser = default_denoiser_path()
        den = denoiser.to(device) if isinstance(denoiser, Denoiser) else load_denoiser(denoiser, device=device)
        cfg = PurifierConfig.from_recipe(recipe, t_star=t_star, steps=steps, precision=precision,
                                         corruption=corruption, prefilter=prefilter, large_images=large_images)
        self.purifier = Purifier(den, cfg)
        self.device, self.batch_size, self.seed = device, batch_size, seed
        self.image_keys = image_key.split(";")
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seen = 0  # samples of the stream so far: the position that seeds a tiled image's generator
        self.deblur = None
        if class_kernels is not None:
            from .deblur import ClassKernels, ClasswiseDeblur
            if not isinstance(class_kernels, ClassKernels):
                class_kernels = ClassKernels.load(class_kernels)
            self.deblur = ClasswiseDeblur(class_kernels)
        self.label_key = label_key

    def _label(self, sample: dict) -> str:
        from .formats import label_of
        return str(label_of(sample, self.label_key, (str(sample.get("__url__", "stream")), str(sample.get("__key__")))))

    def _purify_group(self, images: list[torch.Tensor], positions: list[tuple[int, str]],
                      labels: list | None = None) -> list[torch.Tensor]:
        batch = torch.stack(images).to(self.device)
        if self.deblur is not None:
            batch = self.deblur(batch, labels)
        gen = self.generator
        if self.purifier.tiles(*batch.shape[-2:]):  # one by one, each with its own noise
            gen = [torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, "transform", i, key))
                   for i, key in positions]
        out = self.purifier(batch, generator=gen)
        if self.deblur is not None:
            out = self.deblur.refill(out, labels)
        return list(out.cpu())

    def _flush(self, buffer: list[dict]) -> Iterator[dict]:
        first, self._seen = self._seen, self._seen + len(buffer)
        slots = []  # (sample index, image key, tensor, tag, original)
        for i, sample in enumerate(buffer):
            key = next((k for k in self.image_keys if k in sample), None)
            if key is not None:
                tensor, tag = _to_tensor(sample[key])
                slots.append((i, key, tensor, tag, sample[key],
                              self._label(sample) if self.deblur is not None else None))
        by_size: dict[tuple, list[int]] = {}  # uint8 and float images are purified in separate calls
        for n, slot in enumerate(slots):
            by_size.setdefault((tuple(slot[2].shape), slot[2].dtype), []).append(n)
        results: dict[int, torch.Tensor] = {}
        for members in by_size.values():
            positions = [(first + slots[n][0], slots[n][1]) for n in members]
            labels = [slots[n][5] for n in members]
            for n, out in zip(members, self._purify_group([slots[n][2] for n in members], positions, labels)):
                results[n] = out
        out_samples = [dict(s) for s in buffer]
        for n, (i, key, _, tag, original, _label) in enumerate(slots):
            out_samples[i][key] = _from_tensor(results[n], tag, original)
        yield from out_samples

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in src:
            buffer.append(sample)
            if len(buffer) >= self.batch_size:
                yield from self._flush(buffer)
                buffer = []
        if buffer:
            yield from self._flush(buffer)
