"""``eclipse-stream preview``: what the stage does to a few samples (the paper's Fig. 4).

One row per sample; columns: input, noised at t*, purified, corrupted (purified then
grayscale-with-probability-p + noise). Images are shown at the denoiser's resolution
(shorter side resized, centre-cropped) and enlarged with nearest-neighbour for viewing.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from .checkpoint import load_denoiser
from .corruption import corrupt
from .devices import resolve_device
from .errors import InputError
from .fsutil import atomic_path
from .imageio import ImageDecodeError, decode_image
from .outputs import check_output_files
from .purifier import Purifier, PurifierConfig
from .sources import resize_center_crop

COLUMNS = ("input", "noised at t*", "purified", "corrupted")
MAX_ROWS = 256


def _image_format(out: Path) -> str:
    """The image format ``out``'s suffix names (as Pillow's ``save`` would pick it); InputError if none."""
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"{out}: name the preview with an image suffix (.png, .jpg, .webp, ...); "
                         f"{out.suffix or 'no suffix'} names no image format that can be written")
    return fmt


def _first_images(shard: Path, n: int, image_key: str | None, size: int) -> np.ndarray:
    from .formats import format_for

    arrays = []
    for key, image in itertools.islice(format_for(shard).images(str(shard), image_key, skip_missing=True), n):
        if isinstance(image, bytes):
            try:
                image = decode_image(image).rgb
            except ImageDecodeError as e:
                raise InputError(f"{shard}: sample {key!r}: {e}") from None
        arrays.append(image)
    if not arrays:
        raise InputError(f"{shard}: no decodable images to preview")
    return np.stack([resize_center_crop(a, size) for a in arrays])


@torch.no_grad()
def preview(shard, denoiser, out, *, n: int = 8, config: PurifierConfig | None = None, seed: int = 0,
            image_key: str | None = None, device: str | None = None, scale: int = 4) -> Path:
    """Write an image grid (rows: samples; columns: COLUMNS) to ``out``, in the format its suffix names (PNG,
    JPEG, WebP, ...), and return its path. ``out`` may not be the shard or the denoiser."""
    if not (isinstance(n, int) and 1 <= n <= MAX_ROWS):
        raise ValueError(f"number of samples must be in 1..{MAX_ROWS}, got {n!r}")
    out = Path(check_output_files({"-o": out}, [shard, denoiser], "preview")["-o"])  # a URL is refused
    fmt = _image_format(out)
    device = resolve_device(device)
    den = load_denoiser(denoiser, device=device)
    cfg = config or PurifierConfig()
    purifier = Purifier(den, cfg)
    images = _first_images(Path(shard), n, image_key, den.image_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x_t = purifier.noise_to_tstar(x * 2 - 1, g)
    noised = ((x_t + 1) / 2).clamp(0, 1)
    purified = (purifier.denoise(x_t, g) + 1) / 2  # from the very image in the "noised" column
    corrupted = corrupt(purified, cfg.gray_p, cfg.noise_sigma, g)
    rows = torch.stack([x, noised, purified, corrupted], dim=1).flatten(0, 1).cpu()
    grid = make_grid(rows, nrow=len(COLUMNS), padding=2, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    header = Image.new("RGB", (img.width, 16), "white")
    draw = ImageDraw.Draw(header)
    cell = img.width / len(COLUMNS)
    for i, name in enumerate(COLUMNS):
        draw.text((i * cell + 4, 2), name, fill="black")
    canvas = Image.new("RGB", (img.width, img.height + header.height), "white")
    canvas.paste(header, (0, 0))
    canvas.paste(img, (0, header.height))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return out
