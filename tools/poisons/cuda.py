"""CUDA: convolution-based unlearnable datasets (Sadasivan, Soltanolkotabi & Feizi, CVPR 2023).

Every image of class c is filtered by that class's random 3x3 kernel, as in the authors'
algorithm (their ``get_filter_unlearnable``): with numpy's legacy generator seeded once, each
class draws a 3 x 1 x 3 x 3 depthwise kernel with weights U(0, blur_parameter), sets one random
tap of the first channel's kernel to ``center_parameter`` (1.0), and copies that kernel to all
three channels (the draws for channels 1 and 2 are made and discarded, which keeps the authors'
random sequence). The image in [0, 1] is cross-correlated with it (zero padding 1, no bias),
divided by its own maximum, scaled to 0..255, clipped and truncated to uint8 (``astype``).

There is no norm bound (``BUDGET`` is ``none``): the poison multiplies the spectrum instead of
adding a small perturbation. ``blur_parameter`` 0.3 is the paper's default for CIFAR-10; 0.1 and
0.5 are its weaker and stronger settings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Budget

BUDGET = Budget("none", float("inf"))
BLUR_PARAMETERS = (0.1, 0.3, 0.5)


def class_kernels(num_classes: int, seed: int, blur_parameter: float = 0.3,
                  center_parameter: float = 1.0, kernel_size: int = 3) -> np.ndarray:
    """(num_classes, 3, 1, k, k) float64 depthwise kernels, drawn in the authors' order."""
    rng = np.random.RandomState(seed)  # the authors seed numpy's global legacy generator
    kernels = []
    for _ in range(num_classes):
        w = rng.uniform(low=0, high=blur_parameter, size=(3, 1, kernel_size, kernel_size))
        r, c = rng.randint(kernel_size), rng.randint(kernel_size)
        w[0, 0, r, c] = center_parameter
        w[1] = w[0]
        w[2] = w[0]
        kernels.append(w)
    return np.stack(kernels)


def convolve(images: np.ndarray, kernels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 NHWC images filtered by their class's kernel, normalised by each image's maximum, truncated."""
    out = np.empty_like(images)
    pad = kernels.shape[-1] // 2
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        x = torch.from_numpy(images[members]).permute(0, 3, 1, 2).double() / 255.0
        y = F.conv2d(x, torch.from_numpy(kernels[c]), padding=pad, groups=3)
        peak = y.amax(dim=(1, 2, 3), keepdim=True)
        y = torch.where(peak > 0, y / peak.clamp_min(1e-12), y)  # an all-black image stays black
        y = (y * 255.0).clamp(0, 255).floor()  # the authors' clip then astype(uint8): truncation
        out[members] = y.permute(0, 2, 3, 1).to(torch.uint8).numpy()
    return out


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, num_classes: int = 10,
             blur_parameter: float = 0.3, kernel_size: int = 3) -> np.ndarray:
    """Float NHWC delta (poisoned - clean, in [0, 1] units) that turns each image into its CUDA version.
    ``kernel_size`` (odd; the authors' parameter, 3 in their CIFAR-10 results) gives the 5x5 variant."""
    if blur_parameter <= 0:
        raise ValueError(f"blur_parameter must be positive, got {blur_parameter}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    poisoned = convolve(images, class_kernels(num_classes, seed, blur_parameter, kernel_size=kernel_size), labels)
    return (poisoned.astype(np.float64) - images.astype(np.float64)) / 255.0
