"""``eclipse-stream scan``: does a labelled image dataset look poisoned by an availability attack?

Why it works
------------
Availability poisons ("unlearnable examples": URP, LSP, AR, OPS, EM, TAP, ...) plant a
*shortcut*: a small, class-correlated perturbation that a network fits far more easily than
the image content. The shortcut is so simple that a *quick probe* -- a linear model on a
few hundred images -- predicts the labels of **held-out images of the same set** almost
perfectly, from a handful of training images per class, whereas on clean natural images the
same probe stays near chance. This is the simple-model detection of Zhu, Yu & Gao
("Detection and Defense of Unlearnable Examples", AAAI 2024: train a simple model on part of
the set, compare its accuracy on the rest with a bound); the probes here are linear and
closed-form, so a scan takes seconds on a CPU and gives the same answer on every machine.

What a scan does
----------------
1. **Sample** up to ``per_class`` images of every class, chosen uniformly over the whole
   input with a seeded reservoir (one pass, never the whole dataset in memory; only the
   chosen images are decoded, with the same decoder and bad-input errors as ``purify``).
   The probes see the central ``probe_size`` x ``probe_size`` window of each image at its
   native resolution (``view="crop"``; images smaller than that are resized up).
2. **Features** for three probes. Two use the *high-pass residual* (the image minus its 3x3
   blur), which removes most of a natural image's energy but keeps most of a pixel-level
   perturbation:
   ``pixels`` -- the residual's pixels (class-wise pixel patterns: URP, OPS, ...);
   ``texture`` -- the residual's local auto-correlations (products with itself shifted by up to
   2 pixels, every channel pair), which expose a per-class noise *process* even when every
   image gets a different draw (AR, ...);
   ``blocks`` -- the image's 4 x 4 grid of mean colours, for patch-wise patterns that the
   high-pass filter removes (LSP's 8 x 8 patches at 32 x 32).
3. **Probe**: ridge regression on one-hot labels (standardised features, closed form),
   ``folds``-fold cross-validated, so every sampled image is predicted by a probe that never
   saw it. The held-out balanced accuracy (mean per-class recall) is also measured with 2, 4,
   8, ... training images per class: the *learning curve*. A shortcut is learned from a few
   images; real features are not.
4. **Score** of a probe: ``(acc - 1/K) / (1 - 1/K)`` for K classes -- 0 at chance, 1 when every
   held-out image is classified right. The dataset's score is the largest probe score. The
   same probes on the same images with their labels shuffled (``null``) give the no-signal
   curve, near 0, for the plot.
5. **Verdict** (no reference): ``likely poisoned`` if score >= ``threshold``, ``no sign of
   poisoning`` if score < ``clean_below``, ``inconclusive`` in between (or when the median class
   has fewer than ``min_per_class`` images). With a clean ``reference`` (e.g. the sparse clean
   set ECLIPSE's denoiser is trained on), both are scanned at the same per-class count and
   seed, and the score is the largest excess of a probe's score over the reference's
   (``relative_threshold`` / ``relative_clean_below``).

The thresholds are calibrated on CIFAR-10 (docs/evaluation.md, "Poison scan"). They are for
natural photos: a dataset whose clean images a linear probe on these features already
separates (digits, synthetic renders, classes that differ in sharpness or noise level, e.g.
photos from different cameras per class) scores high without any poison; give it a clean
``reference``. What a scan cannot see: poisons that plant no
shortcut (clean-label targeted/backdoor attacks on a few samples, label flipping of a small
fraction), a poisoned *fraction* too small to move a probe's accuracy, perturbations with no
high-frequency part (a smooth per-class colour cast), patterns outside the central window on
larger images (``probe_size``), and poisons designed to defeat linear probes.

API: :func:`scan_shards` (tar / .beton shards, as ``purify`` takes them), :func:`scan_samples`
(an iterable of WebDataset sample dicts, raw or decoded), :func:`scan_arrays` (NHWC uint8
images + labels). Each returns a :class:`ScanResult` (``verdict``, ``score``, ``exit_code``,
``to_dict()``, ``write_json()``, ``plot()``).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import is_int, is_real
from .devices import AUTO, resolve_device
from .errors import InputError, SampleError
from .formats import LABEL_KEYS, class_label, format_for, sample_label  # noqa: F401  (LABEL_KEYS re-exported)
from .fsutil import atomic_path
from .imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from .outputs import check_output_files
from .sources import expand_shards, resize_center_crop

__all__ = [
    "LIKELY_POISONED", "NO_SIGN", "INCONCLUSIVE", "EXIT_CODES", "LABEL_KEYS",
    "ScanConfig", "ScanResult", "scan_shards", "scan_samples", "scan_arrays",
]

LIKELY_POISONED = "likely poisoned"
NO_SIGN = "no sign of poisoning"
INCONCLUSIVE = "inconclusive"
#: Exit status of ``eclipse-stream scan`` per verdict; errors keep 1 (other), 2 (bad input/usage), 3 (checkpoint).
EXIT_CODES = {NO_SIGN: 0, LIKELY_POISONED: 10, INCONCLUSIVE: 11}
MIN_PER_CLASS = 4  # a class with fewer readable sampled images is left out (one per fold at most 4 folds)
#: The largest probe window: features grow with its square (about 50 KB per sampled image at 32, 800 KB at 128),
#: and images smaller than the window are resized up to it.
MAX_PROBE_SIZE = 128
PROBES = ("pixels", "texture", "blocks")


@dataclass
class ScanConfig:
    """How a scan samples and probes. The defaults are the setting measured in docs/evaluation.md ("Poison scan").

    Memory: about 50 KB per sampled image at ``probe_size`` 32 (float64 features), so lower
    ``per_class`` for datasets with thousands of classes.
    """

    per_class: int = 100            # images sampled per class (fewer if a class has fewer)
    probes: tuple = PROBES          # which probes run; the score is the largest
    probe_size: int = 32            # the probes see a probe_size x probe_size view of each image
    view: str = "crop"              # crop: central window at native resolution; resize: whole image
    folds: int = 4                  # cross-validation folds (every sampled image is held out once)
    seed: int = 0                   # sampling, folds and the shuffled-label control
    device: str | None = None       # None / "auto": cuda when present, else cpu
    label_key: str | None = None    # None: first of LABEL_KEYS present
    image_key: str | None = None    # None: first image field, as purify
    max_pixels: int = DEFAULT_MAX_PIXELS
    on_error: str = "fail"          # fail | skip (a bad sampled image is recorded and left out)
    null: bool = True               # also fit each probe on shuffled labels (the no-signal curve)
    threshold: float = 0.6          # score >= threshold: likely poisoned
    clean_below: float = 0.45       # score < clean_below: no sign of poisoning
    relative_threshold: float = 0.3     # with a reference: excess >= this: likely poisoned
    relative_clean_below: float = 0.15  # with a reference: excess < this: no sign
    min_per_class: int = 20         # fewer sampled images per class (median): inconclusive

    def __post_init__(self) -> None:
        if self.per_class < MIN_PER_CLASS:
            raise ValueError(f"per_class must be at least {MIN_PER_CLASS}, not {self.per_class}")
        self.probes = tuple(self.probes)
        unknown = [p for p in self.probes if p not in _FEATURES]
        if unknown or not self.probes:
            raise ValueError(f"probes must be some of {', '.join(_FEATURES)}, not {list(self.probes)}")
        if not 2 <= self.folds <= MIN_PER_CLASS:
            raise ValueError(f"folds must be between 2 and {MIN_PER_CLASS}, not {self.folds}")
        if self.view not in ("crop", "resize"):
            raise ValueError(f"view must be 'crop' or 'resize', not {self.view!r}")
        if not is_int(self.probe_size, 8, MAX_PROBE_SIZE):
            raise ValueError(f"probe_size must be in 8..{MAX_PROBE_SIZE} (its square sizes the features), "
                             f"not {self.probe_size!r}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")
        if not is_int(self.max_pixels, 1):
            raise ValueError(f"max_pixels must be positive, not {self.max_pixels!r}")
        for name in ("threshold", "clean_below", "relative_threshold", "relative_clean_below"):
            if not is_real(getattr(self, name), 0.0, 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], not {getattr(self, name)!r}")
        if not self.clean_below <= self.threshold or not self.relative_clean_below <= self.relative_threshold:
            raise ValueError("the 'clean below' bounds must not exceed the thresholds")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if self.device not in AUTO:
            resolve_device(self.device)  # an unknown or absent device is refused before any shard is read


# --------------------------------------------------------------------------------------------- sampling


@dataclass
class _Sampled:
    """The chosen images of one input, as probe-ready arrays."""

    images: np.ndarray          # (N, S, S, 3) uint8
    labels: np.ndarray          # (N,) int64 class indices into `classes`
    classes: list[str]          # class names (label values as text), sorted
    seen: dict[str, int]        # images per class in the whole input
    skipped: list[dict] = field(default_factory=list)  # {shard, key, reason} under on_error=skip
    sources: list[str] = field(default_factory=list)


class _Reservoir:
    """Uniform sample of up to ``n`` items per label from one pass over a stream (algorithm R)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.buckets: dict = {}
        self.counts: dict = {}

    def add(self, label, item) -> None:
        count = self.counts.get(label, 0) + 1
        self.counts[label] = count
        bucket = self.buckets.setdefault(label, [])
        if len(bucket) < self.n:
            bucket.append(item)
        else:
            j = int(self.rng.integers(count))
            if j < self.n:
                bucket[j] = item


def _label_and_image(sample: dict, where: tuple[str, str], cfg, skipped: list) -> tuple | None:
    """(label, undecoded image) of a sample; None (recorded in ``skipped``) when bad under on_error=skip."""
    try:
        label, field = sample_label(sample, cfg.label_key, cfg.image_key, where)
        return label, sample[field]
    except SampleError as e:
        return _skip(e, cfg, skipped)


def _skip(e: SampleError, cfg, skipped: list) -> None:
    """Record a bad sample under on_error=skip; raise it otherwise."""
    if cfg.on_error == "fail":
        raise e
    skipped.append({"shard": e.shard, "key": e.key, "reason": e.reason})


def _to_rgb(value, where: tuple[str, str], max_pixels: int) -> np.ndarray:
    """uint8 H x W x 3 from encoded bytes (purify's decoder), a PIL image, an array or a tensor."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return decode_image(bytes(value), max_pixels=max_pixels).rgb
        except ImageDecodeError as e:
            raise SampleError(*where, str(e)) from None
    if hasattr(value, "convert") and hasattr(value, "size"):  # PIL image
        return np.asarray(value.convert("RGB"))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.ndim == 3 and value.shape[0] in (1, 3) and value.shape[-1] not in (1, 3):
            value = value.permute(1, 2, 0)  # CHW (torchrgb) -> HWC
        value = value.numpy()
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise SampleError(*where, f"image array of shape {value.shape} is not H x W x (1, 3 or 4)")
        arr = arr[..., :3] if arr.shape[2] >= 3 else np.repeat(arr, 3, axis=2)
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating):
                raise SampleError(*where, f"image array of dtype {arr.dtype} (expected uint8, or float in [0, 1])")
            arr = np.clip(np.rint(arr.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    raise SampleError(*where, f"image field holds {type(value).__name__}, not image bytes, a PIL image or an array")


def _view(rgb: np.ndarray, size: int, view: str) -> np.ndarray:
    """What the probes see: the central size x size window at native resolution (``crop``, the default,
    so pixel-level patterns keep their pixels), or the whole image resized (``resize``). Images smaller
    than the window are resized (shorter side) and centre-cropped either way."""
    h, w = rgb.shape[:2]
    if view == "crop" and h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        return np.ascontiguousarray(rgb[top:top + size, left:left + size])
    return resize_center_crop(rgb, size)


def _sort_labels(labels) -> list:
    return sorted(labels, key=lambda v: (isinstance(v, str), v))


def _finish(reservoir: _Reservoir, load, cfg: ScanConfig, sources: list[str], skipped: list[dict]) -> _Sampled:
    """Decode the chosen items (``load(item) -> rgb``, raising SampleError) into probe-ready arrays."""
    labels_sorted = _sort_labels(reservoir.buckets)
    images, labels, classes = [], [], []
    for label in labels_sorted:
        decoded = []
        for item in reservoir.buckets[label]:
            try:
                rgb = load(item)
            except SampleError as e:
                if cfg.on_error == "fail":
                    raise
                skipped.append({"shard": e.shard, "key": e.key, "reason": e.reason})
                continue
            decoded.append(_view(rgb, cfg.probe_size, cfg.view))
        if len(decoded) < MIN_PER_CLASS:
            continue
        classes.append(str(label))
        images += decoded
        labels += [len(classes) - 1] * len(decoded)
    seen = {str(label): reservoir.counts[label] for label in labels_sorted}
    if len(classes) < 2:
        raise InputError(f"{', '.join(sources[:3]) + (' ...' if len(sources) > 3 else '')}: a scan needs at "
                         f"least 2 classes with {MIN_PER_CLASS}+ readable images each; images per class "
                         f"found: {seen or '(none)'}")
    return _Sampled(np.stack(images), np.asarray(labels, dtype=np.int64), classes, seen, skipped, sources)


def sample_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike], cfg: ScanConfig) -> _Sampled:
    """Choose up to ``cfg.per_class`` images per class from shards of any registered format (one pass each):
    labels as each shard's format reads them, images decoded only for the chosen samples."""
    shards = expand_shards(inputs)
    reservoir = _Reservoir(cfg.per_class, cfg.seed)
    skipped: list[dict] = []
    for shard in shards:
        for item in format_for(shard).labelled(str(shard), cfg.label_key, cfg.image_key, cfg.max_pixels):
            if item.error is not None:
                _skip(SampleError(str(shard), item.key, item.error), cfg, skipped)
            else:
                reservoir.add(item.label, item.load)
    return _finish(reservoir, lambda load: load(), cfg, [str(s) for s in shards], skipped)


def sample_samples(samples: Iterable[dict], cfg: ScanConfig) -> _Sampled:
    """Choose up to ``cfg.per_class`` images per class from WebDataset sample dicts (raw or decoded)."""
    reservoir = _Reservoir(cfg.per_class, cfg.seed)
    skipped: list[dict] = []
    urls: dict[str, None] = {}
    for number, sample in enumerate(samples):
        url = str(sample.get("__url__", "<samples>"))
        urls.setdefault(url)
        where = (url, str(sample.get("__key__", f"#{number}")))
        found = _label_and_image(sample, where, cfg, skipped)
        if found is not None:
            reservoir.add(found[0], (where, found[1]))
    return _finish(reservoir, lambda item: _to_rgb(item[1], item[0], cfg.max_pixels), cfg, list(urls), skipped)


def _subsample(sampled: _Sampled, per_class: int, seed: int) -> _Sampled:
    """At most ``per_class`` images of each class (seeded), to match a reference's size."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(sampled.classes)):
        members = np.flatnonzero(sampled.labels == c)
        keep.append(np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False)))
    keep = np.concatenate(keep)
    return _Sampled(sampled.images[keep], sampled.labels[keep], sampled.classes, sampled.seen,
                    sampled.skipped, sampled.sources)


# --------------------------------------------------------------------------------------------- probes


def _highpass(x: torch.Tensor) -> torch.Tensor:
    """The image minus its 3x3 box blur (edge-replicated): removes most of a natural image's energy,
    keeps most of a pixel-level perturbation's."""
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _texture(x: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Second-order statistics of the high-pass residual: for every offset in a half window of ``radius``
    and every channel pair, the mean product of the residual with its shifted self, divided by the
    residual's mean power, plus the log power per channel. A per-class noise *process* (AR, and other
    textured noise) shows up here even though every image gets a different draw."""
    h = _highpass(x)
    n, _, height, width = h.shape
    core = h[:, :, radius:height - radius, radius:width - radius]
    area = core.shape[2] * core.shape[3]
    feats = []
    for a in range(radius + 1):
        for b in range(-radius, radius + 1):
            if a == 0 and b < 0:
                continue
            shifted = h[:, :, radius + a:height - radius + a, radius + b:width - radius + b]
            feats.append(torch.einsum("nchw,ndhw->ncd", core, shifted).flatten(1) / area)
    power = core.pow(2).mean(dim=(2, 3))
    return torch.cat([torch.cat(feats, 1) / power.mean(1, keepdim=True).clamp_min(1e-12),
                      power.clamp_min(1e-12).log()], 1)


_FEATURES = {
    "pixels": lambda x: _highpass(x).flatten(1),
    "texture": _texture,
    "blocks": lambda x: F.adaptive_avg_pool2d(x, 4).flatten(1),  # a 4 x 4 colour layout
}
_RIDGE = {"pixels": 0.1, "texture": 0.01, "blocks": 0.01}  # ridge strength, relative to the features' mean squared norm


def _ridge_predict(a_tr: torch.Tensor, y_tr: torch.Tensor, a_te: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """Ridge regression on one-hot labels (standardised features), closed form; predicted classes of a_te."""
    mean, std = a_tr.mean(0), a_tr.std(0).clamp_min(1e-6)
    a_tr, a_te = (a_tr - mean) / std, (a_te - mean) / std
    targets = F.one_hot(y_tr, k).to(a_tr.dtype) - 1.0 / k
    n, d = a_tr.shape
    reg = lam * float(a_tr.pow(2).sum()) / n
    if n <= d:  # dual: (A A^T + reg I)^-1 Y
        gram = a_tr @ a_tr.T
        gram.diagonal().add_(reg)
        scores = a_te @ (a_tr.T @ torch.linalg.solve(gram, targets))
    else:  # primal: (A^T A + reg I)^-1 A^T Y
        cov = a_tr.T @ a_tr
        cov.diagonal().add_(reg)
        scores = a_te @ torch.linalg.solve(cov, a_tr.T @ targets)
    return scores.argmax(1)


def _folds(labels: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified fold of every image, and its rank inside its class (the order training images are added)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = np.arange(len(members)) % folds
        rank[members] = np.arange(len(members))
    return fold, rank


def _balanced(pred: np.ndarray, y: np.ndarray, k: int) -> tuple[float, list[float]]:
    recalls = [float((pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in range(k)]
    return float(np.nanmean(recalls)), recalls


def _probe(kind: str, features: torch.Tensor, labels: np.ndarray, k: int, cfg: ScanConfig) -> dict:
    """Cross-validated held-out accuracy of one probe, and its learning curve over training images per class."""
    fold, rank = _folds(labels, cfg.folds, cfg.seed)
    y = torch.from_numpy(labels).to(features.device)
    per_class_train = int(np.bincount(labels).min() * (cfg.folds - 1) // cfg.folds)
    sizes = [m for m in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if m < per_class_train] + [None]
    curve = []
    full_pred = None
    for m in sizes:
        pred = np.empty(len(labels), dtype=np.int64)
        for f in range(cfg.folds):
            test = fold == f
            train = ~test if m is None else (~test) & (_rank_in_train(rank, fold, f, labels) < m)
            tr_idx = torch.from_numpy(np.flatnonzero(train)).to(features.device)
            te_idx = torch.from_numpy(np.flatnonzero(test)).to(features.device)
            pred[test] = _ridge_predict(features[tr_idx], y[tr_idx], features[te_idx], k,
                                        _RIDGE[kind]).cpu().numpy()
        acc, recalls = _balanced(pred, labels, k)
        counts = np.bincount(labels[fold != 0], minlength=k)
        curve.append({"train_per_class": int(m if m is not None else counts.min()), "heldout_accuracy": acc})
        if m is None:
            full_pred = (acc, recalls)
    acc, recalls = full_pred
    chance = 1.0 / k
    return {"heldout_accuracy": acc, "class_recall": recalls, "score": (acc - chance) / (1 - chance),
            "learning_curve": curve}


def _rank_in_train(rank: np.ndarray, fold: np.ndarray, f: int, labels: np.ndarray) -> np.ndarray:
    """Per image, its order among its class's training images when fold ``f`` is held out."""
    out = np.full(len(labels), np.iinfo(np.int64).max)
    for c in np.unique(labels):
        members = np.flatnonzero((labels == c) & (fold != f))
        out[members[np.argsort(rank[members])]] = np.arange(len(members))
    return out


def _probe_all(sampled: _Sampled, cfg: ScanConfig, device: torch.device, null: bool) -> dict:
    k = len(sampled.classes)
    x = torch.from_numpy(sampled.images).to(device).permute(0, 3, 1, 2).double().div(255)
    features = {kind: _FEATURES[kind](x) for kind in cfg.probes}
    out = {"probes": {}, "null": {}}
    for kind in cfg.probes:
        out["probes"][kind] = _probe(kind, features[kind], sampled.labels, k, cfg)
    if null:  # the same images with their labels shuffled: no signal to learn
        shuffled = np.random.default_rng(cfg.seed + 1).permutation(sampled.labels)
        for kind in cfg.probes:
            out["null"][kind] = _probe(kind, features[kind], shuffled, k, cfg)
    return out


# --------------------------------------------------------------------------------------------- result


@dataclass
class ScanResult:
    """What a scan found. ``verdict`` is one of LIKELY_POISONED, NO_SIGN, INCONCLUSIVE."""

    verdict: str
    score: float
    threshold: float
    clean_below: float
    mode: str                   # "absolute" or "relative" (against a clean reference)
    reason: str
    classes: list[str]
    per_class_sampled: dict[str, int]
    seen: dict[str, int]
    probes: dict                # probe -> curves, score (see _train_probe)
    null: dict                  # probe -> curves on shuffled labels (empty if not run)
    reference: dict | None      # the reference's probes, classes and sources, if one was given
    skipped: list[dict]
    sources: list[str]
    config: dict
    device: str
    seconds: dict

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def best_probe(self) -> str:
        return max(self.probes, key=lambda p: self._probe_score(p))

    def _probe_score(self, probe: str) -> float:
        s = self.probes[probe]["score"]
        return s - self.reference["probes"][probe]["score"] if self.reference else s

    def to_dict(self) -> dict:
        from . import __version__

        d = asdict(self)
        d["exit_code"] = self.exit_code
        d["best_probe"] = self.best_probe
        d["version"] = __version__
        d["sources"] = self.sources if len(self.sources) <= 100 else self.sources[:100] + ["..."]
        return d

    def write_json(self, path: str | os.PathLike) -> Path:
        check_output_files({"report": path}, self._inputs(), "scan")
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def _inputs(self) -> list[str]:
        """What this scan read (its shards, and its reference's): never overwritten by the report or plot."""
        return [s for s in self.sources + (self.reference or {}).get("sources", []) if not s.startswith("<")]

    def summary(self) -> str:
        """A few lines for a terminal."""
        unit = "excess over the clean reference" if self.mode == "relative" else "score"
        lines = [f"verdict: {self.verdict} ({unit} {self.score:.3f}; likely poisoned from {self.threshold:.2f}, "
                 f"no sign below {self.clean_below:.2f})", f"  {self.reason}"]
        for name, p in self.probes.items():
            curve = " ".join(f"{c['train_per_class']}:{c['heldout_accuracy']:.2f}" for c in p["learning_curve"])
            line = (f"  {name:7s} score {p['score']:.3f}  held-out accuracy {p['heldout_accuracy']:.3f} "
                    f"(chance {1 / len(self.classes):.3f}); by training images per class: {curve}")
            if self.reference:
                line += f"  (clean reference score {self.reference['probes'][name]['score']:.3f})"
            lines.append(line)
        n = sum(self.per_class_sampled.values())
        lines.append(f"  {n} images sampled from {len(self.classes)} classes "
                     f"({min(self.per_class_sampled.values())}-{max(self.per_class_sampled.values())} per class), "
                     f"{len(self.skipped)} skipped, {self.seconds['total']:.1f} s on {self.device}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG: held-out learning curves (and the reference / shuffled-label curves), per-class recall."""
        check_output_files({"plot": path}, self._inputs(), "scan")
        path = Path(path)
        image = _draw_plot(self)
        with atomic_path(path) as tmp:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            tmp.write_bytes(buf.getvalue())
        return path


def _verdict(cfg: ScanConfig, sampled: _Sampled, found: dict, ref: dict | None) -> tuple[str, float, str]:
    counts = np.bincount(sampled.labels, minlength=len(sampled.classes))
    scores = {p: r["score"] for p, r in found["probes"].items()}
    best = max(scores, key=scores.get)
    if ref is not None:
        excess = {p: scores[p] - ref["probes"][p]["score"] for p in scores}
        best = max(excess, key=excess.get)
        score, hi, lo = excess[best], cfg.relative_threshold, cfg.relative_clean_below
        what = (f"the {best} probe learns these labels {score:+.2f} better than on the clean reference "
                f"({scores[best]:.2f} vs {ref['probes'][best]['score']:.2f})")
    else:
        score, hi, lo = scores[best], cfg.threshold, cfg.clean_below
        what = f"the {best} probe gets {score:.2f} of the way from chance to perfect held-out accuracy"
    if float(np.median(counts)) < cfg.min_per_class:
        return INCONCLUSIVE, score, (f"too few images per class to judge (median {int(np.median(counts))}, "
                                     f"need {cfg.min_per_class}); {what}")
    if score >= hi:
        return LIKELY_POISONED, score, what + ": the labels are learnable from a shortcut"
    if score < lo:
        return NO_SIGN, score, what + ": no shortcut a quick probe can find"
    return INCONCLUSIVE, score, what + ": between the bounds"


def scan_arrays(images: np.ndarray, labels: Sequence, cfg: ScanConfig | None = None, *,
                reference: tuple[np.ndarray, Sequence] | None = None) -> ScanResult:
    """Scan in-memory images (N x H x W x 3 uint8, one size) and their labels (ints or names).

    Up to ``cfg.per_class`` images per class are used (a seeded random choice).
    """
    cfg = cfg or ScanConfig()
    sampled = _from_arrays(images, labels, cfg)
    ref = _from_arrays(*reference, cfg) if reference is not None else None
    return _scan(sampled, cfg, ref, time.perf_counter(), 0.0)


def _from_arrays(images, labels, cfg: ScanConfig) -> _Sampled:
    images = np.asarray(images)
    labels = list(np.asarray(labels).tolist())
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"expected N x H x W x 3 uint8 images and N labels, got {images.dtype} {images.shape} "
                         f"and {len(labels)} labels")
    reservoir = _Reservoir(cfg.per_class, cfg.seed)
    for i, label in enumerate(labels):
        reservoir.add(class_label(label, ("<arrays>", str(i)), "labels"), i)
    return _finish(reservoir, lambda i: images[i], cfg, ["<arrays>"], [])


def scan_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike], cfg: ScanConfig | None = None, *,
                reference: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> ScanResult:
    """Scan tar / .beton shards (a folder, brace pattern, file, or a list of these), as purify reads them.

    ``reference``: optional shards of clean images of the same classes (e.g. the sparse clean set).
    """
    cfg = cfg or ScanConfig()
    t0 = time.perf_counter()
    sampled = sample_shards(inputs, cfg)
    ref = sample_shards(reference, cfg) if reference is not None else None
    return _scan(sampled, cfg, ref, t0, time.perf_counter() - t0)


def scan_samples(samples: Iterable[dict], cfg: ScanConfig | None = None, *,
                 reference: Iterable[dict] | None = None) -> ScanResult:
    """Scan an iterable of WebDataset samples: raw (bytes fields) or decoded (PIL, arrays, tensors).

    E.g. ``scan_samples(wds.WebDataset(urls).decode("pil"), ScanConfig(label_key="cls"))``.
    """
    cfg = cfg or ScanConfig()
    t0 = time.perf_counter()
    sampled = sample_samples(samples, cfg)
    ref = sample_samples(reference, cfg) if reference is not None else None
    return _scan(sampled, cfg, ref, t0, time.perf_counter() - t0)


def _scan(sampled: _Sampled, cfg: ScanConfig, ref_sampled: _Sampled | None, t0: float, t_read: float) -> ScanResult:
    device = resolve_device(cfg.device)
    reference = None
    if ref_sampled is not None:  # scan both at the same per-class count
        n = int(min(np.bincount(sampled.labels).min(), np.bincount(ref_sampled.labels).min()))
        sampled, ref_sampled = _subsample(sampled, n, cfg.seed), _subsample(ref_sampled, n, cfg.seed)
    t1 = time.perf_counter()
    found = _probe_all(sampled, cfg, device, null=cfg.null and ref_sampled is None)
    if ref_sampled is not None:
        ref_found = _probe_all(ref_sampled, cfg, device, null=False)
        reference = {"probes": ref_found["probes"], "classes": ref_sampled.classes,
                     "per_class_sampled": _per_class(ref_sampled), "sources": ref_sampled.sources[:100],
                     "skipped": ref_sampled.skipped}
        if ref_sampled.classes != sampled.classes:
            reference["warning"] = "the reference's classes differ from the data's"
    verdict, score, reason = _verdict(cfg, sampled, found, reference)
    relative = reference is not None
    cfg_dict = {k: v for k, v in asdict(cfg).items()}
    cfg_dict["probes"] = list(cfg.probes)
    return ScanResult(
        verdict=verdict, score=score,
        threshold=cfg.relative_threshold if relative else cfg.threshold,
        clean_below=cfg.relative_clean_below if relative else cfg.clean_below,
        mode="relative" if relative else "absolute", reason=reason, classes=sampled.classes,
        per_class_sampled=_per_class(sampled), seen=sampled.seen, probes=found["probes"], null=found["null"],
        reference=reference, skipped=sampled.skipped, sources=sampled.sources, config=cfg_dict,
        device=str(device),
        seconds={"read": round(t_read, 3), "probes": round(time.perf_counter() - t1, 3),
                 "total": round(time.perf_counter() - t0, 3)},
    )


def _per_class(sampled: _Sampled) -> dict[str, int]:
    counts = np.bincount(sampled.labels, minlength=len(sampled.classes))
    return {name: int(c) for name, c in zip(sampled.classes, counts)}


# --------------------------------------------------------------------------------------------- plot

_COLOURS = {"pixels": (31, 119, 180), "texture": (214, 39, 40), "blocks": (44, 160, 44)}


def _draw_plot(result: ScanResult):
    """Two panels drawn with PIL (no plotting library needed): learning curves, per-class recall."""
    from PIL import Image, ImageDraw

    w, h = 1100, 470
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    colour = {LIKELY_POISONED: (200, 0, 0), NO_SIGN: (0, 130, 0), INCONCLUSIVE: (200, 120, 0)}[result.verdict]
    d.text((12, 8), f"{result.verdict.upper()}   score {result.score:.3f} "
                    f"({'excess over the clean reference' if result.mode == 'relative' else 'absolute'}); "
                    f"likely poisoned >= {result.threshold:.2f}, no sign < {result.clean_below:.2f}", fill=colour)
    d.text((12, 24), result.reason[:180], fill=(60, 60, 60))
    k = len(result.classes)
    chance = 1 / k

    # panel 1: held-out balanced accuracy vs training images per class (log2 axis)
    x0, y0, x1, y1 = 60, 64, 560, 400
    d.rectangle((x0, y0, x1, y1), outline="black")
    curves = {name: p["learning_curve"] for name, p in result.probes.items()}
    sizes = sorted({c["train_per_class"] for cs in curves.values() for c in cs})
    lo, hi = math.log2(max(1, sizes[0])), math.log2(max(2, sizes[-1]))

    def px(m, a):
        t = 0.5 if hi == lo else (math.log2(max(1, m)) - lo) / (hi - lo)
        return x0 + (x1 - x0) * t, y1 - (y1 - y0) * a

    for a in (0, 0.25, 0.5, 0.75, 1.0):
        d.line((x0 - 4, px(sizes[0], a)[1], x0, px(sizes[0], a)[1]), fill="black")
        d.text((x0 - 34, px(sizes[0], a)[1] - 6), f"{a:.2f}", fill="black")
    for m in sizes:
        d.text((px(m, 0)[0] - 6, y1 + 4), str(m), fill="black")
    d.text(((x0 + x1) / 2 - 80, y1 + 18), "training images per class (held-out: cross-validated)", fill="black")
    d.text((x0, y0 - 14), "held-out balanced accuracy", fill="black")
    _dashed(d, [(x0, px(sizes[0], chance)[1]), (x1, px(sizes[0], chance)[1])], (120, 120, 120))
    d.text((x1 - 48, px(sizes[0], chance)[1] - 12), "chance", fill=(120, 120, 120))
    if result.mode == "absolute":
        level = chance + result.threshold * (1 - chance)
        _dashed(d, [(x0, px(sizes[0], level)[1]), (x1, px(sizes[0], level)[1])], (200, 0, 0))
        d.text((x1 - 140, px(sizes[0], level)[1] - 12), "threshold (last point)", fill=(200, 0, 0))
    legend_y = y0 + 6
    for name, curve in curves.items():
        c = _COLOURS.get(name, (0, 0, 0))
        points = [px(p["train_per_class"], p["heldout_accuracy"]) for p in curve]
        d.line(points, fill=c, width=3) if len(points) > 1 else d.ellipse(_dot(points[0]), fill=c)
        d.text((x0 + 8, legend_y), f"{name}, this data: score {result.probes[name]['score']:.2f}", fill=c)
        legend_y += 14
        other = (result.reference or {}).get("probes", {}).get(name) or result.null.get(name)
        if other:
            what = "clean reference" if result.reference else "same images, labels shuffled"
            _dashed(d, [px(p["train_per_class"], p["heldout_accuracy"]) for p in other["learning_curve"]], c)
            d.text((x0 + 8, legend_y), f"{name}, {what} (dashed): score {other['score']:.2f}", fill=c)
            legend_y += 14

    # panel 2: per-class held-out recall of the best probe
    best = result.best_probe
    recalls = result.probes[best]["class_recall"]
    ref_recalls = (result.reference or {}).get("probes", {}).get(best, {}).get("class_recall")
    bx0, by0, bx1, by1 = 620, 64, 1080, 400
    d.rectangle((bx0, by0, bx1, by1), outline="black")
    d.text((bx0, by0 - 14), f"per-class held-out recall, {best} probe"
                            + (" (grey: clean reference)" if ref_recalls else ""), fill="black")
    slot = (bx1 - bx0) / max(1, k)
    for i, r in enumerate(recalls):
        r = 0.0 if math.isnan(r) else r
        left = bx0 + i * slot + slot * 0.15
        right = bx0 + (i + 1) * slot - slot * 0.15
        if ref_recalls and i < len(ref_recalls):
            mid = (left + right) / 2
            rr = 0.0 if math.isnan(ref_recalls[i]) else ref_recalls[i]
            d.rectangle((mid, by1 - (by1 - by0) * rr, right, by1), fill=(170, 170, 170))
            right = mid
        d.rectangle((left, by1 - (by1 - by0) * r, right, by1), fill=_COLOURS.get(best, (0, 0, 0)))
        if k <= 20:
            d.text((bx0 + i * slot + 2, by1 + 4), result.classes[i][:max(1, int(slot / 6))], fill="black")
    cy = by1 - (by1 - by0) * chance
    _dashed(d, [(bx0, cy), (bx1, cy)], (120, 120, 120))
    n = sum(result.per_class_sampled.values())
    d.text((12, h - 22), f"{n} images, {k} classes, {result.config['folds']}-fold, seed {result.config['seed']}, "
                         f"view {result.config['view']} {result.config['probe_size']}px, device {result.device}; "
                         f"{len(result.skipped)} skipped", fill=(60, 60, 60))
    return img


def _dot(p, r: float = 3.0):
    return (p[0] - r, p[1] - r, p[0] + r, p[1] + r)


def _dashed(d, points, fill, dash: float = 6.0) -> None:
    for (ax, ay), (bx, by) in zip(points, points[1:]):
        length = math.hypot(bx - ax, by - ay)
        steps = max(1, int(length / dash))
        for s in range(0, steps, 2):
            t0, t1 = s / steps, min(1.0, (s + 1) / steps)
            d.line((ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                   fill=fill, width=2)
