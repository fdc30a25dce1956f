"""AR: autoregressive perturbations (Sandoval-Segura et al., NeurIPS 2022), L2 = 1.0.

Each class owns a 3-channel AR process: a 3x3 causal window per channel whose eight
coefficients sum to one (the current pixel's own entry is zero). A perturbation starts as
Gaussian noise on a 36x36 canvas; every pixel from row/column 2 on is then replaced by
the window's weighted sum of its already-generated neighbours; the 32x32 bottom-right
crop is scaled to the L2 budget. Processes are drawn as the authors' parameter finder
does: reject ones whose generated signal diverges (unscaled L-inf norm > 5 or NaN) and
keep one only if every already-kept process's matching filter responds strongly to its
L2-normalised signal (sum of ReLU(conv) >= 3), so the classes' patterns are mutually
distinguishable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import AR_L2, Budget

BUDGET = Budget("l2", AR_L2)
CANVAS, CROP, WINDOW = 36, 4, 3


def random_coefficients(rng: np.random.Generator) -> np.ndarray:
    """(3, 3, 3) coefficients: per channel, zero at the current pixel and summing to one."""
    b = rng.standard_normal((3, WINDOW, WINDOW))
    b[:, -1, -1] = 0.0
    return b / b.sum(axis=(1, 2), keepdims=True)


def ar_signals(coeffs: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Run per-sample AR processes over start canvases (N, 3, H, W), in float64; returns the full canvas."""
    x = start.clone()
    n, c, h, w = x.shape
    for i in range(h - WINDOW + 1):
        for j in range(w - WINDOW + 1):
            window = x[:, :, i:i + WINDOW, j:j + WINDOW]
            x[:, :, i + WINDOW - 1, j + WINDOW - 1] = (window * coeffs).sum(dim=(2, 3))
    return x


def _filter(b: np.ndarray) -> torch.Tensor:
    """The matching filter of a process: its coefficients with -1 at the current pixel (zero response)."""
    f = torch.tensor(b, dtype=torch.float64).clone()
    f[:, -1, -1] = -1.0
    return f.unsqueeze(0)


def find_processes(num_classes: int, seed: int, trials: int = 3, max_peak: float = 5.0,
                   min_response: float = 3.0, batch: int = 256, max_batches: int = 50) -> np.ndarray:
    """Greedy search for ``num_classes`` stable, mutually distinguishable AR processes.

    Candidates are drawn and run ``batch`` at a time (one vectorised AR pass), then
    accepted in draw order, so the search is deterministic for a seed and fast on CPU.
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    kept: list[np.ndarray] = []
    for _ in range(max_batches):
        cands = np.stack([random_coefficients(rng) for _ in range(batch)])
        coeffs = torch.tensor(cands).repeat_interleave(trials, dim=0)
        start = torch.randn((batch * trials, 3, CANVAS, CANVAS), generator=gen, dtype=torch.float64)
        signal = ar_signals(coeffs, start)[:, :, CROP:, CROP:].reshape(batch, trials, 3, CANVAS - CROP, -1)
        peaks = signal.flatten(2).abs().amax(dim=2)
        stable = (torch.isfinite(peaks) & (peaks <= max_peak)).all(dim=1)
        for i in torch.nonzero(stable).flatten().tolist():
            last = signal[i, -1:] / signal[i, -1].norm()
            if kept and min(F.relu(F.conv2d(last, _filter(k))).sum().item() for k in kept) < min_response:
                continue
            kept.append(cands[i])
            if len(kept) == num_classes:
                return np.stack(kept)
    raise RuntimeError(f"found only {len(kept)} of {num_classes} AR processes in {batch * max_batches} draws")


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, num_classes: int = 10,
             eps: float = AR_L2) -> np.ndarray:
    """Float NHWC delta: a fresh AR signal per image from its class's process, L2-scaled to ``eps``."""
    coeffs = torch.tensor(find_processes(num_classes, seed))
    gen = torch.Generator().manual_seed(seed + 1)
    start = torch.randn((len(labels), 3, CANVAS, CANVAS), generator=gen, dtype=torch.float64)
    signal = ar_signals(coeffs[torch.as_tensor(labels)], start)[:, :, CROP:, CROP:]
    signal = signal * (eps / signal.flatten(1).norm(dim=1).clamp_min(1e-12))[:, None, None, None]
    return signal.permute(0, 2, 3, 1).float().numpy()
