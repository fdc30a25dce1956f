"""Rounding vs truncation of purified pixels: how far the reference code's uint8 conversion is from ours.

The ECLIPSE reference code stores a purified image through torchvision's ``ToPILImage``, i.e.
``x.mul(255).byte()``: the float output in [0, 1] is truncated to 8 bits. ``Purifier`` rounds
(``(x * 255).round()``). On N CIFAR-10 test images purified once (the shipped denoiser and ``purify``'s
defaults unless told otherwise) this prints the share of pixels where the two differ (by one level: never
more) and the mean difference and mean error against the float output, in units of 1/255.

    python -m tools.pixel_rounding --per-class 20
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click
import numpy as np
import torch

from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.defaults import DEFAULT_RECIPE, RECIPES, default_denoiser_path
from eclipse_stream.devices import resolve_device
from eclipse_stream.purifier import Purifier, PurifierConfig

from .common import decode_image, iter_cifar_tar, provenance, resolve_data_dir


def compare(out: torch.Tensor) -> dict:
    """Truncation (the reference's ``mul(255).byte()``, on the output clamped to [0, 1] since a cast of a
    negative float to uint8 is undefined) vs rounding (ours) of float images ``out`` in [0, 1]."""
    levels = out.double() * 255
    trunc = levels.clamp(0, 255).floor()
    rounded = levels.round().clamp(0, 255)
    diff = rounded - trunc
    return {
        "pixels": levels.numel(),
        "share_differ": float((diff != 0).double().mean()),
        "share_differ_by_one": float((diff.abs() == 1).double().mean()),
        "max_abs_difference_levels": float(diff.abs().max()),
        "mean_difference_levels": float(diff.mean()),  # rounded - truncated, in 1/255 units
        "mean_error_truncated_levels": float((trunc - levels).mean()),  # against the float output
        "mean_error_rounded_levels": float((rounded - levels).mean()),
        "share_outside_0_1": float(((out < 0) | (out > 1)).double().mean()),
    }


@torch.no_grad()
def purify_float(denoiser: str, images: np.ndarray, config: PurifierConfig, batch_size: int,
                 device: torch.device, seed: int = 0) -> torch.Tensor:
    """Purify uint8 NHWC images once; return the float output before quantisation (checked: rounding it gives
    exactly the bytes ``Purifier`` writes for the same images and noise)."""
    purifier = Purifier(load_denoiser(denoiser, device=device), config)
    outs = []
    for start in range(0, len(images), batch_size):
        x8 = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
        out = purifier(x8.float() / 255.0, torch.Generator(device=device).manual_seed(seed + start))
        ours = purifier(x8, torch.Generator(device=device).manual_seed(seed + start))
        if not torch.equal((out * 255.0).round().clamp(0, 255).to(torch.uint8), ours):
            raise RuntimeError("the float path and the uint8 path disagree: the measurement would not be ours")
        outs.append(out.cpu())
    return torch.cat(outs)


@click.command()
@click.option("--denoiser", "-d", type=click.Path(exists=True, dir_okay=False),
              help="Default: the shipped denoiser.")
@click.option("--data-dir", help="CIFAR-10 tars; default ../shared/data/cifar10.")
@click.option("--per-class", type=int, default=20, help="Test images per class.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), help="Default: purify's.")
@click.option("--steps", type=int, help="Default: the recipe's.")
@click.option("--t-star", type=int, help="Default: purify's.")
@click.option("--batch-size", type=int, default=100)
@click.option("--seed", type=int, default=0)
@click.option("--device")
def main(denoiser, data_dir, per_class, recipe, steps, t_star, batch_size, seed, device):
    """Print, as JSON, how truncating purified pixels to uint8 (the reference code) differs from rounding."""
    items = iter_cifar_tar(resolve_data_dir(data_dir) / "test.tar.gz", per_class)
    images = np.stack([decode_image(data) for _, _, data in items])
    dev = resolve_device(device)
    denoiser = denoiser or str(default_denoiser_path())
    recipe = recipe or DEFAULT_RECIPE
    config = PurifierConfig.from_recipe(recipe, steps=steps, t_star=t_star)
    out = purify_float(denoiser, images, config, batch_size, dev, seed)
    click.echo(json.dumps({"images": len(images), "recipe": recipe, "config": asdict(config), "denoiser": denoiser,
                           **compare(out), "provenance": provenance(dev)}, indent=2, default=str))


if __name__ == "__main__":
    main()
