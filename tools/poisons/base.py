"""Budgets, quantisation and norm measurement shared by every poison.

A poison is a perturbation added to the decoded clean pixels and stored as lossless
PNG, so what the victim sees is ``uint8(clean + delta)``. Rounding to uint8 could push
an L2 perturbation past its budget; :func:`quantize` therefore clips to the budget
*after* rounding (L-inf: clamp the integer difference; L2: shrink and round toward
zero, which can only lower every |difference|).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LINF_8 = 8 / 255
LSP_L2 = math.sqrt(3072) * 6 / 255   # Yu et al.: the L2 ball of an L-inf 6/255 box, ~1.304
AR_L2 = 1.0                          # Sandoval-Segura et al.


@dataclass(frozen=True)
class Budget:
    """A norm bound in [0, 1] pixel units; ``l0`` means a count of pixels with no magnitude bound."""

    norm: str   # "linf" | "l2" | "l0" | "none" (no magnitude bound: a transform such as CUDA's filtering)
    eps: float

    def to_dict(self) -> dict:
        return {"norm": self.norm, "eps": None if math.isinf(self.eps) else self.eps}  # JSON has no Infinity


def quantize(clean: np.ndarray, delta: np.ndarray, budget: Budget) -> np.ndarray:
    """uint8 poisoned images from uint8 clean NHWC images and a float delta, within ``budget``."""
    base = clean.astype(np.int32)
    target = np.clip(np.rint(base + delta.astype(np.float64) * 255.0), 0, 255).astype(np.int32)
    diff = target - base
    if budget.norm == "linf":
        bound = math.floor(budget.eps * 255 + 1e-6)
        diff = np.clip(diff, -bound, bound)
    elif budget.norm == "l2":
        norms = np.sqrt((diff.reshape(len(diff), -1).astype(np.float64) ** 2).sum(1)) / 255.0
        scale = np.minimum(1.0, budget.eps / np.maximum(norms, 1e-12))
        diff = np.trunc(diff * scale[:, None, None, None]).astype(np.int32)
    elif budget.norm not in ("l0", "none"):
        raise ValueError(f"unknown norm {budget.norm!r}")
    return (base + diff).astype(np.uint8)


def measure(clean: np.ndarray, poisoned: np.ndarray) -> dict:
    """Norms of the stored perturbation: L-inf in /255 units, L2 in [0, 1] units, L0 in pixels."""
    diff = poisoned.astype(np.int32) - clean.astype(np.int32)
    flat = diff.reshape(len(diff), -1)
    l2 = np.sqrt((flat.astype(np.float64) ** 2).sum(1)) / 255.0
    l0 = (np.abs(diff).max(axis=-1) > 0).reshape(len(diff), -1).sum(1)
    return {
        "images": int(len(diff)),
        "linf_max_255": int(np.abs(flat).max(initial=0)),
        "l2_mean": float(l2.mean()) if len(l2) else 0.0,
        "l2_max": float(l2.max(initial=0.0)),
        "l0_pixels_mean": float(l0.mean()) if len(l0) else 0.0,
        "l0_pixels_max": int(l0.max(initial=0)),
    }


def within(norms: dict, budget: Budget) -> bool:
    """Whether measured norms respect a budget (L0: pixels changed per image)."""
    if budget.norm == "linf":
        return norms["linf_max_255"] <= math.floor(budget.eps * 255 + 1e-6)
    if budget.norm == "l2":
        return norms["l2_max"] <= budget.eps + 1e-9
    if budget.norm == "none":
        return True
    return norms["l0_pixels_max"] <= budget.eps


def l2_normalize(delta: np.ndarray, eps: float) -> np.ndarray:
    """Scale each sample of a batch to L2 norm ``eps`` (the LSP/AR construction)."""
    norms = np.sqrt((delta.reshape(len(delta), -1).astype(np.float64) ** 2).sum(1))
    return (delta / np.maximum(norms, 1e-12)[:, None, None, None] * eps).astype(np.float32)


# The model-based generators (EM, REM, TAP, SEP, HYP, UAP, UC) run their models under bf16 autocast by default, on
# a CPU too (about 2x faster where the CPU has bf16 instructions). Where it has none (no AVX512-BF16/AMX, e.g. an
# AMD EPYC VM) torch emulates bf16 at ~10x the cost: "fp32" turns autocast off. The two make different sets (not the
# same bytes), so the choice is recorded in norms.json's options and a state file of one is not resumed by the other.
PRECISIONS = ("bf16", "fp32")


def autocast_on(device, precision: str) -> bool:
    """Whether a generator autocasts to bf16 on ``device`` at ``precision`` (bf16 | fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision == "bf16" and device.type in ("cuda", "cpu")


def signed(signature: dict, precision: str) -> dict:
    """A state file's resume signature with the precision in it; bf16 (what every state file made before the choice
    existed used) adds nothing, so those still resume."""
    return signature if precision == "bf16" else {**signature, "precision": precision}
