"""Helpers for the optimisation-based poisons (EM, TAP): L-inf PGD and device-resident data."""

from __future__ import annotations

import time
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
