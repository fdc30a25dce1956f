"""Defaults and the one list of each choice, with no heavy imports (the CLI reads them when it starts).

Every other module (CLI, config, pipeline, formats, EclipseTransform, scan, UNet presets) takes these
lists from here, so that a choice is never spelled twice.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CheckpointError

DEFAULT_DENOISER = "default-denoiser.safetensors"

#: Field extensions treated as images, in auto-detect priority (the first present one is a sample's image
#: where one image is looked at: scan, preview, EclipseTransform; purify purifies every one of them).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")

#: Largest image (width x height) decoded by default: Pillow's own hard decompression-bomb limit
#: (2 x ``PIL.Image.MAX_IMAGE_PIXELS``); see imageio.
DEFAULT_MAX_PIXELS: int = 89_478_485 * 2

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")  # purification (purifier.py maps them to dtypes)
TRAIN_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")  # training
RESOLUTIONS: tuple[str, ...] = ("native", "model")  # purify --resolution
#: purify --large-images: how images larger than one tile (2x the denoiser's training size) are denoised:
#: "tiled" (overlapping tiles of the training size, tiling.py) or "native" (the UNet over the whole image).
LARGE_IMAGES: tuple[str, ...] = ("tiled", "native")
PRESETS: tuple[str, ...] = ("paper", "small", "tiny")  # UNet presets (unet.PRESETS holds their configs)
IMAGE_SIZES: tuple[int, ...] = (32, 64, 128, 256)  # UNet training resolutions (unet.CHANNEL_MULT)
ON_ERROR: tuple[str, ...] = ("fail", "skip")
#: purify --deblur: "auto" fits class kernels against the denoiser's recorded class spectra (when it has them and
#: the samples have labels) and deblurs the classes that pass the gate (deblur.py); "off" never deblurs on its own.
DEBLUR: tuple[str, ...] = ("auto", "off")
#: purify --read-ahead-mib: MiB each reader holds ahead of its decoder per remote stream (object stores,
#: http(s)://, pipe:), at most two streams at once (the shard being read, and the next one started early);
#: 0 reads on demand. See storage.read_in_order.
READ_AHEAD_MIB = 16
CORRUPTIONS: tuple[str, ...] = ("none", "baked")

PREFILTERS = ("none", "impulse")  # prefilter.py
DEFAULT_IMPULSE_THRESHOLD = 0.25  # [0, 1] units (64/255): see prefilter.py
DEFAULT_GRAY_P = 0.4  # training-time corruption: grayscale probability (corruption.py)
DEFAULT_SIGMA = 0.05  # training-time corruption: noise std in [0, 1] units
# Training-time corruption, beyond the paper: smooth (low-frequency) Gaussian noise, std per channel in
# [0, 1] units on a LOWFREQ_GRID x LOWFREQ_GRID lattice, bilinearly upsampled (corruption.py). It masks
# low-frequency shortcuts (LSP) that white noise averages away; 0 is the paper's corruption.
DEFAULT_LOWFREQ_SIGMA = 0.05  # measured on the CPU grid (docs/results/cpu-grid.md)
LOWFREQ_GRID = 4
# Training-time corruption, beyond the paper: a JPEG-style quantization (jpegsim.py) at a quality drawn per
# image uniformly from [lo, hi], applied before grayscale and noise, on luma only (DEFAULT_JPEG_CHROMA = False:
# the colour is kept exact). The default since 2026-12-08, luma-only (10, 50), was picked by the selection rule on
# clean data, TAP and SEP over the earlier (20, 60) with chroma and luma-only (20, 60), then adopted by a check on
# AAP, a family added with the rule (docs/evaluation.md, "A luma-only JPEG term"). Before it: (20, 60) with
# chroma (2026-12-06 to 2026-12-08; chroma quantized as a JPEG file does), and (10, 50) with chroma for part of
# 2026-12-06. None is the paper's corruption.
DEFAULT_JPEG_QUALITY: tuple[int, int] | None = (10, 50)
# Whether the JPEG term also quantizes chroma (4:2:0 subsampling and the chroma table, as a JPEG file does: True,
# the default until 2026-12-08) or quantizes luma alone and keeps the colour exact (False): what a victim learns of
# what purification leaves of a dense adversarial poison is its luma texture, not its colour.
DEFAULT_JPEG_CHROMA = False
# The stronger range with chroma (jpeg_chroma=True), once suggested for data suspected of dense adversarial poisons
# (over the clean-cost budget at t* = 300: 3.68). Luma-only (10, 50), the default since 2026-12-08, took its place.
SUGGESTED_JPEG_QUALITY = (10, 50)

# Named purification recipes: the settings a name stands for (each can still be set on its own).
# paper:  ECLIPSE as published: t* = 100, the full t*-step reverse chain, no prefilter.
# robust: the impulse prefilter (removes sparse large-magnitude poisons such as the one-pixel
#         shortcut), then the x0 estimate at t* = 300 (one UNet call); see docs/evaluation.md. t* was 100 until
#         2026-12-07, then 200 (held-out check on UC), then 300 with the stage-4 denoiser trained on t < 400 (held-out
#         check on REM, written down before REM's generator existed: docs/evaluation.md, "A [0, 400) denoiser at
#         t* = 300"). The shipped denoiser is trained on t < 400, so 400 is its most.
RECIPES = {
    "paper": {"t_star": 100, "steps": None, "prefilter": "none"},
    "robust": {"t_star": 300, "steps": 1, "prefilter": "impulse"},
}
DEFAULT_RECIPE = "robust"  # measured best on every poison of the CPU grid (docs/results/cpu-grid.md)
# purify --deblur when not given, by recipe: the paper's recipe stays the paper's (no stage it does not have);
# PurifyConfig.deblur (Python) is "auto" whatever the purifier: pass deblur="off" for the paper's behaviour there.
RECIPE_DEBLUR = {"paper": "off", "robust": "auto"}


def default_denoiser_path() -> Path:
    """Path of the shipped default denoiser; CheckpointError if this install has none."""
    path = Path(str(resources.files("eclipse_stream") / "assets" / DEFAULT_DENOISER))
    if not path.is_file():
        raise CheckpointError(f"{path}: no default denoiser is installed; pass --denoiser "
                              f"(train one with 'eclipse-stream train')")
    return path
