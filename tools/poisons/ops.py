"""OPS: one-pixel shortcut (Wu et al., ICLR 2023): one pixel position and colour per class.

Per class, every position and every "extreme" colour (each channel 0 or 1) is scored by
how far the colour is from the class's own pixels there, relative to how much that
distance varies over the class (mean / std of the per-image L1 distance): the chosen
pixel changes all images of the class a lot and consistently. Every image of the class
then has that pixel set to that colour. The budget is L0 = 1 pixel (no magnitude bound).
"""

from __future__ import annotations

import itertools

import numpy as np

from .base import Budget

BUDGET = Budget("l0", 1)
COLORS = np.array(list(itertools.product((0.0, 1.0), repeat=3)), dtype=np.float32)


def search(class_images: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(row, col, colour) maximising mean/std of the L1 colour change over a class's images."""
    x = class_images.astype(np.float32) / 255.0
    best = (-np.inf, 0, 0, COLORS[0])
    for color in COLORS:
        dist = np.abs(x - color).sum(axis=-1)                 # (n, H, W)
        score = dist.mean(0) / (dist.std(0) + 1e-3)
        r, c = np.unravel_index(np.argmax(score), score.shape)
        if score[r, c] > best[0]:
            best = (score[r, c], int(r), int(c), color)
    return best[1], best[2], best[3]


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, num_classes: int = 10) -> np.ndarray:
    """Float NHWC delta that sets each image's class pixel to the class colour (seed unused: deterministic)."""
    delta = np.zeros(images.shape, dtype=np.float32)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        r, col, color = search(images[members])
        delta[members, r, col, :] = color - images[members, r, col, :].astype(np.float32) / 255.0
    return delta
