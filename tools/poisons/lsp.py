"""LSP: linearly separable synthetic perturbations (Yu et al., KDD 2022, "Availability
attacks create shortcuts").

As in the authors' code: sklearn's make_classification draws one 48-dimensional point
per image (3 channels x 4x4 patches, class_sep 10, one cluster per class), each point is
upsampled to 32x32 by repeating every value over an 8x8 patch, scaled to
L2 = sqrt(3072) * 6/255 (~1.30), and given to an image of the point's class.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_classification

from .base import LSP_L2, Budget, l2_normalize

BUDGET = Budget("l2", LSP_L2)


def synthetic_codes(counts: np.ndarray, patch: int, size: int, channels: int, seed: int):
    """Per-class lists of (size/patch)^2 * channels-dimensional separable points, at least counts[c] each."""
    grid = -(-size // patch)
    n_features = grid * grid * channels
    num_classes = len(counts)
    x, y = make_classification(n_samples=num_classes * int(counts.max()), n_features=n_features,
                               n_informative=n_features, n_redundant=0, n_repeated=0,
                               n_classes=num_classes, n_clusters_per_class=1, class_sep=10.0,
                               flip_y=0.0, random_state=seed)
    return x.reshape(-1, grid, grid, channels).astype(np.float32), y


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, num_classes: int = 10,
             patch: int = 8, eps: float = LSP_L2) -> np.ndarray:
    """Float NHWC delta: each image gets its own synthetic point of its class, patch-upsampled."""
    n, size, _, channels = images.shape
    counts = np.bincount(labels, minlength=num_classes)
    codes, code_labels = synthetic_codes(counts, patch, size, channels, seed)
    upsampled = np.repeat(np.repeat(codes, patch, axis=1), patch, axis=2)[:, :size, :size, :]
    delta = np.empty(images.shape, dtype=np.float32)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        delta[members] = upsampled[code_labels == c][:len(members)]
    return l2_normalize(delta, eps)
