"""URP: one uniform random pattern per class (class-wise random noise), L-inf 8/255.

The same pattern on every image of a class is a shortcut a network learns instead of
the image content.
"""

from __future__ import annotations

import numpy as np

from .base import LINF_8, Budget

BUDGET = Budget("linf", LINF_8)


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, num_classes: int = 10,
             eps: float = LINF_8) -> np.ndarray:
    """Float NHWC delta: pattern[label], each pattern i.i.d. U(-eps, eps)."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(-eps, eps, size=(num_classes, *images.shape[1:])).astype(np.float32)
    return patterns[labels]
