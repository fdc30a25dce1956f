"""Import an improved-diffusion checkpoint (the ECLIPSE authors' denoisers) as an eclipse-stream denoiser.

The ECLIPSE reference code (CGCL-codes/ECLIPSE) trains its denoiser with openai/improved-diffusion, whose
``train_util`` saves ``torch.save(model.state_dict())`` files (``model*.pt``, ``ema_0.9999_*.pt``). Such a
file holds only tensors; everything else is read from the keys and shapes:

* model channels and input channels (the first convolution), channel multipliers and residual blocks per
  level (the output widths of the down path's blocks, split at its strided convolutions), attention
  resolutions (the levels whose blocks carry ``qkv``), learned sigma (twice the input channels out),
  scale-shift norm (the width of ``emb_layers``), the image size from the multipliers (improved-diffusion's
  table, :data:`~eclipse_stream.unet.CHANNEL_MULT`);

and what the weights cannot tell is given (:class:`ConvertConfig`): the number of attention heads (it changes
the function, not a shape), the schedule and its T, the range of timesteps the model was trained on.

The file is read with ``torch.load(weights_only=True)``: a file that needs code to load (a pickled
``nn.Module``, a pickle whose ``__reduce__`` calls a function) is refused, never run. The weights are mapped
onto :class:`~eclipse_stream.unet.UNet`; the attention's ``qkv`` rows are permuted per head (improved-
diffusion splits them head by head into q, k, v; the UNet here into q, k, v and then heads), and the output is
written by :func:`~eclipse_stream.checkpoint.save_denoiser` (atomic: no file under OUT on any failure) with
the source file's sha256 and ``converted_from = "improved-diffusion"`` in its metadata.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoint import save_denoiser
from .diffusion import SCHEDULES, DiffusionConfig
from .errors import CheckpointError, InputError, OutputError
from .unet import CHANNEL_MULT, PRESETS, UNet, UNetConfig, preset_config

__all__ = ["SCHEDULES", "SOURCE_FORMAT", "ConvertConfig", "build_unet", "convert_checkpoint", "convert_state_dict",
           "infer_config", "read_reference", "reference_name", "unet_name"]

SOURCE_FORMAT = "improved-diffusion"
# Wrappers people put around a state dict ({"model": sd} from many training scripts, {"state_dict": sd} from
# Lightning-style ones); improved-diffusion itself saves the bare state dict.
WRAPPER_KEYS = ("model", "state_dict")
PREFIX = "module."  # DistributedDataParallel's, when a wrapped model's state_dict() was saved
_REQUIRED = ("time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.0.in_layers.2.weight",
             "output_blocks.0.0.in_layers.2.weight", "out.2.weight")


@dataclass(frozen=True)
class ConvertConfig:
    """What an improved-diffusion ``.pt`` does not hold; the defaults are ECLIPSE's (CGCL-codes/ECLIPSE)."""

    num_heads: int = 4  # attention heads: not in the shapes (improved-diffusion's and ECLIPSE's default: 4)
    image_size: int | None = None  # None: inferred from the channel multipliers
    diffusion_steps: int = 4000  # T of the schedule the model was trained with
    noise_schedule: str = "cosine"
    max_timestep: int | None = None  # trained on timesteps [0, K) only; None: all of [0, T)
    overwrite: bool = False  # replace an existing OUT

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num heads must be an integer >= 1, got {self.num_heads!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image size must be an integer >= 1, got {self.image_size!r}")
        self.diffusion_config()  # validates schedule and T
        if self.max_timestep is not None and not (isinstance(self.max_timestep, int)
                                                  and 1 <= self.max_timestep <= self.diffusion_steps):
            raise ValueError(f"max timestep must be between 1 and diffusion steps={self.diffusion_steps}, "
                             f"got {self.max_timestep!r}")

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(schedule=self.noise_schedule, steps=self.diffusion_steps)


# -- reading ------------------------------------------------------------------------------------------------

def _load_error(path, exc: BaseException) -> CheckpointError:
    """Turn what ``torch.load(weights_only=True)`` raised into one line that says why."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = (f"it would import and call {found.group(1)}" if found
                else "it uses pickle instructions that only code-running loads allow")
        return CheckpointError(
            f"{path}: refused: loading it would run code from the file ({what}); eclipse-stream loads tensors "
            "only (torch.load weights_only=True). Convert a plain state dict: if you trust the file, re-save "
            "it with torch.save(model.state_dict(), 'weights.pt') and convert that")
    first = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else type(exc).__name__
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}")


def read_reference(path, data: bytes | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The improved-diffusion state dict in ``path`` (or in ``data``, its bytes) and how it was found.

    Returns ``(state, found)``: float32 tensors by improved-diffusion name, and ``found`` = the wrapper key and
    prefix that were removed and the source dtypes. Anything else is a :class:`CheckpointError`.
    """
    if data is None:
        data = Path(path).read_bytes()
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # a torch.save zip archive, or a (legacy) pickle
        what = ("an eclipse-stream denoiser or another safetensors file: it needs no conversion"
                if data[8:10] == b'{"' else "empty" if not data else f"it starts with {data[:16]!r}")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: neither a torch.save archive nor a pickle "
                              f"({what})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError... on a bad file
        raise _load_error(path, e) from None
    state, found = _unwrap(path, obj)
    dtypes = set()
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {value.dtype}; a denoiser's weights are "
                                  "floating point")
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise CheckpointError(f"{path}: tensor {key!r} has {bad} non-finite value(s) (NaN or inf); "
                                  "the checkpoint is damaged or diverged")
        dtypes.add(str(value.dtype).removeprefix("torch."))
    found["dtypes"] = sorted(dtypes)
    return {k: v.float() for k, v in state.items()}, found


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items())


def _unwrap(path, obj) -> tuple[dict[str, torch.Tensor], dict]:
    found: dict = {"wrapper": None, "prefix": None}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    if not _is_state(obj):
        wrapped = [k for k in WRAPPER_KEYS if _is_state(obj.get(k))]
        if len(wrapped) != 1:
            keys = sorted(map(str, obj))[:8]
            hint = (" (an optimizer state, improved-diffusion's opt*.pt: convert model*.pt or ema_*.pt)"
                    if {"state", "param_groups"} <= set(obj) else "")
            raise CheckpointError(f"{path}: not a state dict of tensors: top-level keys {keys}{hint}; expected "
                                  f"a state dict, or one wrapped as {{'model': ...}} or {{'state_dict': ...}}")
        found["wrapper"] = wrapped[0]
        obj = obj[wrapped[0]]
    if all(k.startswith(PREFIX) for k in obj):
        found["prefix"] = PREFIX
        obj = {k[len(PREFIX):]: v for k, v in obj.items()}
    return dict(obj), found


# -- the architecture, from keys and shapes ----------------------------------------------------------------

def _blocks(state: dict, prefix: str, path) -> list[int]:
    """Sorted block indices under ``prefix`` (``input_blocks``...), which must run 0, 1, ... without gaps."""
    idx = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))})
    if idx != list(range(len(idx))):
        gap = next(i for i in range(len(idx) + 1) if i not in idx)
        raise CheckpointError(f"{path}: {prefix}.{gap} has no weights: an up/downsample without convolution "
                              "(conv_resample=False) is not supported")
    return idx


def infer_config(state: dict[str, torch.Tensor], num_heads: int = 4, image_size: int | None = None,
                 path="checkpoint") -> UNetConfig:
    """The :class:`UNetConfig` of an improved-diffusion state dict (works on meta tensors: shapes only)."""

    def fail(why):
        raise CheckpointError(f"{path}: {why}")

    def dim0(key: str) -> int:
        if key not in state or state[key].ndim < 1:
            fail(f"{key} is missing or a scalar: not an improved-diffusion UNet state dict")
        return int(state[key].shape[0])

    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        fail(f"unknown key layout: not an improved-diffusion UNet state dict (no {missing[0]!r}; it has keys "
             f"like {sorted(state)[:4]})")
    if "label_emb.weight" in state:
        fail("a class-conditional model (label_emb): purification needs an unconditional one")
    first = state["input_blocks.0.0.weight"]
    if first.ndim != 4:
        fail(f"input_blocks.0.0.weight has shape {tuple(first.shape)}: not a 2-D UNet")
    ch0, in_ch = int(first.shape[0]), int(first.shape[1])
    if in_ch != 3:
        fail(f"{in_ch} input channels (a super-resolution or non-RGB model?): only 3-channel image denoisers "
             "are supported")
    out_ch = dim0("out.2.weight")
    if out_ch != 2 * in_ch:
        fail(f"{out_ch} output channels: eclipse-stream's chain needs eps and the learned variance (learn_sigma"
             f"=True, {2 * in_ch} channels); a fixed-variance model is not supported")

    levels: list[list[int]] = [[]]  # input block indices of the residual blocks of each level
    for i in _blocks(state, "input_blocks", path)[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:
            levels.append([])
        elif f"input_blocks.{i}.0.in_layers.2.weight" in state:
            levels[-1].append(i)
        else:
            fail(f"input_blocks.{i} is neither a residual block nor a strided-convolution downsample")
    counts = {len(lv) for lv in levels}
    if len(counts) != 1 or 0 in counts:
        fail(f"levels with different numbers of residual blocks {[len(lv) for lv in levels]}")
    mults, attention_ds = [], []
    scale_shift = None
    for level, blocks in enumerate(levels):
        widths = {dim0(f"input_blocks.{i}.0.in_layers.2.weight") for i in blocks}
        attn = {f"input_blocks.{i}.1.qkv.weight" in state for i in blocks}
        if len(widths) != 1 or len(attn) != 1:
            fail(f"level {level}'s residual blocks differ in width {sorted(widths)} or attention")
        width = widths.pop()
        if width % ch0:
            fail(f"level {level} has width {width}, not a multiple of the model channels {ch0}")
        mults.append(width // ch0)
        if attn.pop():
            attention_ds.append(2 ** level)
        emb = dim0(f"input_blocks.{blocks[0]}.0.emb_layers.1.weight")
        this = {2 * width: True, width: False}.get(emb)
        if this is None or scale_shift not in (None, this):
            fail(f"input_blocks.{blocks[0]}.0.emb_layers.1 has {emb} outputs for width {width}")
        scale_shift = this
    mults = tuple(mults)
    if image_size is None:
        image_size = next((size for size, m in CHANNEL_MULT.items() if m == mults), None)
        if image_size is None:
            fail(f"cannot infer the image size from channel multipliers {mults} (improved-diffusion's table: "
                 + ", ".join(f"{m} for {s}" for s, m in CHANNEL_MULT.items()) + "); give it (--image-size)")
    heads_ok = [ch0 * mults[lv] for lv in range(len(mults)) if 2 ** lv in attention_ds] + [ch0 * mults[-1]]
    bad = sorted({w for w in heads_ok if w % num_heads})
    if bad:
        fail(f"{num_heads} attention heads do not divide the attention width(s) {bad}; give the number the "
             "model was trained with (--num-heads)")
    try:
        config = UNetConfig(image_size=image_size, in_channels=in_ch, model_channels=ch0,
                            num_res_blocks=counts.pop(), channel_mult=mults,
                            attention_resolutions=tuple(image_size // ds for ds in attention_ds),
                            num_heads=num_heads, dropout=0.0, use_scale_shift_norm=scale_shift, learn_sigma=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: inferred architecture is not valid here: {e}") from None
    # Dropout is not in the weights and does nothing at inference; a preset's architecture gets the preset's
    # (paper: 0.3, improved-diffusion's CIFAR-10 setting), so that train --init-from accepts the file.
    for name in PRESETS:
        preset = preset_config(name, image_size) if image_size in CHANNEL_MULT else None
        if preset is not None and replace(preset, dropout=0.0) == config:
            return preset
    return config


# -- the weights ---------------------------------------------------------------------------------------------

_TOP = {"input_blocks": "down", "middle_block": "middle", "output_blocks": "up"}
_LAYER = {"in_layers.0": "in_norm", "in_layers.2": "in_conv", "emb_layers.1": "emb", "out_layers.0": "out_norm",
          "out_layers.3": "out_conv", "skip_connection": "skip", "op": "conv", "conv": "conv", "norm": "norm",
          "qkv": "qkv", "proj_out": "proj"}


def unet_name(name: str) -> str | None:
    """The UNet parameter that improved-diffusion's ``name`` becomes; None if it has no counterpart."""
    if re.fullmatch(r"(time_embed\.[02]|out\.[02])\.(weight|bias)", name):
        return name
    if re.fullmatch(r"input_blocks\.0\.0\.(weight|bias)", name):  # the first convolution
        return "down" + name.removeprefix("input_blocks")
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+(?:\.\d+)?)\.(.+)\.(weight|bias)", name)
    if m is None:
        return None
    top, where, layer, kind = m.groups()
    if layer not in _LAYER or (top == "middle_block") == ("." in where):
        return None
    return f"{_TOP[top]}.{where}.{_LAYER[layer]}.{kind}"


def _qkv_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """improved-diffusion orders the 3C qkv rows (head, q|k|v, d); the UNet here (q|k|v, head, d)."""
    rows = t.shape[0]
    return t.reshape(heads, 3, rows // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def convert_state_dict(state: dict[str, torch.Tensor], config: UNetConfig, path="checkpoint"):
    """Rename improved-diffusion's weights to the UNet's, permute qkv per head, make 1-D convolutions 2-D."""
    out, unknown = {}, []
    for name, value in state.items():
        ours = unet_name(name)
        if ours is None:
            unknown.append(name)
            continue
        if name.endswith((".qkv.weight", ".qkv.bias")):
            if value.ndim < 1 or value.shape[0] % (3 * config.num_heads):
                raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}: its rows are not "
                                      f"3 x {config.num_heads} heads x the head width")
            value = _qkv_rows(value, config.num_heads)
        if name.endswith((".qkv.weight", ".proj_out.weight")) and value.ndim == 3:
            value = value.unsqueeze(-1)  # conv_nd(1, ...) -> the 1x1 Conv2d here
        out[ours] = value
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} tensor(s) with no counterpart in the UNet, e.g. "
                              f"{sorted(unknown)[:3]}: not a plain improved-diffusion UNet")
    return out


def reference_name(ours: str) -> str:
    """improved-diffusion's name of a UNet tensor (for messages)."""
    m = re.fullmatch(r"(down|middle|up)\.(\d+(?:\.\d+)?)\.([a-z_]+)\.(weight|bias)", ours)
    if m is None:  # the first convolution, time_embed, out
        return ours.replace("down.0.0.", "input_blocks.0.0.")
    top, where, layer, kind = m.groups()
    layer = ("op" if top == "down" else "conv") if layer == "conv" else \
        {v: k for k, v in _LAYER.items()}.get(layer, layer)
    return f"{ {v: k for k, v in _TOP.items()}[top]}.{where}.{layer}.{kind}"


def _load(model: UNet, weights: dict[str, torch.Tensor], path) -> None:
    """Load strictly; a missing or misshapen tensor is named in improved-diffusion's terms."""
    ours = model.state_dict()
    missing = sorted(reference_name(k) for k in set(ours) - set(weights))
    problems = [f"missing {len(missing)} tensor(s), e.g. {missing[:2]}"] if missing else []
    problems += [f"{reference_name(k)} has shape {tuple(weights[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in ours.items() if k in weights and weights[k].shape != v.shape][:2]
    extra = sorted(reference_name(k) for k in set(weights) - set(ours))
    problems += [f"{len(extra)} tensor(s) too many, e.g. {extra[:2]}"] if extra else []
    if problems:
        c = model.config
        raise CheckpointError(f"{path}: weights do not fit an improved-diffusion UNet with the inferred "
                              f"architecture (model channels {c.model_channels}, channel_mult {c.channel_mult}, "
                              f"{c.num_res_blocks} res blocks, attention at {c.attention_resolutions} px): "
                              + "; ".join(problems))
    model.load_state_dict(weights)


def build_unet(state: dict[str, torch.Tensor], num_heads: int = 4, image_size: int | None = None,
               path="checkpoint") -> UNet:
    """The UNet (eval mode) computing what the improved-diffusion ``state`` computes."""
    config = infer_config(state, num_heads, image_size, path)
    model = UNet(config)
    _load(model, convert_state_dict(state, config, path), path)
    return model.eval()


# -- the command ---------------------------------------------------------------------------------------------

def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if not src.is_file():
        raise CheckpointError(f"{src}: checkpoint not found" if not src.exists() else f"{src}: not a file")
    if out.exists() or out.is_symlink():
        if out.is_dir():
            raise InputError(f"{out}: is a folder; give the output file's name (e.g. denoiser.safetensors)")
        if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
            raise InputError(f"{out}: is the input checkpoint {src}; convert never writes over its input")
        if not overwrite:
            raise InputError(f"{out}: already exists; choose another name or pass --overwrite")


def convert_checkpoint(src, out, config: ConvertConfig | None = None) -> dict:
    """Convert the improved-diffusion checkpoint ``src`` into the denoiser file ``out``; return a summary."""
    config = config or ConvertConfig()
    src, out = Path(src), Path(out)
    _check_paths(src, out, config.overwrite)
    try:
        data = src.read_bytes()  # hashed and parsed from the same bytes
    except OSError as e:
        raise CheckpointError(f"{src}: cannot read: {e.strerror or e}") from None
    sha256 = hashlib.sha256(data).hexdigest()
    state, found = read_reference(src, data)
    del data
    model = build_unet(state, config.num_heads, config.image_size, src)
    unet_config = model.config
    max_t = config.max_timestep or config.diffusion_steps
    convert_args = {**asdict(config), "image_size": unet_config.image_size,
                    "image_size_inferred": config.image_size is None, **found}
    del convert_args["overwrite"]
    try:
        save_denoiser(out, model, config.diffusion_config(),
                      extra={"converted_from": SOURCE_FORMAT, "source_file": src.name, "source_sha256": sha256,
                             "trained_timesteps": [0, max_t], "convert_args": convert_args})
    except OSError as e:
        raise OutputError(f"{out}: cannot write the converted checkpoint: {e.strerror or e}") from None
    return {"out": str(out), "source": str(src), "source_sha256": sha256, "parameters": model.num_parameters(),
            "unet": unet_config.to_dict(), "diffusion": config.diffusion_config().to_dict(),
            "trained_timesteps": [0, max_t], "convert_args": convert_args}
