"""Victim training: the model whose test accuracy Tables 1 and 3 report.

Two recipes share one loop:

* ``reference`` -- the ECLIPSE reference evaluation: CIFAR ResNet18, SGD lr 0.1,
  momentum 0.9, batch 128, 80 epochs, no weight decay, constant lr, random crop 32
  (pad 4) + horizontal flip done per image by torchvision in a DataLoader.
* ``fast`` -- for filling a whole grid on one GPU: the data sit on the GPU as uint8,
  crop/flip are done there per batch, bf16 autocast, channels_last, one-cycle lr,
  label smoothing, nesterov SGD with weight decay, batch 512, few epochs. Its accuracies
  are only comparable to the paper once calibrated against ``reference`` on a GPU.

Training-time defenses (the package's RandomCorruption) act on float [0, 1] batches
after crop and flip, on the training device. A checkpoint is written after every epoch
so a run cut short (10-minute calls) continues with ``resume``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from eclipse_stream.devices import resolve_device
from eclipse_stream.fsutil import atomic_path

from .common import ToolError, provenance, read_split
from .defenses import Defense, apply_once, get_defense, training_corruption
from .models import build_model


@dataclass(frozen=True)
class Recipe:
    """Optimisation hyper-parameters; stored with every result."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"   # "constant" | "onecycle"
    label_smoothing: float = 0.0
    gpu_data: bool = False        # data and augmentation on the training device
    amp_bf16: bool = False        # bf16 autocast (CUDA; on the CPU too when ``cpu_fast``)
    channels_last: bool = False   # (CUDA; on the CPU too when ``cpu_fast``)
    cpu_fast: bool = False        # bf16 + channels_last also on the CPU (oneDNN: ~2x faster there)
    arch: str = "resnet18"        # tools.models.ARCHS
    width: float | None = None    # default channel multiplier of the recipe's model (None: 1.0)


RECIPES = {
    "reference": Recipe("reference", epochs=80, batch_size=128, lr=0.1),
    # Fast-CIFAR style settings (one-cycle, label smoothing, wd 5e-4); needs GPU calibration.
    "fast": Recipe("fast", epochs=16, batch_size=512, lr=0.4, weight_decay=5e-4, nesterov=True,
                   schedule="onecycle", label_smoothing=0.1, gpu_data=True, amp_bf16=True, channels_last=True),
    # The CPU protocol's victim (docs/evaluation.md): a quarter-width ResNet-9, one-cycle, bf16 and
    # channels_last on the CPU; about a minute for 10,000 images on two cores.
    "cpu": Recipe("cpu", epochs=15, batch_size=256, lr=0.2, weight_decay=5e-4, nesterov=True,
                  schedule="onecycle", label_smoothing=0.1, gpu_data=True, amp_bf16=True, channels_last=True,
                  cpu_fast=True, arch="resnet9", width=0.25),
}


@dataclass
class VictimConfig:
    """Everything that decides a victim run (settings are recorded with the accuracy)."""

    train: str
    test: str | None   # None: train only (e.g. a TAP surrogate), no accuracy
    recipe: str = "reference"
    defense: str = "none"
    epochs: int | None = None
    batch_size: int | None = None
    width: float | None = None   # None: the recipe's width (1.0 unless the recipe fixes one)
    device: str = "auto"
    seed: int = 0
    limit: int | None = None
    workers: int | None = None
    checkpoint: str | None = None
    resume: bool = False
    max_seconds: float | None = None
    compile: bool = False
    snapshot_epochs: tuple[int, ...] = ()  # also keep the checkpoint of these epochs (SEP's self-ensemble)
    # "fp32" turns the recipe's bf16 autocast off: on a CPU without native bf16 (no AVX512-BF16/AMX, e.g. an AMD
    # EPYC VM) the CPU recipe's bf16 is emulated and ~10x slower. Recorded in the result's recipe (amp_bf16);
    # cells of the two precisions are not comparable to the digit. None: the recipe's.
    precision: str | None = None

    def resolved_recipe(self) -> Recipe:
        if self.recipe not in RECIPES:
            raise ToolError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.recipe]
        if self.epochs is not None:
            recipe = replace(recipe, epochs=self.epochs)
        if self.batch_size is not None:
            recipe = replace(recipe, batch_size=self.batch_size)
        if self.precision not in (None, "bf16", "fp32"):
            raise ToolError(f"precision must be bf16 or fp32, not {self.precision!r}")
        if self.precision is not None:
            recipe = replace(recipe, amp_bf16=self.precision == "bf16")
        return recipe


def load_labeled(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images and int64 labels from a shard folder/file or an FFCV ``.beton``."""
    path = Path(path)
    if path.suffix == ".beton":
        return _load_beton(path)
    _, images, labels = read_split(path)
    return images, labels


def _load_beton(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a raw-RGB .beton in file order; ffcv is imported only when one is used.

    One ffcv worker: raw RGB needs no decoding, and with more, ffcv's numba/OpenMP
    threads keep spinning after the read and slow every later torch op many times over.
    """
    if not path.is_file():
        raise ToolError(f"no such .beton file: {path}")
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=1024, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = zip(*((np.array(x), np.array(y).reshape(-1)) for x, y in loader))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def balanced_subset(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit // classes`` samples of each class (all when no limit)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = max(1, limit // len(classes))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes]))


class _AugmentedImages(Dataset):
    """Per-image torchvision crop+flip on uint8 CHW tensors, as the reference pipeline does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def reference_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, epoch_seed: int,
                      workers: int, pin_memory: bool = False):
    """One epoch of shuffled, per-image augmented uint8 batches through a DataLoader.

    The epoch's generator fixes the order and, through the per-worker seeds DataLoader
    derives from it, the augmentation: an epoch replays identically after a resume.
    """
    generator = torch.Generator().manual_seed(epoch_seed)
    drop_last = len(labels) % batch_size == 1  # a batch of one would break BatchNorm
    loader = DataLoader(_AugmentedImages(images, labels), batch_size=batch_size, shuffle=True,
                        generator=generator, num_workers=workers, drop_last=drop_last, pin_memory=pin_memory)
    if not workers:
        torch.manual_seed(epoch_seed)  # the transforms draw from the global generator in-process
    yield from loader


def gpu_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded batch plus a random horizontal flip, per image, on device.

    Same distribution as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip,
    without a Python call per image.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    picked_rows = padded.gather(2, rows.expand(n, c, h, w + 2 * pad))
    out = picked_rows.gather(3, cols.expand(n, c, h, w))
    flip = torch.rand(n, device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def fast_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, epoch_seed: int):
    """One epoch of device-side shuffled, cropped and flipped uint8 batches (drop_last keeps shapes fixed)."""
    generator = torch.Generator(device=images.device).manual_seed(epoch_seed)
    order = torch.randperm(len(labels), device=images.device, generator=generator)
    usable = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
    for start in range(0, usable, batch_size):
        idx = order[start:start + batch_size]
        yield gpu_crop_flip(images[idx], generator), labels[idx]


def evaluate(model, images: torch.Tensor, labels: torch.Tensor, device, amp: bool, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent (the paper's unit) on uint8 NCHW test images."""
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum().item()
    return 100.0 * correct / len(labels)


def _make_optimizer(model, recipe: Recipe, steps_per_epoch: int):
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    if recipe.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, epochs=recipe.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.25,
                                                    anneal_strategy="linear")
    elif recipe.schedule == "constant":
        sched = None
    else:
        raise ToolError(f"unknown lr schedule {recipe.schedule!r}")
    return opt, sched


def run_width(cfg: VictimConfig, recipe: Recipe) -> float:
    """The run's ``--width`` when given, else the recipe's default (1.0 unless the recipe names one)."""
    if cfg.width is not None:
        return cfg.width
    return recipe.width if recipe.width is not None else 1.0


def _signature(cfg: VictimConfig, recipe: Recipe, defense: Defense) -> dict:
    """What must match for a checkpoint to be resumed (data, model, recipe, defense, seed)."""
    return {"train": str(Path(cfg.train).resolve()), "recipe": asdict(recipe), "defense": defense.name,
            "width": run_width(cfg, recipe), "seed": cfg.seed, "limit": cfg.limit}


def snapshot_path(checkpoint: str | Path, epoch: int) -> Path:
    """Where ``snapshot_epochs`` keeps the checkpoint of one epoch: ``<name>.epoch<E>.pt`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.epoch{epoch}{checkpoint.suffix}")


def _save(path: Path, state: dict) -> None:
    """Atomic checkpoint: a call killed mid-write leaves the previous epoch intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def prepare_data(cfg: VictimConfig, defense: Defense):
    """Load, subset and apply the once-only parts of the defense; returns uint8 NCHW tensors."""
    train_x, train_y = load_labeled(cfg.train)
    keep = balanced_subset(train_y, cfg.limit)
    train_x = apply_once(defense.train_once, train_x[keep])
    if cfg.test is None:
        test_x, test_y = train_x[:0], train_y[:0]
    else:
        test_x, test_y = load_labeled(cfg.test)
        test_x = apply_once(defense.test_once, test_x)

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()

    return nchw(train_x), torch.from_numpy(train_y[keep]), nchw(test_x), torch.from_numpy(test_y)


@dataclass
class _Run:
    """Everything one training run carries between epochs (and into its checkpoint)."""

    cfg: VictimConfig
    recipe: Recipe
    defense: Defense
    device: torch.device
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    signature: dict
    epoch: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def fast_device(self) -> bool:
        """Whether the recipe's bf16 / channels_last settings apply on this device."""
        return self.cuda or self.recipe.cpu_fast

    @property
    def amp(self) -> bool:
        return self.recipe.amp_bf16 and self.fast_device

    def state(self) -> dict:
        return {"signature": self.signature, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "epoch": self.epoch, "history": self.history, "seconds": self.seconds}

    def restore(self, path: Path, log) -> None:
        """Continue from a checkpoint written by the same settings (anything else is refused)."""
        state = torch.load(path, map_location=self.device, weights_only=True)  # tensors and plain containers only
        if state["signature"] != self.signature:
            raise ToolError(f"checkpoint {path} was made with other settings; delete it or drop --resume")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.history, self.seconds = state["epoch"], state["history"], state["seconds"]
        log(f"resumed {path} at epoch {self.epoch}/{self.recipe.epochs}")


def _start(cfg: VictimConfig, n_train: int, log) -> _Run:
    """Model, optimiser and schedule for a run, restored from its checkpoint when resuming."""
    recipe, defense, device = cfg.resolved_recipe(), get_defense(cfg.defense), resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    steps_per_epoch = (n_train // recipe.batch_size if recipe.gpu_data and n_train >= recipe.batch_size
                       else math.ceil(n_train / recipe.batch_size))
    torch.manual_seed(cfg.seed)
    model = build_model(recipe.arch, width=run_width(cfg, recipe)).to(device)
    if recipe.channels_last and (device.type == "cuda" or recipe.cpu_fast):
        model = model.to(memory_format=torch.channels_last)
    opt, sched = _make_optimizer(model, recipe, steps_per_epoch)
    run = _Run(cfg, recipe, defense, device, model, opt, sched, _signature(cfg, recipe, defense))
    if cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).is_file():
        run.restore(Path(cfg.checkpoint), log)
    return run


def _train_epoch(run: _Run, step_model, batches, corruption, criterion) -> float:
    """One pass over the batches; returns the mean training loss."""
    run.model.train()
    loss_sum, seen = 0.0, 0
    for x, y in batches:
        x = x.to(run.device, non_blocking=True).float().div_(255)
        y = y.to(run.device, non_blocking=True)
        if corruption is not None:
            x = corruption(x)
        if run.recipe.channels_last and run.fast_device:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            loss = criterion(step_model(x), y)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        if run.sched is not None:
            run.sched.step()
        loss_sum += loss.detach().float() * len(y)
        seen += len(y)
    return float(loss_sum) / max(seen, 1)


def train_victim(cfg: VictimConfig, log=print) -> dict:
    """Train (or resume) one victim and return its result record; ``complete`` is False if time ran out."""
    t0 = time.time()
    defense = get_defense(cfg.defense)
    corruption = training_corruption(defense)
    train_x, train_y, test_x, test_y = prepare_data(cfg, defense)
    run = _start(cfg, len(train_y), log)
    if corruption is not None:
        corruption = corruption.to(run.device)
    if run.recipe.gpu_data:
        train_x, train_y = train_x.to(run.device), train_y.to(run.device)
    workers = cfg.workers if cfg.workers is not None else (min(8, os.cpu_count() or 1) if run.cuda else 0)
    step_model = torch.compile(run.model) if cfg.compile else run.model
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=run.recipe.label_smoothing)
    bs = run.recipe.batch_size

    complete = True
    while run.epoch < run.recipe.epochs:
        e0, epoch_seed = time.time(), cfg.seed * 100_003 + run.epoch
        torch.manual_seed(epoch_seed)  # fresh, reproducible corruption noise for this epoch
        batches = (fast_batches(train_x, train_y, bs, epoch_seed) if run.recipe.gpu_data
                   else reference_batches(train_x, train_y, bs, epoch_seed, workers, pin_memory=run.cuda))
        loss = _train_epoch(run, step_model, batches, corruption, criterion)
        epoch_seconds = time.time() - e0
        run.epoch, run.seconds = run.epoch + 1, run.seconds + epoch_seconds
        run.history.append({"epoch": run.epoch, "train_loss": loss, "seconds": round(epoch_seconds, 3)})
        log(f"epoch {run.epoch}/{run.recipe.epochs} loss {loss:.4f} ({epoch_seconds:.1f}s)")
        if cfg.checkpoint:
            _save(Path(cfg.checkpoint), run.state())
            if run.epoch in cfg.snapshot_epochs:
                _save(snapshot_path(cfg.checkpoint, run.epoch), run.state())
        if (run.epoch < run.recipe.epochs and cfg.max_seconds is not None
                and time.time() - t0 + epoch_seconds > cfg.max_seconds):
            complete = False
            log(f"stopping after epoch {run.epoch}: the time budget ({cfg.max_seconds:.0f}s) would run out; "
                "rerun with resume to continue")
            break
    return _result(run, complete, test_x, test_y, len(train_y), t0, log)


def _result(run: _Run, complete: bool, test_x, test_y, n_train: int, t0: float, log) -> dict:
    """The record a results file keeps: accuracy (when complete), all settings and provenance."""
    cfg = run.cfg
    result = {
        "complete": complete,
        "epochs_done": len(run.history),
        "settings": {"train": str(cfg.train), "test": cfg.test and str(cfg.test), "defense": run.defense.to_dict(),
                     "recipe": asdict(run.recipe), "width": run_width(cfg, run.recipe), "seed": cfg.seed,
                     "limit": cfg.limit,
                     "train_images": int(n_train), "test_images": int(len(test_y)),
                     "device": str(run.device), "compile": cfg.compile},
        "train_seconds": round(run.seconds, 2),
        "history": run.history,
        **provenance(run.device),
    }
    if complete and len(test_y):
        result["test_accuracy"] = round(evaluate(run.model, test_x, test_y, run.device, run.amp), 2)
        log(f"test accuracy {result['test_accuracy']:.2f}%")
    result["seconds"] = round(time.time() - t0, 2)
    return result
