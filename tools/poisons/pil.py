"""PIL: perturbation-induced linearization (Liu, Chen & Zhang, ICLR 2026, arXiv 2601.19967).

Unlearnable examples made with nothing but a *linear* surrogate. A bias-free linear classifier (two stacked
bias-free linear maps, 3072 -> C -> C, as in the authors' model) is trained on the clean images; then every
image gets a noise ``n`` in the L-inf ball of eps, found by signed gradient descent on

    lam * CE(f(n), y) + (1 - lam) * KL(uniform || softmax(f(x - n)))

(the noise alone reads as the image's class: a shortcut; the image without it reads as no class at all: its
semantics obfuscated), and the poisoned image is ``x - n``. The paper's claim is that a deep victim trained on
such data behaves like a linear model, which is the mechanism it proposes behind unlearnable examples.

Why this family: it was added on 2026-12-07 (after the t* = 300 / stage-4 default was adopted and frozen) as a
family none of the defaults has seen, different in kind from the others here: its surrogate is linear, not a
network (EM, REM, TAP, SEP, HYP, UAP, UC) and not a hand-made pattern (URP, LSP, AR, OPS, CUDA). Settings are
the authors' (their README's command): eps 8/255, step eps/10, 30 steps, lam 0.9; the linear model 30 epochs of
SGD (lr 0.003, momentum 0.9, no weight decay, cosine schedule) on batches of 512. Written from the paper's
description and the authors' code, read, not copied. One difference: the authors iterate the training set in
its stored order; here the order is a seeded shuffle (our splits are stored class by class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import LINF_8, Budget

BUDGET = Budget("linf", LINF_8)


@dataclass(frozen=True)
class PILSettings:
    eps: float = LINF_8
    step_size: float = LINF_8 / 10
    steps: int = 30
    lam: float = 0.9                 # weight of the shortcut term; 1 - lam: the obfuscation term
    train_epochs: int = 30           # the linear surrogate's
    train_lr: float = 0.003
    momentum: float = 0.9
    batch_size: int = 512


class LinearSurrogate(nn.Module):
    """Two bias-free linear maps, flattened NCHW pixels in [0, 1] -> logits: a linear classifier."""

    def __init__(self, num_classes: int = 10, pixels: int = 3 * 32 * 32):
        super().__init__()
        self.fc1 = nn.Linear(pixels, num_classes, bias=False)
        self.fc2 = nn.Linear(num_classes, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x.flatten(1)))


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


def train_surrogate(x: torch.Tensor, y: torch.Tensor, num_classes: int, settings: PILSettings,
                    generator: torch.Generator) -> LinearSurrogate:
    """The linear classifier PIL crafts against, trained on clean images (cross-entropy, SGD, cosine lr)."""
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = LinearSurrogate(num_classes, x[0].numel())
    opt = torch.optim.SGD(model.parameters(), lr=settings.train_lr, momentum=settings.momentum, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.train_epochs)
    for _ in range(settings.train_epochs):
        for idx in torch.randperm(len(x), generator=generator).split(settings.batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def pil_loss(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * CE(f(noise), y) + (1 - lam) * KL(uniform || softmax(f(x - noise))), batch means."""
    shortcut = F.cross_entropy(model(noise), y)
    logp = F.log_softmax(model(x - noise), dim=1)
    k = logp.shape[1]
    obfuscation = (-(torch.log(torch.tensor(float(k))) + logp) / k).sum(1).mean()  # sum_c u (log u - log p_c)
    return lam * shortcut + (1 - lam) * obfuscation


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: PILSettings,
          generator: torch.Generator) -> torch.Tensor:
    """The noise n of every image (NCHW, |n| <= eps): signed descent on :func:`pil_loss` from U(-eps, eps)."""
    for p in model.parameters():
        p.requires_grad_(False)
    out = torch.empty_like(x)
    for idx in torch.arange(len(x)).split(settings.batch_size):
        xb, yb = x[idx], y[idx]
        noise = (torch.rand(xb.shape, generator=generator) * 2 - 1) * settings.eps
        for _ in range(settings.steps):
            noise.requires_grad_(True)
            grad, = torch.autograd.grad(pil_loss(model, xb, noise, yb, settings.lam), noise)
            noise = (noise.detach() - settings.step_size * grad.sign()).clamp(-settings.eps, settings.eps)
        out[idx] = noise.detach()
    return out


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, num_classes: int = 10,
             settings: PILSettings | None = None, log=print) -> np.ndarray:
    """Float NHWC delta (= -n: the poisoned image is x - n) for uint8 NHWC images; deterministic given seed."""
    settings = settings or PILSettings()
    generator = torch.Generator().manual_seed(seed)
    x, y = _tensor(images), torch.from_numpy(np.asarray(labels)).long()
    model = train_surrogate(x, y, num_classes, settings, generator)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    log(f"PIL: linear surrogate trained ({settings.train_epochs} epochs), {100 * acc:.1f}% on the clean images")
    noise = craft(model, x, y, settings, generator)
    return (-noise).permute(0, 2, 3, 1).numpy().astype(np.float32)
