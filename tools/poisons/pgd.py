"""Helpers for the optimisation-based poisons (EM, TAP, AAP, EntF, ...): L-inf PGD, device-resident data, state
files, and the reference-model trainer AAP and EntF share."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_stream.fsutil import atomic_path

from ..common import ToolError


class PoisonIncomplete(ToolError):
    """The time budget ran out; the state file holds the progress and a rerun resumes from it."""

    exit_code = 75  # EX_TEMPFAIL: try again


def descend(model, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float, step_size: float,
            steps: int, amp: bool) -> torch.Tensor:
    """Sign-gradient *descent* on CE(model(x + delta), y) inside the L-inf ball and the [0, 1] box.

    Error-minimising noise (EM) descends on the true label, targeted adversarial
    poisons (TAP) on the target label: both are this loop.
    """
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - step_size * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def to_device(images: np.ndarray, labels: np.ndarray, device: torch.device):
    """uint8 NHWC numpy -> float [0, 1] NCHW and int64 labels on the device (CIFAR fits in GPU memory)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(), torch.from_numpy(labels).to(device)


def to_numpy_delta(delta: torch.Tensor) -> np.ndarray:
    """NCHW float delta -> NHWC float32 numpy, the driver's convention."""
    return delta.permute(0, 2, 3, 1).float().cpu().numpy()


def save_state(path: Path | None, state: dict) -> None:
    """Atomic torch.save of resumable progress."""
    if path is None:
        return
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path | None, device: torch.device, signature: dict) -> dict | None:
    """Saved progress if it was made with the same settings, else None (a stale file is an error)."""
    if path is None or not Path(path).is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)  # tensors and plain containers only
    if state.get("signature") != signature:
        raise ToolError(f"{path} holds progress made with other settings; delete it to start over")
    return state


class Budget:
    """Wall-clock guard: ``over(next_cost)`` says whether another unit of work would pass the limit."""

    def __init__(self, max_seconds: float | None):
        self.t0, self.max_seconds = time.time(), max_seconds

    def over(self, next_cost: float) -> bool:
        return self.max_seconds is not None and time.time() - self.t0 + next_cost > self.max_seconds


def train_reference(x: torch.Tensor, y: torch.Tensor, *, name: str, arch: str, width: float, num_classes: int,
                    epochs: int, lr: float, batch_size: int, weight_decay: float, seed: int, amp: bool,
                    batch_input: Callable, log=print):
    """A reference model trained on the clean images, as AAP and EntF make theirs: ``arch`` seeded by ``seed``
    (the caller's global RNG left alone), SGD with momentum 0.9 and nesterov on a one-cycle schedule peaking at
    ``lr`` a quarter of the way in (the CPU victim's); each batch is first ``batch_input(model, xb, yb,
    generator)`` (an augmentation, an adversary; computed under the autocast of the update, which it may leave in
    eval mode), the update in train mode. Returned frozen in eval mode; its accuracy on the clean images is logged,
    since a model that did not learn would make a meaningless poison."""
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=num_classes, width=width).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=math.ceil(len(y) / batch_size), pct_start=0.25,
                                                anneal_strategy="linear")
    gen = torch.Generator(device=x.device).manual_seed(seed + 1)
    for epoch in range(epochs):
        order = torch.randperm(len(y), device=x.device, generator=gen)
        total, t0 = 0.0, time.time()
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                inputs = batch_input(model, x[idx], y[idx], gen)
                model.train()
                loss = F.cross_entropy(model(inputs), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"{name} reference model: epoch {epoch + 1}/{epochs} loss {total / len(y):.4f} ({time.time() - t0:.1f}s)")
    model.eval().requires_grad_(False)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        right = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(y), 500))
    log(f"{name} reference model: {100 * right / len(y):.2f}% on its clean training images")
    return model
