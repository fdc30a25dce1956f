"""Class-wise deblurring: undo a convolution that differs by class (CUDA-style poisons) before purification.

A convolution-based poison (CUDA, Sadasivan et al. 2023) filters every image of class c with that class's
small kernel k_c. It multiplies the spectrum instead of adding a bounded perturbation, so Gaussian noise and
the denoiser leave it in place (docs/evaluation.md). It can be undone, because a labelled dataset tells us
which images share a kernel and the defender's sparse clean set tells us what the class looks like clean:

1. **Fit** (:func:`fit_class_kernels`): per class, the mean power spectrum of the training images divided by
   that of the clean images of the same class estimates |K_c(f)|^2. A non-negative ``kernel_size`` x
   ``kernel_size`` kernel (sum 1; a blur) is fitted to that ratio in log space from every one-hot start (the
   power spectrum fixes a full-support kernel up to a 180-degree rotation). A class that fit explains poorly
   is fitted again with a wider kernel (5x5), kept only where it explains far more (CUDA's 5x5 variant).
2. **Gate**: a class whose fitted kernel changes no frequency's power by more than ``gate_db``, or explains
   less than ``MIN_EXPLAINED`` of the class's spectral difference from the clean set (the rest is sampling
   noise), is left alone (identity): clean classes and additive poisons, whose spectra a blur cannot explain,
   are not touched.
3. **Orientation**: of the kernel and its rotation, the one whose deconvolution of the class's images leaves
   less mass outside [0, 1] is kept (a wrong phase rings; measured on CIFAR-10 CUDA: 0.1-0.3 vs 2-13 per mille).
4. **Deconvolve** (:func:`deconvolve`): argmin_x ||k * x - y||^2 + lam ||grad x||^2 with the exact zero-padded
   convolution, by conjugate gradients (batched, any device, deterministic); clamped to [0, 1].

:class:`ClassKernels` is the fitted result (a JSON file: no pickle); :class:`ClasswiseDeblur` applies it to
a batch given each image's label. ``eclipse-stream fit-kernels`` fits it on shards, ``purify --class-kernels``
applies it before the purifier.

5. **Border ring**: near the border the deconvolution is least determined, and its error there differs by
   class (CUDA 5x5, CIFAR-10: the outer row 0.3 to 9.3 /255 off the interior's error, by class): a class-wise
   frame. Where any class is deblurred, every labelled image's outer ring, as wide as the widest kernel's
   radius, is refilled from the pixels inside it (edge replication) **after** purification, deblurred class or
   not, so no class keeps a frame of its own (``ClassKernels.ring``, :meth:`ClasswiseDeblur.refill`; refilled
   before purification instead, the denoiser redraws part of the frame: docs/evaluation.md).

CUDA also divides each image by its own maximum, which brightens a class by an amount its kernel decides
(1.10 to 1.31 on the 5x5 variant). That is not undone: dividing each deblurred class by its gain over the
clean set cost 6.5 to 9 points of victim accuracy on that set (one seed; docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

__all__ = ["ClassKernels", "ClassSpectra", "ClasswiseDeblur", "deconvolve", "fit_class_kernels",
           "fit_kernels_from_shards", "fit_to_reference", "power_spectra", "refill_ring"]

FORMAT = "eclipse-stream class kernels"
VERSION = 1
KERNEL_SIZE = 3          # CUDA's kernels are 3x3
SPECTRUM_SIZE = 32       # spectra are taken on the central SPECTRUM_SIZE^2 crop of every image
GATE_DB = 3.0            # a fitted kernel that changes no frequency's power by more than this is identity
MIN_EXPLAINED = 0.65     # ... and one that explains less than this share of the spectral difference (noise or an
                         # additive poison): 0.5 until SEP remade on a third VM put one class at 53.7% (4.7 dB);
                         # CUDA's deblurred classes explain 75-99%, TAP's and SEP's others at most 48.6%
LAM = 1e-3               # deconvolution: weight of the gradient penalty
CG_ITERS = 60            # deconvolution: conjugate-gradient iterations
MIN_IMAGES = 20          # fewer images of a class (either set): that class is not fitted
FLIP_IMAGES = 200        # images per class deconvolved to choose the orientation
FIT_PER_CLASS = 500      # fit-kernels: images sampled per class from the training shards (and the clean set)
FIT_MAX_SHARDS = 64      # ... from at most this many input shards, evenly spread (one pass over ImageNet's 1,024
                         # shards would read the whole set once more; 64 of them hold ~80 images of each class)
WIDE_KERNEL_SIZE = 5      # a class the 3x3 fit explains poorly is fitted again with a kernel this wide (0: never) ...
WIDE_MIN_EXPLAINED = 0.9  # ... and takes it when it explains at least this share of the spectral difference
WIDE_MARGIN = 0.15        # ... and this much more than the 3x3 fit (a 3x3 blur is a 5x5 one too: no change there)
KERNEL_DECIMALS = 12     # kernels are recorded rounded: float noise in the fit (1e-17) must not change the hash


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def power_spectra(x: torch.Tensor, size: int = SPECTRUM_SIZE) -> torch.Tensor:
    """Mean power spectrum (size x size, float64) of a batch (N x 3 x H x W, uint8 or float in [0, 1]):
    the central crop, mean removed per channel, Hann-windowed."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"images must be at least {size}x{size} pixels, got {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    x = _float(x)[..., top:top + size, left:left + size].double()
    win = torch.hann_window(size, periodic=False, dtype=torch.float64, device=x.device)
    x = (x - x.mean(dim=(-2, -1), keepdim=True)) * (win[:, None] * win[None, :])
    return (torch.fft.fft2(x).abs() ** 2).mean(dim=(0, 1)).cpu()


def _kernel_power(k: torch.Tensor, size: int) -> torch.Tensor:
    return torch.fft.fft2(k, s=(size, size)).abs() ** 2


FIT_CHUNK = 16  # classes per batched kernel search: 10 in one batch take half the time of one at a time, 1,000
               # in one batch 30% more (655 s against 500 s, benchmarks/deblur_fit.py): memory, not arithmetic


def _fit(ratio_log: torch.Tensor, kernel_size: int, iters: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fit_batch` over chunks of ``FIT_CHUNK`` classes."""
    parts = [_fit_batch(ratio_log[i:i + FIT_CHUNK], kernel_size, iters)
             for i in range(0, ratio_log.shape[0], FIT_CHUNK)]
    return torch.cat([k for k, _ in parts]), torch.cat([e for _, e in parts])


def _fit_batch(ratio_log: torch.Tensor, kernel_size: int, iters: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class of ``ratio_log`` (C x S x S, log power ratio), the non-negative, unit-sum kernel whose log power
    response best matches it (up to a constant, DC excluded), from each one-hot start; returns (C x k x k
    kernels, C mean squared log errors).

    Every class's starts run as one batch: Adam is elementwise and each start's loss depends on its own
    parameters only, so every start follows the path it would alone (to 1e-16, up to the rotation two starts may
    tie on), whatever else is in the batch."""
    classes, size = ratio_log.shape[0], ratio_log.shape[-1]
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[0, 0] = False
    starts = kernel_size * kernel_size
    theta = torch.full((classes, starts, kernel_size, kernel_size), -2.0, dtype=torch.float64)
    theta.view(classes, starts, -1)[:, torch.arange(starts), torch.arange(starts)] = 1.0
    theta.requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    target = ratio_log[:, None]

    def losses(theta):
        k = F.softplus(theta)
        k = k / k.sum(dim=(-2, -1), keepdim=True)
        d = (target - torch.log(_kernel_power(k, size) + 1e-12))[..., mask]
        return k, ((d - d.mean(dim=-1, keepdim=True)) ** 2).mean(dim=-1)

    for _ in range(iters):
        _, loss = losses(theta)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        k, loss = losses(theta)
    best = torch.argmin(loss, dim=1)
    rows = torch.arange(classes)
    return k[rows, best].detach(), loss[rows, best].detach()


def gain_db(kernel: torch.Tensor, size: int = SPECTRUM_SIZE) -> float:
    """Largest change of power (dB) the kernel makes at any frequency."""
    return float(10 * torch.log10(_kernel_power(kernel.double(), size).clamp_min(1e-12)).abs().max())


def _conv(x: torch.Tensor, k: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    c, ks = x.shape[1], k.shape[-1]
    w = k.to(x.dtype).expand(c, 1, ks, ks)
    op = F.conv_transpose2d if transpose else F.conv2d
    return op(x, w, padding=ks // 2, groups=c)


def _grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dy = torch.zeros_like(x), torch.zeros_like(x)
    dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    return dx, dy


def _grad_t(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(dx)
    out[..., :, 1:] += dx[..., :, :-1]
    out[..., :, :-1] -= dx[..., :, :-1]
    out[..., 1:, :] += dy[..., :-1, :]
    out[..., :-1, :] -= dy[..., :-1, :]
    return out


def deconvolve(y: torch.Tensor, kernel: torch.Tensor, lam: float = LAM, iters: int = CG_ITERS) -> torch.Tensor:
    """argmin_x ||kernel * x - y||^2 + lam ||grad x||^2 (cross-correlation, zero padding, every channel) by
    conjugate gradients; ``y`` float N x C x H x W, result unclamped, same dtype and device.

    Runs in channels-last layout: the depthwise convolutions are about 3x faster so on a CPU (the result
    differs from NCHW by float rounding only, ~1e-5)."""
    kernel = kernel.to(y.device)
    y = y.contiguous(memory_format=torch.channels_last)

    def normal(x):
        return _conv(_conv(x, kernel), kernel, transpose=True) + lam * _grad_t(*_grad(x))

    dims = (1, 2, 3)
    b = _conv(y, kernel, transpose=True)
    x = y.clone()
    r = b - normal(x)
    p = r.clone()
    rs = (r * r).sum(dim=dims, keepdim=True)
    for _ in range(iters):
        ap = normal(p)
        alpha = rs / (p * ap).sum(dim=dims, keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(dim=dims, keepdim=True)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


def refill_ring(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (... x H x W, any dtype) with its outer ``width`` rows and columns replaced by the nearest pixel
    inside them (edge replication); ``x`` itself when ``width`` is 0 or the image has no inside."""
    h, w = x.shape[-2:]
    if width <= 0 or min(h, w) <= 2 * width:
        return x
    rows = torch.arange(h, device=x.device).clamp(width, h - 1 - width)
    cols = torch.arange(w, device=x.device).clamp(width, w - 1 - width)
    return x.index_select(-2, rows).index_select(-1, cols)


def _outside(x: torch.Tensor) -> float:
    """Mean mass outside [0, 1], per mille."""
    return float(((-x).clamp_min(0) + (x - 1).clamp_min(0)).mean()) * 1e3


@dataclass
class ClassKernels:
    """Fitted kernels by class label (as text: ``"3"``, ``"cat"``); a class not in ``kernels`` is left alone.
    Each kernel is square, of odd side at most ``kernel_size`` (a wide fit's 5x5 beside 3x3 ones). ``classes``
    holds what the fit saw for every class (images, error, gain, orientation scores, decision)."""

    kernels: dict[str, list[list[float]]] = field(default_factory=dict)
    classes: dict[str, dict] = field(default_factory=dict)
    kernel_size: int = KERNEL_SIZE
    lam: float = LAM
    iters: int = CG_ITERS
    gate_db: float = GATE_DB

    def __post_init__(self) -> None:
        if not (isinstance(self.kernel_size, int) and self.kernel_size >= 1 and self.kernel_size % 2 == 1):
            raise ValueError(f"kernel_size must be an odd positive integer, not {self.kernel_size!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be a positive number, not {self.lam!r}")
        if not (isinstance(self.iters, int) and 1 <= self.iters <= 10_000):
            raise ValueError(f"iters must be an integer in 1..10000, not {self.iters!r}")
        for label, k in self.kernels.items():
            a = np.asarray(k, dtype=np.float64)
            if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] % 2 != 1 or a.shape[0] > self.kernel_size \
                    or not np.isfinite(a).all() or (a < 0).any() or not abs(a.sum() - 1) < 1e-6:
                raise ValueError(f"kernel of class {label!r} must be square, of odd side at most {self.kernel_size}, "
                                 "finite, non-negative and sum to 1")

    def kernel(self, label) -> torch.Tensor | None:
        k = self.kernels.get(str(label))
        return None if k is None else torch.tensor(k, dtype=torch.float32)

    @property
    def ring(self) -> int:
        """Width of the border ring refilled in every labelled image (step 5): the widest kernel's radius, 0
        when no class is deblurred."""
        return max((len(k) // 2 for k in self.kernels.values()), default=0)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        from .fsutil import write_json
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassKernels:
        """Read a kernels file; InputError naming the file for anything malformed."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: cannot read class kernels: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputError(f"{path}: not an eclipse-stream class kernels file (made by `eclipse-stream fit-kernels`)")
        if d.get("version") != VERSION:
            raise InputError(f"{path}: class kernels version {d.get('version')!r}; this release reads {VERSION}")
        try:
            return cls(kernels={str(k): v for k, v in dict(d["kernels"]).items()}, classes=dict(d.get("classes", {})),
                       kernel_size=d["kernel_size"], lam=d["lam"], iters=d["iters"], gate_db=d["gate_db"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: malformed class kernels: {e}") from e

    def fingerprint(self) -> str:
        """Short text of what the deblurring does (recorded with purify's outputs)."""
        import hashlib
        blob = json.dumps({"kernels": self.kernels, "lam": self.lam, "iters": self.iters, "ring": self.ring},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _by_label(labels: Sequence) -> dict[str, np.ndarray]:
    text = np.asarray([str(v) for v in labels])
    return {c: np.flatnonzero(text == c) for c in sorted(set(text.tolist()))}


@dataclass
class ClassSpectra:
    """What each class of a clean set looks like to the fit: its mean power spectrum (:func:`power_spectra`) and
    how many images it was taken over, by class label (as text). ``eclipse-stream train`` records this for its
    sparse clean set in the denoiser it writes, so that ``purify`` can fit class kernels (``--deblur auto``)
    with no clean set at hand; ``fit-kernels --clean`` computes it from the clean shards each time."""

    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> size x size float64
    images: dict[str, int] = field(default_factory=dict)
    size: int = SPECTRUM_SIZE

    @classmethod
    def from_images(cls, images: torch.Tensor, labels: Sequence, size: int = SPECTRUM_SIZE) -> ClassSpectra:
        """Per class of ``labels``: the mean power spectrum of its images (N x 3 x H x W, uint8 or float)."""
        if len(images) != len(labels):
            raise ValueError("images and labels must have the same length")
        out = cls(size=size)
        for label, idx in _by_label(labels).items():
            out.spectra[label] = power_spectra(images[idx], size)
            out.images[label] = int(len(idx))
        return out

    @classmethod
    def from_shards(cls, inputs, per_class: int = FIT_PER_CLASS, label_key: str | None = None,
                    image_key: str | None = None, seed: int = 0) -> ClassSpectra:
        """Up to ``per_class`` images of every class of the shards ``inputs`` (one pass, as ``scan`` samples)."""
        return cls.from_images(*_sample_labelled(inputs, per_class, label_key, image_key, seed))

    def to_tensor(self) -> tuple[torch.Tensor, dict]:
        """(classes x size x size float64 tensor, JSON metadata) for a checkpoint."""
        labels = sorted(self.spectra)
        t = (torch.stack([self.spectra[c] for c in labels]) if labels
             else torch.zeros(0, self.size, self.size, dtype=torch.float64))
        return t, {"labels": labels, "images": [self.images[c] for c in labels], "size": self.size}

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, meta: dict) -> ClassSpectra:
        """Inverse of :meth:`to_tensor`; ValueError for anything inconsistent."""
        labels, images, size = meta.get("labels"), meta.get("images"), meta.get("size")
        if not (isinstance(labels, list) and all(isinstance(c, str) for c in labels) and len(set(labels)) == len(labels)
                and isinstance(images, list) and len(images) == len(labels)
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in images)
                and isinstance(size, int) and size == SPECTRUM_SIZE):
            raise ValueError("class spectra metadata must list distinct text labels, a positive image count for "
                             f"each and size {SPECTRUM_SIZE}")
        if tuple(tensor.shape) != (len(labels), size, size) or not bool((tensor > 0).all()):
            raise ValueError(f"class spectra tensor must be {len(labels)} x {size} x {size} and positive, "
                             f"got {tuple(tensor.shape)}")
        t = tensor.to(torch.float64)
        return cls({c: t[i] for i, c in enumerate(labels)}, dict(zip(labels, images)), size)


def _sample_labelled(inputs, per_class: int, label_key: str | None, image_key: str | None, seed: int,
                     on_shard_error=None, expanded: bool = False):
    """Up to ``per_class`` images of every class of the shards ``inputs``: (N x 3 x 32 x 32 uint8, labels), the
    central ``SPECTRUM_SIZE`` window at native resolution, labels as each format reads them. ``on_shard_error``
    and ``expanded``: as :func:`~eclipse_stream.scan.sampling.sample_shards` (None: an unreadable shard raises)."""
    from .scan.config import ScanConfig
    from .scan.sampling import sample_shards

    cfg = ScanConfig(per_class=per_class, label_key=label_key, image_key=image_key, seed=seed, by="none",
                     probe_size=SPECTRUM_SIZE, view="crop")
    s = sample_shards(list(inputs) if not isinstance(inputs, (str, os.PathLike)) else [inputs], cfg,
                      groups=False, on_shard_error=on_shard_error, expanded=expanded).whole
    return torch.from_numpy(np.ascontiguousarray(s.images)).permute(0, 3, 1, 2), [s.classes[i] for i in s.labels]


def fit_class_kernels(images: torch.Tensor, labels: Sequence, clean_images: torch.Tensor, clean_labels: Sequence,
                      kernel_size: int = KERNEL_SIZE, gate_db: float = GATE_DB, lam: float = LAM,
                      iters: int = CG_ITERS, log=None) -> ClassKernels:
    """Fit one kernel per class of ``images`` (N x 3 x H x W, uint8 or float; a sample of the training set)
    against the clean images of the same class (the sparse clean set). Deterministic."""
    if len(clean_images) != len(clean_labels):
        raise ValueError("images and labels must have the same length")
    return fit_to_reference(images, labels, ClassSpectra.from_images(clean_images, clean_labels), kernel_size,
                            gate_db, lam, iters, log)


def fit_to_reference(images: torch.Tensor, labels: Sequence, reference: ClassSpectra,
                     kernel_size: int = KERNEL_SIZE, gate_db: float = GATE_DB, lam: float = LAM,
                     iters: int = CG_ITERS, log=None, wide_kernel_size: int = WIDE_KERNEL_SIZE) -> ClassKernels:
    """:func:`fit_class_kernels` against a clean set's recorded :class:`ClassSpectra` (e.g. a denoiser's).

    ``wide_kernel_size`` (larger than ``kernel_size``; 0: off): a class whose fit changes some frequency's power
    by more than ``gate_db`` but explains less than ``WIDE_MIN_EXPLAINED - WIDE_MARGIN`` of its spectral
    difference is fitted again that wide, and takes the wide kernel when it passes the gate, explains at least
    ``WIDE_MIN_EXPLAINED`` and ``WIDE_MARGIN`` more than the narrow fit (CUDA's 5x5 variant: 39-69% with 3x3,
    9-20 dB; 96-99% with 5x5. Clean sets: no class over 3 dB, so no refit; OPS and URP classes over 3 dB are
    refitted and stay identity; SEP, whose one class a 5x5 fit explained 53%, would stay identity)."""
    if len(images) != len(labels):
        raise ValueError("images and labels must have the same length")
    wide = wide_kernel_size if wide_kernel_size and wide_kernel_size > kernel_size else 0
    if wide and wide % 2 != 1:
        raise ValueError(f"wide_kernel_size must be odd, not {wide_kernel_size!r}")
    out = ClassKernels(kernel_size=kernel_size, lam=lam, iters=iters, gate_db=gate_db)
    fitted, ratios = [], []
    for label, idx in _by_label(labels).items():
        info: dict = {"images": int(len(idx)), "clean_images": int(reference.images.get(label, 0))}
        out.classes[label] = info
        if len(idx) < MIN_IMAGES or info["clean_images"] < MIN_IMAGES:
            info["decision"] = f"not fitted: fewer than {MIN_IMAGES} images in the set or the clean set"
            continue
        fitted.append((label, idx, info))
        ratios.append(torch.log(power_spectra(images[idx])) - torch.log(reference.spectra[label]))
    if not fitted:
        return out
    found = _judged(torch.stack(ratios), kernel_size, gate_db)
    chosen = {i: k for i, (k, _, _, passed) in enumerate(found) if passed}
    for (_, _, info), (k, err, explained, _) in zip(fitted, found):
        info.update(fit_error=round(err, 5), gain_db=round(gain_db(k), 3), explained=round(explained, 3))
    # only a real spectral change (over the gate) that the narrow fit cannot explain: clean data costs no refit
    retry = [i for i, f in enumerate(found)
             if wide and fitted[i][2]["gain_db"] > gate_db and f[2] < WIDE_MIN_EXPLAINED - WIDE_MARGIN]
    if retry:
        again = _judged(torch.stack([ratios[i] for i in retry]), wide, gate_db)
        for i, (k, err, explained, passed) in zip(retry, again):
            info = fitted[i][2]
            info["wide"] = {"size": wide, "fit_error": round(err, 5), "gain_db": round(gain_db(k), 3),
                            "explained": round(explained, 3)}
            if passed and explained >= WIDE_MIN_EXPLAINED and explained - found[i][2] >= WIDE_MARGIN:
                chosen[i] = k
    for i, (label, idx, info) in enumerate(fitted):
        if i not in chosen:
            info["decision"] = "identity (no blur found)"
        else:
            k = chosen[i]
            sub = _float(images[idx[:FLIP_IMAGES]])
            cands = [k, torch.flip(k, dims=(0, 1))]
            scores = [_outside(deconvolve(sub, c.float(), lam, iters)) for c in cands]
            k = cands[int(np.argmin(scores))]
            size = k.shape[-1]
            info.update(outside_per_mille=[round(s, 4) for s in scores],
                        decision="deblurred" if size == kernel_size else f"deblurred ({size}x{size})")
            out.kernels[label] = [[round(float(v), KERNEL_DECIMALS) for v in row] for row in (k / k.sum()).tolist()]
            out.kernel_size = max(out.kernel_size, size)
        if log:
            log(f"class {label}: {info['decision']} (gain {info['gain_db']} dB, explains {info['explained']:.0%} "
                f"of the spectral difference" + (f"; {wide}x{wide}: {info['wide']['explained']:.0%}"
                                                 if "wide" in info else "") + ")")
    return out


def _judged(ratios: torch.Tensor, kernel_size: int, gate_db: float = GATE_DB) -> list[tuple]:
    """(kernel, fit error, share of the spectral difference explained, passes the gate) per class of ``ratios``."""
    kernels, errors = _fit(ratios, kernel_size)
    out = []
    for ratio, k, err in zip(ratios, kernels, errors.tolist()):
        d = ratio.flatten()[1:]  # DC excluded, as in the fit
        explained = 1 - err / max(float(((d - d.mean()) ** 2).mean()), 1e-12)
        out.append((k, err, explained, round(gain_db(k), 3) > gate_db and explained >= MIN_EXPLAINED))
    return out


def spread(shards: Sequence, most: int) -> list:
    """At most ``most`` of ``shards``, evenly spaced from the first (all of them when there are no more)."""
    shards = list(shards)
    if len(shards) <= most:
        return shards
    return [shards[i * len(shards) // most] for i in range(most)]


def fit_kernels_from_shards(inputs, clean=None, per_class: int = FIT_PER_CLASS, label_key: str | None = None,
                            image_key: str | None = None, seed: int = 0, kernel_size: int = KERNEL_SIZE,
                            log=None, reference: ClassSpectra | None = None, on_shard_error=None,
                            max_shards: int | None = FIT_MAX_SHARDS,
                            wide_kernel_size: int = WIDE_KERNEL_SIZE) -> ClassKernels:
    """``eclipse-stream fit-kernels``: sample up to ``per_class`` images of every class from the shards
    ``inputs`` (one pass over at most ``max_shards`` of them, evenly spread (:func:`spread`; None: all), as
    ``scan`` samples: labels as each format reads them, the central 32 x 32 window at native resolution) and fit
    them against the clean set's shards ``clean`` (sampled the same way, every shard) or a recorded
    ``reference`` (``purify --deblur auto``: the denoiser's). ``on_shard_error(shard, error)``: told of an input
    shard that cannot be read to its end, whose readable samples still count (None: it raises).
    ``wide_kernel_size``: as :func:`fit_to_reference`."""
    from .sources import expand_shards

    if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size must be an odd positive integer, not {kernel_size!r}")
    if (clean is None) == (reference is None):
        raise ValueError("give exactly one of clean (shards) and reference (ClassSpectra)")
    if max_shards is not None and not (isinstance(max_shards, int) and max_shards >= 1):
        raise ValueError(f"max_shards must be a positive integer or None, not {max_shards!r}")
    shards = expand_shards([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    images, labels = _sample_labelled(shards if max_shards is None else spread(shards, max_shards), per_class,
                                      label_key, image_key, seed, on_shard_error, expanded=True)
    if reference is None:
        reference = ClassSpectra.from_shards(clean, per_class, label_key, image_key, seed)
    return fit_to_reference(images, labels, reference, kernel_size=kernel_size, log=log,
                            wide_kernel_size=wide_kernel_size)


class ClasswiseDeblur(nn.Module):
    """Deconvolve each image with its class's kernel (``ClassKernels``); others pass unchanged.

    ``forward(x, labels)``: x uint8 (0..255) or float ([0, 1]) N x C x H x W, ``labels`` one per image (int or
    text, compared as text; None for an unlabelled image, which passes unchanged). Same dtype and shape out
    (uint8 by rounding), on x's device; deterministic.
    """

    def __init__(self, kernels: ClassKernels):
        super().__init__()
        self.kernels = kernels
        self.deblurred = 0  # images deconvolved so far (purify warns when a run deblurred none)

    def forward(self, x: torch.Tensor, labels: Sequence) -> torch.Tensor:
        if len(labels) != x.shape[0]:
            raise ValueError(f"got {len(labels)} labels for a batch of {x.shape[0]} images")
        out = None
        for label, idx in _by_label(["" if v is None else v for v in labels]).items():
            k = self.kernels.kernel(label) if label else None
            if k is None:
                continue
            if out is None:
                out = _float(x).clone()
            sel = torch.as_tensor(idx, device=x.device)
            self.deblurred += len(idx)
            out[sel] = deconvolve(_float(x[sel]), k, self.kernels.lam, self.kernels.iters).clamp(0, 1)
        if out is None:
            return x
        if x.dtype == torch.uint8:
            return (out * 255).round().to(torch.uint8)
        return out.to(x.dtype)

    def refill(self, out: torch.Tensor, labels: Sequence) -> torch.Tensor:
        """After the purifier: every labelled image of ``out`` (deblurred class or not) with its border ring
        refilled (:func:`refill_ring`, ``ClassKernels.ring`` wide; step 5); ``out`` itself when no class is
        deblurred or no image is labelled."""
        if len(labels) != out.shape[0]:
            raise ValueError(f"got {len(labels)} labels for a batch of {out.shape[0]} images")
        labelled = [i for i, v in enumerate(labels) if v is not None and str(v) != ""]
        if not self.kernels.ring or not labelled:
            return out
        out = out.clone()
        sel = torch.as_tensor(labelled, device=out.device)
        out[sel] = refill_ring(out[sel], self.kernels.ring)
        return out
