"""Checkpoints: safetensors tensors plus one JSON metadata entry. Nothing is ever unpickled.

Two kinds of file share the format:

* a **denoiser** (``kind = "denoiser"``): the exported EMA weights of a trained UNet and
  everything needed to use them (UNet config, diffusion config, image size, training
  arguments, package version, hash of the training file list);
* a **training state** (``kind = "train-state"``): live weights, EMA weights and AdamW
  state, so that ``eclipse-stream train --resume`` continues at the saved step.

Files are written to a temporary name in the same folder and renamed, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .deblur import ClassSpectra
from .diffusion import DiffusionConfig, GaussianDiffusion
from .errors import CheckpointError
from .fsutil import atomic_path, file_sha256
from .unet import UNet, UNetConfig

__all__ = [
    "METADATA_KEY",
    "Denoiser",
    "check_tensors",
    "load_denoiser",
    "load_train_state",
    "record_class_spectra",
    "save_denoiser",
    "save_train_state",
]

METADATA_KEY = "eclipse_stream"
FORMAT_VERSION = 1
#: The sparse clean set's per-class power spectra (``deblur.ClassSpectra``), stored beside the weights of a
#: denoiser under this tensor name, described by the metadata entry of the same name (``purify --deblur auto``).
CLASS_SPECTRA = "class_spectra"


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: str | os.PathLike) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def _read(path: str | os.PathLike, expected_kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors and metadata, turning every way a file can be wrong into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY)
            if raw_meta is None:
                raise CheckpointError(f"{path}: a safetensors file, but not an eclipse-stream checkpoint "
                                      f"(no '{METADATA_KEY}' metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or foreign file?): {e}")
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON: {e}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is a JSON {type(meta).__name__}, not an object")
    kind = meta.get("kind")
    if kind != expected_kind:
        hint = {"train-state": " (this is a training state: pass the exported denoiser, train's --out file)",
                "denoiser": " (this is an exported denoiser, not a training state)"}.get(kind, "")
        raise CheckpointError(f"{path}: expected a {expected_kind} checkpoint, found kind={kind!r}{hint}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: checkpoint metadata's format_version is {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer eclipse-stream (format {meta['format_version']}); "
                              f"upgrade the package")
    check_tensors(tensors, path)
    return tensors, meta


def check_tensors(tensors: dict[str, torch.Tensor], where) -> None:
    """Every tensor of a checkpoint (or an in-memory model's state) is floating point and finite; else a
    CheckpointError naming ``where`` and the tensor. A cast (int32) or diverged (NaN/inf) file would otherwise
    purify every image to black and be recorded as done."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name!r} is {t.dtype}, not floating point: these are not a "
                                  "denoiser's weights (was the file cast or edited?)")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = t.numel() - int(finite.sum())
            raise CheckpointError(f"{where}: tensor {name!r} holds {bad} NaN or infinite value(s) of {t.numel()}: "
                                  "the weights are broken (a diverged training run?); use another checkpoint")


def _configs(path, meta) -> tuple[UNetConfig, DiffusionConfig]:
    """The UNet and diffusion configs of the metadata, validated before anything is built from them."""
    try:
        unet, diffusion = meta["unet"], meta["diffusion"]
        if not isinstance(unet, dict) or not isinstance(diffusion, dict):
            raise TypeError("'unet' and 'diffusion' must be JSON objects")
        return UNetConfig.from_dict(unet), DiffusionConfig(**diffusion)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata has no valid UNet/diffusion config: {e}") from None


def _check_trained_timesteps(path, meta: dict, steps: int) -> None:
    """``trained_timesteps`` (absent or null: all of T) is a pair of integers 0 <= a < b <= T."""
    trained = meta.get("trained_timesteps")
    if trained is None:
        return
    ok = (isinstance(trained, list) and len(trained) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in trained)
          and 0 <= trained[0] < trained[1] <= steps)
    if not ok:
        raise CheckpointError(f"{path}: checkpoint metadata's trained_timesteps is {trained!r}; expected "
                              f"[a, b] with integers 0 <= a < b <= {steps} (the schedule's T)")


def _build(unet_cfg: UNetConfig, tensors: dict[str, torch.Tensor], path, what: str) -> UNet:
    """The UNet of ``unet_cfg`` holding ``tensors``. Its shapes are compared on the meta device first (nothing
    allocated), so a config that does not fit the file's weights is refused before a real model is built."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNet(unet_cfg).state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in tensors.items()}
    if shapes != stored:
        missing, unexpected = sorted(set(shapes) - set(stored)), sorted(set(stored) - set(shapes))
        other = sorted(k for k in set(shapes) & set(stored) if shapes[k] != stored[k])
        detail = "; ".join(f"{n} {len(v)}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                           for n, v in (("missing", missing), ("unexpected", unexpected),
                                        ("of another shape", other)) if v)
        raise CheckpointError(f"{path}: {what} weights do not match the stored config ({detail})")
    model = UNet(unet_cfg)
    _load_state(model, tensors, path, what)
    return model


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    try:
        model.load_state_dict(state)  # strict: lists missing and unexpected keys and shape mismatches
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {what} weights do not match the stored config: {e}") from None


@dataclass
class Denoiser:
    """A loaded denoiser: the UNet (eval mode), its diffusion chain and the file's metadata."""

    model: UNet
    diffusion: GaussianDiffusion
    metadata: dict = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None
    class_spectra: ClassSpectra | None = None  # the sparse clean set's, if ``train`` recorded them


    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def trained_max_timestep(self) -> int:
        """Training timesteps were drawn from [0, this); checkpoints from before ``--max-timestep``: all of T."""
        trained = self.metadata.get("trained_timesteps")
        return int(trained[1]) if trained else self.diffusion.num_timesteps

    def to(self, device) -> Denoiser:
        self.model.to(device)
        return self


def save_denoiser(path, model: UNet, diffusion_config: DiffusionConfig, *, train_args: dict | None = None,
                  train_files_sha256: str | None = None, step: int | None = None, extra: dict | None = None,
                  class_spectra: ClassSpectra | None = None):
    """Write an exported denoiser (pass the EMA model) to ``path`` atomically, with the sparse clean set's
    ``class_spectra`` if given (none when its images had no labels)."""
    meta = {
        "kind": "denoiser",
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "unet": model.config.to_dict(),
        "diffusion": diffusion_config.to_dict(),
        "image_size": model.config.image_size,
        "train_args": train_args or {},
        "train_files_sha256": train_files_sha256,
        "step": step,
        "parameters": model.num_parameters(),
        **(extra or {}),
    }
    tensors = dict(model.state_dict())
    if class_spectra is not None and class_spectra.spectra:
        tensors[CLASS_SPECTRA], meta[CLASS_SPECTRA] = class_spectra.to_tensor()
    _atomic_save(tensors, meta, path)


def _pop_class_spectra(path, tensors: dict[str, torch.Tensor], meta: dict) -> ClassSpectra | None:
    """Take the recorded class spectra out of ``tensors`` (they are not weights); CheckpointError if malformed."""
    tensor, info = tensors.pop(CLASS_SPECTRA, None), meta.get(CLASS_SPECTRA)
    if tensor is None and info is None:
        return None
    if tensor is None or not isinstance(info, dict):
        raise CheckpointError(f"{path}: checkpoint has class spectra {'metadata' if tensor is None else 'tensor'} "
                              "without the other; the file was edited or cut")
    try:
        return ClassSpectra.from_tensor(tensor, info)
    except ValueError as e:
        raise CheckpointError(f"{path}: malformed class spectra: {e}") from None


def record_class_spectra(src, dst, class_spectra: ClassSpectra) -> None:
    """Copy the denoiser ``src`` to ``dst`` (atomically; may be ``src``) with ``class_spectra`` recorded (replacing
    any): for a denoiser trained before ``train`` recorded them. Weights and other metadata are unchanged."""
    tensors, meta = _read(src, "denoiser")
    tensors.pop(CLASS_SPECTRA, None)
    meta.pop(CLASS_SPECTRA, None)
    if class_spectra.spectra:
        tensors[CLASS_SPECTRA], meta[CLASS_SPECTRA] = class_spectra.to_tensor()
    _atomic_save(tensors, meta, dst)


def _identity(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def load_denoiser(path, device: str | torch.device = "cpu") -> Denoiser:
    """Load a denoiser written by :func:`save_denoiser`; raise CheckpointError if it is anything else.

    The recorded sha256 is of the very file the weights came from: ``train`` replaces its output
    (atomic rename) while it runs, so a file replaced between reading and hashing is read again.
    """
    for _ in range(3):
        before = _identity(path)
        tensors, meta = _read(path, "denoiser")
        sha256 = file_sha256(path)
        if _identity(path) == before:
            break
    else:
        raise CheckpointError(f"{path}: the file was replaced three times while being read; "
                              "load it once its writer has finished")
    unet_cfg, diff_cfg = _configs(path, meta)
    _check_trained_timesteps(path, meta, diff_cfg.steps)
    spectra = _pop_class_spectra(path, tensors, meta)
    model = _build(unet_cfg, tensors, path, "denoiser")
    model.eval().requires_grad_(False).to(device)
    return Denoiser(model, GaussianDiffusion.from_config(diff_cfg), meta, str(path), sha256, spectra)


def save_train_state(path, *, model: UNet, ema: UNet, optimizer: torch.optim.Optimizer,
                     diffusion_config: DiffusionConfig, step: int, train_args: dict,
                     train_files_sha256: str) -> None:
    """Everything ``--resume`` needs, as tensors + JSON (optimizer hyper-parameters go to JSON)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {
        "kind": "train-state",
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "unet": model.config.to_dict(),
        "diffusion": diffusion_config.to_dict(),
        "step": step,
        "train_args": train_args,
        "train_files_sha256": train_files_sha256,
        "optim_param_groups": opt["param_groups"],
        "optim_scalars": scalars,
    }
    _atomic_save(tensors, meta, path)


def load_train_state(path, *, model: UNet, ema: UNet, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, EMA and optimizer in place from ``path``; return the metadata (step, args...)."""
    tensors, meta = _read(path, "train-state")
    unet_cfg, _ = _configs(path, meta)
    if unet_cfg != model.config:
        raise CheckpointError(f"{path}: saved with a different UNet config than requested "
                              f"(saved {unet_cfg}, requested {model.config})")

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    _load_state(model, part("model."), path, "model")
    _load_state(ema, part("ema."), path, "EMA")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: training state's step is {step!r}, not an integer >= 0")
    try:
        state: dict[int, dict] = {}
        for k, v in part("optim.").items():
            idx, name = k.split(".", 1)
            state.setdefault(int(idx), {})[name] = v
        for idx, scalars in meta.get("optim_scalars", {}).items():
            state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optim_param_groups"]})
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit this model: {e}") from None
    return meta
