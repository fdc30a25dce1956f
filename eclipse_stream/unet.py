"""The denoiser: an improved-DDPM UNet (Nichol & Dhariwal 2021) predicting eps and v.

Residual blocks with scale-shift timestep conditioning, multi-head self-attention at
chosen resolutions, skip connections between the down and up paths, zero-initialised
output layers. Attention uses ``torch.nn.functional.scaled_dot_product_attention`` so
PyTorch picks the fastest kernel. The whole architecture is described by a
:class:`UNetConfig`, which every checkpoint stores as JSON.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .defaults import IMAGE_SIZES
from .defaults import PRESETS as PRESET_NAMES

__all__ = ["CHANNEL_MULT", "PRESETS", "UNet", "UNetConfig", "preset_config"]

# Channel multipliers per input size (improved-diffusion's choices): deeper nets for larger images.
CHANNEL_MULT = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the denoiser; attention resolutions are in pixels (e.g. 16 and 8)."""

    image_size: int = 32
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 3
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    dropout: float = 0.3
    use_scale_shift_norm: bool = True
    learn_sigma: bool = True
    norm_groups: int = 32

    def __post_init__(self) -> None:
        _check_bounds(self)  # before any arithmetic on them: a crafted checkpoint's config is read with this
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {self.downsample_factor} "
                             f"for channel_mult {self.channel_mult}")
        widths = {self.model_channels * m for m in self.channel_mult}
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every width {sorted(widths)} must be divisible by norm_groups={self.norm_groups}")
        if any(w % self.num_heads for w in widths):
            raise ValueError(f"every width {sorted(widths)} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNet config keys {sorted(unknown)}")
        return cls(**d)


#: Bounds of every UNetConfig field, far above any real denoiser (the paper's: 128 channels, 3 blocks, 4
#: heads; improved-diffusion's ImageNet-256: 256 channels), so that a crafted config cannot allocate a huge
#: model or loop for ever before its weights are compared with the file's.
LIMITS = {"image_size": (8, 4096), "in_channels": (1, 16), "model_channels": (1, 1024), "num_res_blocks": (1, 16),
          "num_heads": (1, 256), "norm_groups": (1, 1024)}
MAX_LEVELS, MAX_MULT = 8, 16  # channel_mult: at most 8 levels, each at most 16


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bounds(cfg: UNetConfig) -> None:
    for name, (lo, hi) in LIMITS.items():
        value = getattr(cfg, name)
        if not (_is_int(value) and lo <= value <= hi):
            raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    for name, hi in (("channel_mult", MAX_MULT), ("attention_resolutions", cfg.image_size)):
        value = getattr(cfg, name)
        if not (isinstance(value, (list, tuple)) and all(_is_int(v) and 1 <= v <= hi for v in value)):
            raise ValueError(f"{name} must be a list of integers in 1..{hi}, got {value!r}")
    if not 1 <= len(cfg.channel_mult) <= MAX_LEVELS:
        raise ValueError(f"channel_mult must have 1..{MAX_LEVELS} levels, got {cfg.channel_mult!r}")
    if not (isinstance(cfg.dropout, (int, float)) and 0.0 <= cfg.dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout!r}")
    for name in ("use_scale_shift_norm", "learn_sigma"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")


# Presets at 32x32; ``preset_config`` adapts channel_mult to other sizes.
PRESETS: dict[str, UNetConfig] = {
    # The ECLIPSE reference UNet for CIFAR-10 (52.5M parameters).
    "paper": UNetConfig(model_channels=128, num_res_blocks=3, attention_resolutions=(16, 8),
                        num_heads=4, dropout=0.3),
    # Trains in minutes on one GPU and is small enough to ship inside the package.
    "small": UNetConfig(model_channels=64, num_res_blocks=2, channel_mult=(1, 2, 2),
                        attention_resolutions=(16, 8), num_heads=4, dropout=0.1),
    # For tests and CPU demos only.
    "tiny": UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                       attention_resolutions=(8,), num_heads=1, dropout=0.0),
}


assert tuple(PRESETS) == PRESET_NAMES and tuple(CHANNEL_MULT) == IMAGE_SIZES  # the lists of defaults.py

# small and tiny drop the deepest level of the per-size channel multipliers (fewer parameters).
_LEVELS_DROPPED = {"paper": 0, "small": 1, "tiny": 1}


def preset_config(name: str, image_size: int = 32, **overrides) -> UNetConfig:
    """The named preset at ``image_size`` (32, 64, 128 or 256), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if image_size not in CHANNEL_MULT:
        raise ValueError(f"image size {image_size} is not supported; choose one of {sorted(CHANNEL_MULT)}")
    mult = CHANNEL_MULT[image_size]
    mult = mult[: len(mult) - _LEVELS_DROPPED[name]]
    return replace(PRESETS[name], image_size=image_size, channel_mult=mult, **overrides)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 even under reduced-precision autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 scale_shift: bool, groups: int):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_norm = GroupNorm32(groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        self.out_norm = GroupNorm32(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        e = self.emb(F.silu(emb)).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, or within windows (``window``)."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """``window``: attend within ``window`` x ``window`` squares of positions only (see
        :func:`windowed_attention`); None, or a map no larger than one window, attends over all positions."""
        b, c, h, w = x.shape
        if window is not None and (h > window or w > window):
            return x + self.proj(windowed_attention(self.qkv(self.norm(x)), self.num_heads, window))
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (b, heads, hw, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


def _windows(length: int, window: int) -> tuple[int, list[int], list[int]]:
    """Windows along one axis, all full (``size`` = min(window, length)); the last one is moved back to end at the
    edge, so it overlaps the one before when ``window`` does not divide ``length``. Returns (size, window starts,
    the window each position reads its output from: the first that holds it)."""
    size = min(window, length)
    starts = list(range(0, length - size, size)) + [length - size]
    return size, starts, [min(p // size, len(starts) - 1) for p in range(length)]


@functools.lru_cache(maxsize=64)
def _window_index(h: int, w: int, window: int, device: torch.device) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(windows, positions a window, the flat h*w positions of every window in window-major order, and for every
    flat position its row in that order)."""
    sy, ys, oy = _windows(h, window)
    sx, xs, ox = _windows(w, window)
    gy = torch.tensor(ys)[:, None] + torch.arange(sy)[None]  # (ny, sy)
    gx = torch.tensor(xs)[:, None] + torch.arange(sx)[None]  # (nx, sx)
    gather = (gy[:, None, :, None] * w + gx[None, :, None, :]).reshape(-1)  # (ny, nx, sy, sx)
    oy_t, ox_t = torch.tensor(oy), torch.tensor(ox)
    py, px = torch.arange(h) - torch.tensor(ys)[oy_t], torch.arange(w) - torch.tensor(xs)[ox_t]
    scatter = (((oy_t[:, None] * len(xs) + ox_t[None, :]) * sy + py[:, None]) * sx + px[None, :]).reshape(-1)
    return len(ys) * len(xs), sy * sx, gather.to(device), scatter.to(device)


def windowed_attention(qkv: torch.Tensor, num_heads: int, window: int) -> torch.Tensor:
    """Self-attention of a (b, 3c, h, w) q/k/v map within ``window`` x ``window`` windows; returns (b, c, h, w).

    Every query attends over one full window of positions (the context a denoiser trained at that size saw),
    never over padding: where ``window`` does not divide a side, the last window is moved back to end at the
    edge, and the positions it shares with the window before take their output from that one. Positions are
    gathered as rows of the channels-last map (a view when the map is channels-last, as purify's batches are).
    """
    b, c3, h, w = qkv.shape
    c = c3 // 3
    windows, size, gather, scatter = _window_index(h, w, window, qkv.device)
    t = qkv.permute(0, 2, 3, 1).reshape(b, h * w, c3).index_select(1, gather)  # (b, windows * size, 3c)
    t = t.view(b * windows, size, 3, num_heads, c // num_heads)
    q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))  # each (b * windows, heads, size, head_dim)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, windows * size, c)
    return out.index_select(1, scatter).view(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Stage(nn.ModuleList):
    """A sequence of layers; ResBlocks get the timestep embedding, attention its window, the rest only x."""

    def forward(self, x, emb, window: int | None = None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, window)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """forward(x, t) -> (N, 2C, H, W): eps and v; t is the model timestep (0..1000 scale)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.model_channels
        emb_dim = 4 * ch0
        g = cfg.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin, cout):
            return ResBlock(cin, emb_dim, cout, cfg.dropout, cfg.use_scale_shift_norm, g)

        self.down = nn.ModuleList([_Stage([nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)])])
        skip_channels, ch, res_px = [ch0], ch0, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, ch0 * mult)]
                ch = ch0 * mult
                if res_px in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_heads, g))
                self.down.append(_Stage(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(_Stage([Downsample(ch)]))
                skip_channels.append(ch)
                res_px //= 2

        self.middle = _Stage([res(ch, ch), AttentionBlock(ch, cfg.num_heads, g), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), ch0 * mult)]
                ch = ch0 * mult
                if res_px in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_heads, g))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    res_px *= 2
                self.up.append(_Stage(layers))

        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, attention_window: int | None = None) -> torch.Tensor:
        """``attention_window`` (input pixels, e.g. the training size): every attention layer then attends within
        windows that cover that many input pixels (8 x 8 positions at 1/4 resolution for 32), as at training,
        instead of over the whole map; None attends globally."""
        if x.shape[-1] % self.config.downsample_factor or x.shape[-2] % self.config.downsample_factor:
            raise ValueError(f"input {tuple(x.shape[-2:])} must be a multiple of "
                             f"{self.config.downsample_factor} in height and width")
        size = x.shape[-2]

        def window(h: torch.Tensor) -> int | None:  # the window at h's resolution, in positions
            return None if attention_window is None else max(1, attention_window * h.shape[-2] // size)

        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        h, skips = x, []
        for stage in self.down:
            h = stage(h, emb, window(h))
            skips.append(h)
        h = self.middle(h, emb, window(h))
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, window(h))
        return self.out(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
