"""CIFAR ResNet18 (3x3 stem, no max-pool), the victim and surrogate model of the paper's Table 1.

torchvision's resnet18 hard-codes 64..512 channels; the ``width`` multiplier here lets
CPU tests train a narrow copy of the same architecture. The model takes images in
[0, 1] and normalises inside, so attacks and defenses work in pixel units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """Four stages of two BasicBlocks; widths 64, 128, 256, 512 times ``width``."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        widths = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet18:
    return ResNet18(num_classes, width)


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The small ResNet of the fast-CIFAR line (Page's DAWNBench entry): prep conv, three pooled stages
    (the first and last with a residual pair), global max-pool, linear head; widths 64, 128, 256, 512
    times ``width``. The CPU protocol's victim: far fewer layers than ResNet18 at the same accuracy per
    FLOP, so a 10,000-image training set fits in about a minute on two cores."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = [max(4, int(round(ch * width))) for ch in (64, 128, 256, 512)]
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.features = nn.Sequential(
            _conv_bn(3, c[0]),
            _conv_bn(c[0], c[1], pool=True), _Residual(c[1]),
            _conv_bn(c[1], c[2], pool=True),
            _conv_bn(c[2], c[3], pool=True), _Residual(c[3]),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c[3], num_classes)

    def forward(self, x):
        return self.fc(self.features((x - self.mean) / self.std))


ARCHS = {"resnet18": ResNet18, "resnet9": ResNet9}


def build_model(arch: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown victim architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes, width)
