"""The settings of purification, as frozen, validated dataclasses, with no heavy imports.

``PurifierConfig`` says how images are purified; ``PurifyConfig`` adds how shards are read, batched and
written. Their field defaults are the one source of defaults: the CLI's options take theirs from here
(tests/test_cli.py checks every option that names a field), and every setting that decides the output bytes
is recorded in each shard's stats file (:meth:`PurifyConfig.fingerprint`).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields

from . import __version__
from .defaults import (
    CORRUPTIONS, DEBLUR, DEFAULT_GRAY_P, DEFAULT_IMPULSE_THRESHOLD, DEFAULT_MAX_PIXELS, DEFAULT_RECIPE, DEFAULT_SIGMA,
    LARGE_IMAGES, ON_ERROR, PRECISIONS, PREFILTERS, READ_AHEAD_MIB, RECIPES, RESOLUTIONS)

__all__ = ["PurifierConfig", "PurifyConfig", "check_corruption", "default_of", "default_workers", "is_int",
           "is_real"]

#: Upper bounds of the settings that size an allocation: a slip of the finger (``--bucket-multiple 100000``)
#: must be refused, not allocate tens of GB. Each is far above any useful value.
MAX_BATCH_SIZE = 16384
MAX_BUCKET_MULTIPLE = 256  # every image is padded to a multiple of this in both sides
MAX_BATCH_PIXELS = 2**28  # 268M pixels: 0.8 GB as uint8, 3.2 GB as float32, before the UNet's activations
MAX_THREADS = 256  # workers, encode threads
MAX_TILE_SIZE = 4096  # px: one tile through the UNet at once
MAX_READ_AHEAD_MIB = 4096  # per remote stream of a reader worker


def _check(checks) -> None:
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def is_real(value, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """A finite real number (not a bool) in [lo, hi]."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and lo <= value <= hi)


def is_int(value, lo: int | None = None, hi: int | None = None) -> bool:
    """An int (not a bool) in [lo, hi]."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and (lo is None or value >= lo)
            and (hi is None or value <= hi))


def check_corruption(p, sigma, lowfreq_sigma=0.0, jpeg_quality=None, jpeg_chroma=True) -> None:
    """The training-time corruption's settings, the one check (purify's --gray-p/--noise-sigma, the transform,
    ``corrupt``): probability in [0, 1], standard deviations (in [0, 1] pixel units) in [0, 1], and the JPEG
    quality range ``None`` (off) or ``(lo, hi)`` with 1 <= lo <= hi <= 100."""
    jq_ok = jpeg_quality is None or (isinstance(jpeg_quality, (tuple, list)) and len(jpeg_quality) == 2
                                     and is_int(jpeg_quality[0], 1, 100) and is_int(jpeg_quality[1], 1, 100)
                                     and jpeg_quality[0] <= jpeg_quality[1])
    _check([
        (jq_ok, f"JPEG quality must be None (off) or a (lo, hi) pair of ints with 1 <= lo <= hi <= 100, "
                f"got {jpeg_quality!r}"),
        (isinstance(jpeg_chroma, bool), f"jpeg_chroma must be True or False, got {jpeg_chroma!r}"),
        (is_real(p, 0.0, 1.0), f"grayscale probability (gray p) must be a number in [0, 1], got {p!r}"),
        (is_real(sigma, 0.0, 1.0), f"noise sigma must be a number in [0, 1] (pixel units), got {sigma!r}"),
        (is_real(lowfreq_sigma, 0.0, 1.0),
         f"low-frequency noise sigma must be a number in [0, 1] (pixel units), got {lowfreq_sigma!r}"),
    ])


@dataclass(frozen=True)
class PurifierConfig:
    """How to purify; part of every output shard's recorded config."""

    t_star: int = RECIPES[DEFAULT_RECIPE]["t_star"]  # on the checkpoint's T; the recipe's (robust 300, paper 100)
    steps: int | None = RECIPES[DEFAULT_RECIPE]["steps"]  # None: t_star (the paper's full chain)
    precision: str = "fp32"
    corruption: str = "none"  # "none" or "baked"
    gray_p: float = DEFAULT_GRAY_P
    noise_sigma: float = DEFAULT_SIGMA
    prefilter: str = RECIPES[DEFAULT_RECIPE]["prefilter"]  # "none" (the paper) or "impulse" (prefilter.py)
    impulse_threshold: float = DEFAULT_IMPULSE_THRESHOLD
    # Images with a side longer than tile_size (None: twice the denoiser's training size S), see tiling.py:
    large_images: str = LARGE_IMAGES[0]  # "tiled": overlapping tiles of S..tile_size px; "native": the whole image
    tile_size: int | None = None  # the longest tile side, px (a multiple of the UNet's downsampling factor)
    tile_overlap: int | None = None  # the least overlap of neighbouring tiles, px; None: S // 8
    tile_batch_pixels: int = 64 * 32 * 32  # tile pixels per UNet call (64 images of 32 x 32); at least one tile

    @classmethod
    def from_recipe(cls, recipe: str | None = None, **settings) -> PurifierConfig:
        """A config from a named recipe (default: DEFAULT_RECIPE); settings that are not None override it."""
        recipe = recipe or DEFAULT_RECIPE
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        return cls(**{**RECIPES[recipe], **{k: v for k, v in settings.items() if v is not None}})

    def __post_init__(self) -> None:
        if self.prefilter not in PREFILTERS:
            raise ValueError(f"prefilter must be one of {', '.join(PREFILTERS)}, got {self.prefilter!r}")
        if not (is_real(self.impulse_threshold) and 0.0 < self.impulse_threshold < 1.0):
            raise ValueError(f"impulse threshold must be in (0, 1), got {self.impulse_threshold}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be 'none' or 'baked', got {self.corruption!r}")
        if not is_int(self.t_star, 1):
            raise ValueError(f"t_star must be an integer >= 1, got {self.t_star!r}")
        if self.steps is not None and not is_int(self.steps, 1, self.t_star):
            raise ValueError(f"steps must be between 1 and t_star={self.t_star}, got {self.steps}")
        check_corruption(self.gray_p, self.noise_sigma)
        _check([
            (self.large_images in LARGE_IMAGES, f"large images must be one of {', '.join(LARGE_IMAGES)}, "
                                                f"got {self.large_images!r}"),
            (self.tile_size is None or is_int(self.tile_size, 1, MAX_TILE_SIZE),
             f"tile size must be an integer in 1..{MAX_TILE_SIZE}, got {self.tile_size!r}"),
            (self.tile_overlap is None or is_int(self.tile_overlap, 1, MAX_TILE_SIZE),
             f"tile overlap must be an integer in 1..{MAX_TILE_SIZE}, got {self.tile_overlap!r}"),
            (is_int(self.tile_batch_pixels, 1, MAX_BATCH_PIXELS),
             f"tile batch pixels must be an integer in 1..{MAX_BATCH_PIXELS}, got {self.tile_batch_pixels!r}"),
        ])

    @property
    def num_steps(self) -> int:
        return self.steps or self.t_star


def default_workers() -> int:
    """Decode worker processes: one per core, at most 8 (output does not depend on it)."""
    return min(8, os.cpu_count() or 1)


#: PurifyConfig fields that change how a run goes, not the bytes it writes (left out of the fingerprint).
#: on_error decides which runs stop, not the bytes of a finished shard: resuming with the other mode is fine.
EXECUTION_ONLY = ("workers", "encode_threads", "device", "overwrite", "on_error", "read_ahead_mib")


@dataclass(frozen=True)
class PurifyConfig:
    """Options of ``eclipse-stream purify``; everything that decides the output bytes is recorded."""

    purifier: PurifierConfig = field(default_factory=PurifierConfig)
    batch_size: int = 64
    seed: int = 0
    jpeg_quality: int = 95
    image_key: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    resolution: str = "native"
    bucket_multiple: int = 32
    max_batch_pixels: int = 64 * 256 * 256
    on_error: str = "fail"
    compile: bool = False  # torch.compile the UNet: faster, may differ from eager in the last bit (so recorded)
    class_kernels: str | None = None  # deblur.ClassKernels JSON (fit-kernels): deconvolve by class before purifying
    label_key: str | None = None  # with class_kernels: the label field (None: first of formats.LABEL_KEYS)
    # auto: fit class kernels against the denoiser's recorded class spectra, deblur the classes that pass the gate
    deblur: str = "auto"
    # execution only (do not change the output):
    workers: int = field(default_factory=default_workers)
    encode_threads: int = 2
    device: str | None = None
    overwrite: bool = False
    read_ahead_mib: int = READ_AHEAD_MIB  # remote inputs: MiB read ahead per stream (storage.read_in_order)

    def __post_init__(self) -> None:
        _check([
            (is_int(self.batch_size, 1, MAX_BATCH_SIZE), f"batch size must be in 1..{MAX_BATCH_SIZE}, "
                                                          f"got {self.batch_size!r}"),
            (is_int(self.seed), f"seed must be an integer, got {self.seed!r}"),
            (is_int(self.jpeg_quality, 1, 100), f"JPEG quality must be in 1..100, got {self.jpeg_quality!r}"),
            (is_int(self.max_pixels, 1), f"max pixels must be >= 1, got {self.max_pixels!r}"),
            (self.resolution in RESOLUTIONS, f"resolution must be one of {RESOLUTIONS}"),
            (is_int(self.bucket_multiple, 1, MAX_BUCKET_MULTIPLE),
             f"bucket multiple must be in 1..{MAX_BUCKET_MULTIPLE} (every image is padded to a multiple of it), "
             f"got {self.bucket_multiple!r}"),
            (is_int(self.max_batch_pixels, 1, MAX_BATCH_PIXELS),
             f"max batch pixels must be in 1..{MAX_BATCH_PIXELS}, got {self.max_batch_pixels!r}"),
            (self.on_error in ON_ERROR, "on-error must be 'fail' or 'skip'"),
            (is_int(self.workers, 0, MAX_THREADS), f"workers must be in 0..{MAX_THREADS}, got {self.workers!r}"),
            (is_int(self.encode_threads, 1, MAX_THREADS),
             f"encode threads must be in 1..{MAX_THREADS}, got {self.encode_threads!r}"),
            (self.class_kernels is None or isinstance(self.class_kernels, (str, os.PathLike)),
             f"class kernels must be a file path, got {self.class_kernels!r}"),
            (self.deblur in DEBLUR, f"deblur must be one of {', '.join(DEBLUR)}, got {self.deblur!r}"),
            (self.label_key is None or (isinstance(self.label_key, str) and self.label_key != ""),
             f"label key must be a field name, got {self.label_key!r}"),
            (is_int(self.read_ahead_mib, 0, MAX_READ_AHEAD_MIB),
             f"read-ahead must be in 0..{MAX_READ_AHEAD_MIB} MiB, got {self.read_ahead_mib!r}"),
        ])

    def resolved_device(self):
        from .devices import resolve_device

        return resolve_device(self.device)

    def fingerprint(self, checkpoint_sha256: str, device_type: str) -> dict:
        """What decides the output bytes: a rerun with a different fingerprint must not mix outputs."""
        d = asdict(self)
        for k in EXECUTION_ONLY:
            d.pop(k)
        d.pop("deblur")  # what it decides is recorded as the fitted kernels' fingerprint, when any class is deblurred
        d.update(checkpoint_sha256=checkpoint_sha256, device_type=device_type, package_version=__version__)
        return d


def default_of(cls, name: str):
    """The default of dataclass ``cls``'s field ``name`` (its factory called): what the CLI shows and uses."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if callable(f.default_factory) else f.default
