"""Training the purification denoiser on a sparse clean set (ECLIPSE Algorithm 1, lines 1-15).

Replication (``replicate`` = M): Algorithm 1 trains on M copies of the sparse set
(M = 4 gives the reference's 4 x 2,000 = 8,000 samples). Sampling stays uniform over the
sparse images; M only sets the epoch length, i.e. how often the sampling order is
reshuffled (every M passes over the data). No augmentation is applied: the paper shows
crop/flip/rotate/mixup hurt.

Every step's randomness (batch order, timesteps, noise, dropout) is a function of
``(seed, step)``, so a run resumed from a training state continues exactly where the
uninterrupted run would have been.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import check_tensors, load_denoiser, load_train_state, save_denoiser, save_train_state
from .config import is_int, is_real
from .deblur import ClassSpectra
from .devices import AUTO, resolve_device
from .diffusion import MAX_STEPS, DiffusionConfig, GaussianDiffusion
from .errors import CheckpointError, EclipseError, InputError, NumericalError
from .outputs import check_output_files
from .sources import image_folder, load_training_images
from .unet import UNet, preset_config

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
LOSS_WINDOW = 50  # steps averaged for the reported loss (and between host syncs)
MAX_BATCH_SIZE = 16384
MAX_REPLICATE = 10_000  # the epoch's index order holds images x replicate entries


@dataclass(frozen=True)
class TrainConfig:
    """Arguments of ``eclipse-stream train``; validated on construction."""

    source: str
    out: str
    preset: str = "small"
    image_size: int = 32
    iterations: int = 250_000
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    replicate: int = 4
    diffusion_steps: int = 4000
    max_timestep: int | None = None  # train on timesteps [0, K) of the T-step schedule only; None: all of [0, T)
    init_from: str | None = None  # start from this exported denoiser's weights (fine-tuning); None: random init
    precision: str = "fp32"
    seed: int = 0
    device: str | None = None
    checkpoint_every: int = 1000
    state: str | None = None  # training-state path; default: <out>.state.safetensors
    resume: bool = False

    def __post_init__(self) -> None:
        checks = [
            (is_int(self.iterations, 1), f"iterations must be >= 1, got {self.iterations!r}"),
            (is_int(self.batch_size, 1, MAX_BATCH_SIZE), f"batch size must be in 1..{MAX_BATCH_SIZE}, "
                                                          f"got {self.batch_size!r}"),
            (is_real(self.lr) and self.lr > 0, f"learning rate must be a finite number > 0, got {self.lr!r}"),
            (is_real(self.weight_decay, 0.0), f"weight decay must be a finite number >= 0, got {self.weight_decay!r}"),
            (is_real(self.ema_decay, 0.0) and self.ema_decay < 1,
             f"EMA decay must be in [0, 1), got {self.ema_decay!r}"),
            (is_int(self.replicate, 1, MAX_REPLICATE), f"replicate must be in 1..{MAX_REPLICATE}, "
                                                        f"got {self.replicate!r}"),
            (is_int(self.diffusion_steps, 2, MAX_STEPS), f"diffusion steps must be in 2..{MAX_STEPS}, "
                                                          f"got {self.diffusion_steps!r}"),
            (is_int(self.checkpoint_every, 1), f"checkpoint interval must be >= 1, got {self.checkpoint_every!r}"),
            (is_int(self.seed, 0, 2**32 - 1), f"seed must be in 0..{2**32 - 1}, got {self.seed!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.max_timestep is None or is_int(self.max_timestep, 1, self.diffusion_steps),
             f"max timestep must be in 1..{self.diffusion_steps} (the schedule's T)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.device not in AUTO:
            resolve_device(self.device)  # an unknown or absent device is refused before any image is read

    @property
    def state_path(self) -> str:
        return self.state or f"{self.out}.state.safetensors"

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def portable_args(self) -> dict:
        """Arguments recorded in checkpoints (everything but where files live)."""
        d = asdict(self)
        for k in ("out", "state", "resume", "device", "init_from"):
            d.pop(k)
        return d


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA warm-up: (1 + step) / (10 + step), capped at ``max_decay``, so short runs average few steps."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


class ReplicatedSampler:
    """Batch indices for step s: the (M x N)-long epoch order, reshuffled each epoch from (seed, epoch).

    The order is drawn on the CPU (the same on every device) and moved to ``device`` once per
    epoch; a batch is then one or two slices of it, with no host-to-device copy per step.
    """

    def __init__(self, n: int, replicate: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        self.n, self.epoch_len, self.batch_size, self.seed = n, n * replicate, batch_size, seed
        self.device = torch.device(device)
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (torch.randperm(self.epoch_len, generator=g) % self.n).to(self.device)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        pos, end, parts = step * self.batch_size, (step + 1) * self.batch_size, []
        while pos < end:  # a batch that crosses an epoch boundary takes the next epoch's first indices
            epoch, offset = divmod(pos, self.epoch_len)
            take = min(end - pos, self.epoch_len - offset)
            parts.append(self._order(epoch)[offset:offset + take])
            pos += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def train_step(model, ema, opt, diffusion: GaussianDiffusion, batch: torch.Tensor, autocast,
               ema_decay: float, max_timestep: int | None = None) -> torch.Tensor:
    """One optimizer step on a uint8 batch (N, 3, S, S) and the EMA update; returns the loss (on device).

    Timesteps are drawn uniformly from [0, max_timestep) (default: the whole schedule).
    """
    x = batch.float() / 127.5 - 1.0
    t = diffusion.sample_timesteps(len(x), x.device, high=max_timestep)
    with autocast:
        loss = diffusion.training_losses(model, x, t)["loss"].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    update_ema(ema, model, ema_decay)
    return loss.detach()


def _check_resume(meta: dict, cfg: TrainConfig, files_hash: str, path: str, init_sha: str | None) -> None:
    saved = meta.get("train_args", {})
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: cannot resume: its train_args is a JSON {type(saved).__name__}, not an object")
    # everything that shapes the run but iterations/checkpoint_every (which may grow) and source (hashed below);
    # AdamW's load_state_dict would silently bring back the saved lr and weight decay
    for key in ("preset", "image_size", "batch_size", "replicate", "seed", "diffusion_steps", "lr",
                "weight_decay", "ema_decay", "precision", "max_timestep", "init_from_sha256"):
        now = init_sha if key == "init_from_sha256" else getattr(cfg, key)
        if saved.get(key) != now and (key in saved or now is not None):
            raise CheckpointError(f"{path}: cannot resume: {key} was {saved.get(key)!r}, now {now!r}")
    if meta.get("train_files_sha256") != files_hash:
        raise CheckpointError(f"{path}: cannot resume: the training images differ from the saved run's")


def _init_weights(path: str, model, ema, diff_cfg: DiffusionConfig) -> str:
    """Copy an exported denoiser's weights into model and EMA (fine-tuning); return the file's sha256.

    The UNet and the schedule must be the ones this run trains: anything else is refused."""
    den = load_denoiser(path)
    if den.model.config != model.config:
        raise CheckpointError(f"{path}: cannot start from it: its UNet ({den.model.config}) is not the one "
                              f"requested ({model.config}); pass the same --preset and --image-size")
    if den.metadata.get("diffusion") != diff_cfg.to_dict():
        raise CheckpointError(f"{path}: cannot start from it: its schedule {den.metadata.get('diffusion')} is "
                              f"not this run's {diff_cfg.to_dict()} (see --diffusion-steps)")
    model.load_state_dict(den.model.state_dict())
    ema.load_state_dict(den.model.state_dict())
    log.info("starting from the weights of %s (sha256 %s)", path, den.sha256[:12])
    return den.sha256


def clean_class_spectra(source: str) -> ClassSpectra | None:
    """The sparse clean set's per-class power spectra, recorded in the denoiser for ``purify --deblur auto``:
    None (and a note in the log) for a folder of images or shards whose samples carry no class label."""
    if image_folder(source) is not None:
        log.info("class spectra not recorded: %s is a folder of images without labels (purify --deblur auto "
                 "will not deblur with this denoiser)", source)
        return None
    try:
        spectra = ClassSpectra.from_shards(source)
    except (EclipseError, ValueError) as e:
        log.info("class spectra not recorded (%s): purify --deblur auto will not deblur with this denoiser", e)
        return None
    if not spectra.spectra:
        log.info("class spectra not recorded: no sample of %s has a class label", source)
        return None
    log.info("recorded the power spectra of %d classes (purify --deblur auto)", len(spectra.spectra))
    return spectra


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) and export the EMA denoiser to ``cfg.out``; return a summary.

    The denoiser and the training state never land on or inside the training images, nor on ``init_from``
    (refused before anything is read); a loss or weights that become NaN/inf raise NumericalError, and nothing
    is written from that point on."""
    inputs = [cfg.source] + ([cfg.init_from] if cfg.init_from else [])
    local = check_output_files({"--out": cfg.out, "--state": cfg.state_path}, inputs, "train")
    cfg = replace(cfg, out=local["--out"], state=local["--state"] if cfg.state else None)  # file://
    device = cfg.resolved_device()
    data, files_hash = load_training_images(cfg.source, cfg.image_size)
    if len(data) < 1:
        raise InputError(f"{cfg.source}: no training images")
    log.info("training on %d images from %s (x%d replication)", len(data), cfg.source, cfg.replicate)
    spectra = clean_class_spectra(cfg.source)

    unet_cfg = preset_config(cfg.preset, cfg.image_size)
    diff_cfg = DiffusionConfig(steps=cfg.diffusion_steps)
    diffusion = GaussianDiffusion.from_config(diff_cfg)
    torch.manual_seed(cfg.seed)
    model = UNet(unet_cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    init_sha = _init_weights(cfg.init_from, model, ema, diff_cfg) if cfg.init_from else None
    start = 0
    state_path = cfg.state_path
    if cfg.resume:
        if not Path(state_path).is_file():
            raise CheckpointError(f"{state_path}: no training state to resume from")
        meta = load_train_state(state_path, model=model, ema=ema, optimizer=opt)
        _check_resume(meta, cfg, files_hash, state_path, init_sha)
        start = int(meta["step"])
        log.info("resumed from %s at step %d", state_path, start)
    if start >= cfg.iterations:
        raise InputError(f"{state_path}: already at step {start} >= --iterations {cfg.iterations}")

    data = data.to(device)
    sampler = ReplicatedSampler(len(data), cfg.replicate, cfg.batch_size, cfg.seed, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    args = {**cfg.portable_args(), **({"init_from_sha256": init_sha} if init_sha else {})}

    def checkpoint(step: int, loss: float | None):
        for what, net in (("weights", model), ("EMA weights", ema)):  # a NaN never reaches a file
            try:
                check_tensors(net.state_dict(), f"step {step}")
            except CheckpointError as e:
                raise NumericalError(f"training diverged: the {what} at {e}; nothing was written for this step "
                                     f"(the last checkpoint is kept); lower --lr or use --precision fp32") from None
        save_train_state(state_path, model=model, ema=ema, optimizer=opt, diffusion_config=diff_cfg,
                         step=step, train_args=args, train_files_sha256=files_hash)
        save_denoiser(cfg.out, ema, diff_cfg, train_args=args, train_files_sha256=files_hash, step=step,
                      extra={"train_images": len(data), "final_loss": loss,
                             "trained_timesteps": [0, cfg.max_timestep or cfg.diffusion_steps],
                             "final_loss_definition": f"mean hybrid loss over the last <= {LOSS_WINDOW} steps"},
                      class_spectra=spectra)

    model.train()
    window_sum, window_steps, last_loss = torch.zeros((), device=device), 0, None
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="train",
               unit="it", disable=not progress, dynamic_ncols=True)
    for step in bar:
        torch.manual_seed(cfg.seed * 1_000_003 + step + 1)  # timesteps, noise and dropout of this step
        batch = data[sampler.batch(step)]
        loss = train_step(model, ema, opt, diffusion, batch, autocast, ema_decay_at(step, cfg.ema_decay),
                          cfg.max_timestep)
        window_sum += loss
        window_steps += 1
        done = step + 1
        checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.iterations
        if window_steps == LOSS_WINDOW or checkpoint_now:  # one host sync per window, not per step
            last_loss = (window_sum / window_steps).item()
            window_sum.zero_()
            window_steps = 0
            if not math.isfinite(last_loss):
                raise NumericalError(f"training diverged: the loss became {last_loss} by step {done} (--lr "
                                     f"{cfg.lr}); nothing was written for these steps (the last checkpoint, if "
                                     "any, is kept); lower --lr or use --precision fp32")
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if checkpoint_now:
            checkpoint(done, last_loss)
    bar.close()
    return {"out": cfg.out, "state": state_path, "steps": cfg.iterations, "resumed_from": start,
            "images": len(data), "final_loss": last_loss,
            "parameters": model.num_parameters()}
