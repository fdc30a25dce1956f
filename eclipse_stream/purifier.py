"""The purifier: noise every image to t*, run the reverse chain back, optionally corrupt.

``Purifier`` is an ``nn.Module`` over image batches (uint8 0..255 or float [0, 1], NCHW,
any size): x_t* = sqrt(abar[t*-1]) x + sqrt(1 - abar[t*-1]) eps, then ``steps`` calls of
``p_sample`` (learned variance, no noise at the last step), clamp, and return the input
dtype (uint8 by rounding). ``steps < t*`` uses the respaced chain over the same noise
level. Inputs whose height or width is not a multiple of the UNet's downsampling factor
are edge-padded and cropped back.

All randomness comes from the ``generator`` passed to :meth:`Purifier.purify` (or the
global RNG), drawn on the batch's device: the same batch, generator state, device type,
precision and batch size give the same result.

**Large images** (a side longer than one tile, ``tile_size``: twice the denoiser's training size
by default) are purified one by one in overlapping tiles (``large_images="tiled"``, the default;
see :mod:`eclipse_stream.tiling`): same prefilter (in strips), same noise and chain, with the
UNet's output computed on tiles and blended. ``generator`` may then be a list with one generator
per image: each image draws its noise from its own, and its UNet calls hold its own tiles only, so
its result does not depend on the other images of the batch. ``large_images="native"`` runs the
UNet over the whole image, as for small images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Denoiser
from .config import PurifierConfig
from .corruption import corrupt
from .defaults import DEFAULT_RECIPE, RECIPES
from .defaults import PRECISIONS as PRECISION_NAMES
from .diffusion import purification_timesteps
from .prefilter import impulse_filter, impulse_filter_strips
from .tiling import TilePlan, blended_output, plan_tiles

__all__ = ["DEFAULT_RECIPE", "PRECISIONS", "RECIPES", "Purifier", "PurifierConfig"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names of defaults.PRECISIONS
assert tuple(PRECISIONS) == PRECISION_NAMES

#: One generator for the batch, one per image, or None (the global RNG).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(shape, device, generator: Generators) -> torch.Tensor:
    """Standard normal noise of ``shape``; with a list of generators, image i's from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, device=device, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images")
    return torch.cat([torch.randn((1, *shape[1:]), device=device, generator=g) for g in generator])


def _per_image(generator: Generators, n: int) -> list:
    """The generator of each of n images: its own from a list, else the batch's (drawn from in image order)."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for a batch of {n} images")
    return list(generator)



class Purifier(nn.Module):
    """ECLIPSE purification of image batches with a preloaded denoiser."""

    def __init__(self, denoiser: Denoiser, config: PurifierConfig | None = None, **overrides):
        super().__init__()
        config = replace(config, **overrides) if config else PurifierConfig(**overrides)
        full = denoiser.diffusion
        if config.t_star > full.num_timesteps:
            raise ValueError(f"t_star={config.t_star} exceeds the checkpoint's T={full.num_timesteps}")
        if config.t_star > denoiser.trained_max_timestep:
            raise ValueError(f"t_star={config.t_star} is above the range this denoiser was trained on "
                             f"(timesteps 0..{denoiser.trained_max_timestep - 1} of T={full.num_timesteps}, "
                             f"--max-timestep {denoiser.trained_max_timestep}); purify at t* <= "
                             f"{denoiser.trained_max_timestep} or train with a larger --max-timestep")
        self.config = config
        self.model = denoiser.model.eval().requires_grad_(False)
        self.chain = full.respace(purification_timesteps(config.t_star, config.num_steps))
        self._compiled: list = []  # [torch.compile(model)] once compiled (in a list: not a second submodule)
        f = self.model.config.downsample_factor
        self.image_size = denoiser.image_size  # S, the training size: tiles are S..tile_size px, attention S px
        self.tile_size = config.tile_size or 2 * self.image_size
        self.tile_overlap = config.tile_overlap or max(1, self.image_size // 8)
        if self.tile_size % f:
            raise ValueError(f"tile size {self.tile_size} must be a multiple of the UNet's downsampling factor {f}")
        if self.tile_overlap >= min(self.image_size, self.tile_size):
            raise ValueError(f"tile overlap {self.tile_overlap} must be smaller than the smallest tile "
                             f"({min(self.image_size, self.tile_size)} px)")

    def compile_denoiser(self, **compile_kwargs) -> Purifier:
        """``torch.compile`` the UNet (weights in channels-last), in place; returns self.

        The chain then calls the compiled UNet: 2.3-3x the eager speed on a 2-core CPU at 32 px
        (``python -m benchmarks.bench_purifier --compile``), at the cost of a compilation on the first
        batch of each new shape. Compiled kernels may round differently from eager ones, so outputs can differ from an
        eager run in the last bit; ``purify --compile`` therefore records it in each shard's config.
        """
        self.model.to(memory_format=torch.channels_last)
        self._compiled = [torch.compile(self.model, **compile_kwargs)]
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self, device: torch.device):
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def tiles(self, height: int, width: int) -> bool:
        """Whether an image of this size is purified in tiles (a side longer than ``tile_size`` once padded)."""
        f = self.model.config.downsample_factor
        return self.config.large_images == "tiled" and max(-(-height // f), -(-width // f)) * f > self.tile_size

    def plan(self, height: int, width: int) -> TilePlan:
        """The tiles of a (padded) image of this size."""
        f = self.model.config.downsample_factor
        return plan_tiles(height, width, min(self.image_size, self.tile_size), self.tile_size, self.tile_overlap, f)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        f = self.model.config.downsample_factor
        h, w = x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x, (h, w)

    @torch.no_grad()
    def noise_to_tstar(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """x in [-1, 1] -> x_t* (the first step of purification): the prefilter, if any, then the noise."""
        if self.tiles(*x.shape[-2:]):
            return torch.cat([self._noise_one(x[i:i + 1], g) for i, g in enumerate(_per_image(generator, len(x)))])
        if self.config.prefilter == "impulse":
            x = impulse_filter((x.float() + 1.0) / 2.0, self.config.impulse_threshold) * 2.0 - 1.0
        t = torch.full((x.shape[0],), self.chain.num_timesteps - 1, device=x.device, dtype=torch.long)
        noise = _randn(x.shape, x.device, generator)
        return self.chain.q_sample(x.float(), t, noise)

    def _noise_one(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """:meth:`noise_to_tstar` of one large image: the prefilter in strips (the same values), the noise drawn
        for the whole image from its generator."""
        x = x.float()
        if self.config.prefilter == "impulse":  # in place on a copy: the values of (x + 1) / 2, filtered, * 2 - 1
            unit = impulse_filter_strips(x.add(1.0).div_(2.0), self.config.impulse_threshold, inplace=True)
            x = unit.mul_(2.0).sub_(1.0)
        t = torch.full((1,), self.chain.num_timesteps - 1, device=x.device, dtype=torch.long)
        return self.chain.q_sample(x, t, torch.randn(x.shape, device=x.device, generator=generator))

    @torch.no_grad()
    def purify(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Purify a float batch in [-1, 1]; returns float32 in [-1, 1] (no corruption)."""
        x, (h, w) = self._pad(x.float())
        if self.tiles(*x.shape[-2:]):
            gens = _per_image(generator, len(x))
            return torch.cat([self._reverse_tiled(self._noise_one(x[i:i + 1], g), g)
                              for i, g in enumerate(gens)])[..., :h, :w].clamp(-1.0, 1.0)
        x = self._reverse(self.noise_to_tstar(x, generator), generator)
        return x[..., :h, :w].clamp(-1.0, 1.0)

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """The reverse chain alone: ``x_t`` from :meth:`noise_to_tstar` back to [-1, 1].

        ``purify(x)`` is ``noise_to_tstar`` then this, so a caller that shows or measures the noised
        image can denoise that very image.
        """
        x, (h, w) = self._pad(x_t.float())
        if self.tiles(*x.shape[-2:]):
            gens = _per_image(generator, len(x))
            x = torch.cat([self._reverse_tiled(x[i:i + 1], g) for i, g in enumerate(gens)])
        else:
            x = self._reverse(x, generator)
        return x[..., :h, :w].clamp(-1.0, 1.0)

    def _net(self):
        return self._compiled[0] if self._compiled else self.model

    def _reverse(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        net = self._net()
        with self._autocast(x.device):
            for i in reversed(range(self.chain.num_timesteps)):
                t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
                noise = (_randn(x.shape, x.device, generator) if i > 0
                         else torch.zeros((), device=x.device))  # no noise at the last step
                x = self.chain.p_sample(net, x, t, noise=noise)
        return x

    def _reverse_tiled(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The reverse chain of one image (1, C, H, W), the UNet's output blended over tiles (tiling.py): each step
        goes band by band, so besides the UNet calls it holds a few copies of the image, never its tiles' outputs.
        """
        plan, net = self.plan(*x.shape[-2:]), self._net()

        def tile_net(tiles: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # attention as at training: S px
            return net(tiles, t, attention_window=self.image_size)

        for i in reversed(range(self.chain.num_timesteps)):
            t = torch.full((1,), i, device=x.device, dtype=torch.long)
            noise = (torch.randn(x.shape, device=x.device, generator=generator) if i > 0
                     else torch.zeros((), device=x.device))
            out = torch.empty_like(x)
            with self._autocast(x.device):
                for r0, r1, model_out in blended_output(tile_net, x, self.chain.model_timesteps(t), plan,
                                                        self.config.tile_batch_pixels):
                    out[..., r0:r1, :] = self.chain.p_sample(lambda *_, m=model_out: m, x[..., r0:r1, :], t,
                                                             noise=noise[..., r0:r1, :] if i > 0 else noise)
            x = out
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """uint8 (0..255) or float ([0, 1]) NCHW batch in, same dtype out (uint8 by rounding).

        ``generator``: one for the batch, or a list with one per image (see the module docstring).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB batch (N, 3, H, W), got shape {tuple(x.shape)}")
        was_uint8 = x.dtype == torch.uint8
        if not (was_uint8 or x.is_floating_point()):
            raise TypeError(f"expected uint8 or float images, got {x.dtype}")
        if self.tiles(*x.shape[-2:]) or not (generator is None or isinstance(generator, torch.Generator)):
            # one image at a time: its float copies, not the batch's, and its own generator if given one
            out = torch.empty_like(x)
            for i, g in enumerate(_per_image(generator, len(x))):
                out[i:i + 1] = self._forward(x[i:i + 1], g, was_uint8)
            return out
        return self._forward(x, generator, was_uint8)

    def _forward(self, x: torch.Tensor, generator: torch.Generator | None, was_uint8: bool) -> torch.Tensor:
        unit = x.float() / 255.0 if was_uint8 else x.float()
        out = (self.purify(unit * 2.0 - 1.0, generator) + 1.0) / 2.0
        if self.config.corruption == "baked":
            # the paper's corruption: a baked (fixed) smooth field would be one more pattern to learn
            out = corrupt(out, self.config.gray_p, self.config.noise_sigma, generator, lowfreq_sigma=0.0,
                          jpeg_quality=None)
        return (out * 255.0).round().clamp(0, 255).to(torch.uint8) if was_uint8 else out.to(x.dtype)
