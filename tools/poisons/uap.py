"""UAP: class-wise universal adversarial (targeted) perturbations (Tao, Feng, Yi, Huang & Chen, NeurIPS 2021,
"Better Safe than Sorry", their attack P3).

As HYP (``tools.poisons.hyp``: a clean-trained crafting model, one universal L2-0.5 perturbation per class found
by normalised gradient descent over batches of the whole set), but the perturbation carried by class c is made
toward *another* class, pi(c), for a seeded derangement pi (the paper uses c + 1 mod 10): the images of a class
carry features the model reads as a different class, the universal, class-wise counterpart of TAP. The paper
reports 15.14% for standard training on its P3 set (CIFAR-10).

Why this family: it was added (2026-12-06) after the JPEG term became the default and after the (20, 60)
candidate was measured, with no defended cell run on it that day, to be the held-out check of the next default
change; its crafting model is its own (the CPU victim, seed 2).
"""

from __future__ import annotations

import numpy as np

from .base import Budget
from .hyp import HYP_L2, HYPSettings
from .hyp import generate as _universal
from .tap import derangement

BUDGET = Budget("l2", HYP_L2)
__all__ = ["BUDGET", "HYPSettings", "generate"]  # settings: HYP's (the driver reads module.HYPSettings)


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, num_classes: int = 10, **kwargs) -> np.ndarray:
    """Float NHWC delta: class c's images carry a universal perturbation toward class derangement(seed)[c]."""
    return _universal(images, labels, seed=seed, num_classes=num_classes, targets=derangement(num_classes, seed),
                      kind="uap", **kwargs)
