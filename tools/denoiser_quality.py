"""How much of the t* noise a denoiser removes, on clean CIFAR-10 test images.

For N test images x (never seen in training): PSNR(x_t*, x) of the noised input and
PSNR(purify(x), x) of the purified output, both against the clean image, in dB on 8-bit
pixels. A denoiser that works brings the output closer to x than the noised input is.
This measures denoising only, not the defense (that is the evaluation grid's job).

    python -m tools.denoiser_quality --denoiser eclipse_stream/assets/default-denoiser.safetensors
"""

from __future__ import annotations

import json

import click
import numpy as np
import torch

from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.devices import resolve_device
from eclipse_stream.purifier import Purifier, PurifierConfig

from .common import decode_image, iter_cifar_tar, provenance, resolve_data_dir


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over a batch of images in [0, 1], computed per image on 8-bit values."""
    a8, b8 = (a * 255).round(), (b * 255).round()
    mse = (a8 - b8).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


@torch.no_grad()
def measure(denoiser: str, images: np.ndarray, t_star: int, steps: int | None, batch_size: int,
            device: torch.device, seed: int = 0) -> dict:
    den = load_denoiser(denoiser, device=device)
    # prefilter none: this measures the denoiser alone (the impulse stage is scored by tools.stages)
    purifier = Purifier(den, PurifierConfig(t_star=t_star, steps=steps, prefilter="none"))
    noised_psnr, purified_psnr = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float().div(255).to(device)
        g = torch.Generator(device=device).manual_seed(seed + start)
        x_t = purifier.noise_to_tstar(x * 2 - 1, g)
        noised = ((x_t + 1) / 2).clamp(0, 1)
        purified = (purifier.denoise(x_t, g) + 1) / 2  # the same noised images, not a second draw
        noised_psnr.append(psnr(noised, x) * len(x))
        purified_psnr.append(psnr(purified, x) * len(x))
    n = len(images)
    return {"images": n, "t_star": t_star, "steps": steps or t_star,
            "psnr_noised_db": round(sum(noised_psnr) / n, 3), "psnr_purified_db": round(sum(purified_psnr) / n, 3),
            "denoiser": denoiser, "denoiser_sha256": den.sha256, "denoiser_step": den.metadata.get("step")}


@click.command()
@click.option("--denoiser", "-d", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data-dir", default=None, help="CIFAR-10 tars; default ../shared/data/cifar10.")
@click.option("--per-class", type=int, default=20, help="Test images per class.")
@click.option("--t-star", type=int, default=100)
@click.option("--steps", type=int, default=None)
@click.option("--batch-size", type=int, default=100)
@click.option("--device", default=None)
def main(denoiser, data_dir, per_class, t_star, steps, batch_size, device):
    """Print PSNR of noised and purified CIFAR-10 test images against the clean ones, as JSON."""
    items = iter_cifar_tar(resolve_data_dir(data_dir) / "test.tar.gz", per_class)
    images = np.stack([decode_image(data) for _, _, data in items])
    dev = resolve_device(device)
    result = measure(denoiser, images, t_star, steps, batch_size, dev)
    click.echo(json.dumps({**result, "provenance": provenance(dev)}, indent=2))


if __name__ == "__main__":
    main()
