"""HYP: class-wise universal hypocritical perturbations (Tao, Feng, Yi, Huang & Chen, NeurIPS 2021, "Better
Safe than Sorry: Preventing Delusive Adversaries with Adversarial Training", their attack P4).

A model is trained on the clean data (the "crafting model"). For each class c one *universal* perturbation
delta_c is found that makes the model more confident in c on images of every class: ``steps`` of normalised
gradient *descent* on CE(f(x + delta_c), c), over seeded mini-batches drawn from the whole set, from zero,
projected onto the L2 ball of radius ``eps`` (0.5 in [0, 1] pixel units, the paper's CIFAR-10 budget) and with
x + delta_c kept in [0, 1]. Every image of class c then carries delta_c. The poison is class-wise (one pattern
per class, like URP, LSP and AR) but adversarially shaped: it is the features the crafting model already takes
as evidence for the class, amplified. The paper reports 23.69% for standard training on its P4 set (CIFAR-10,
VGG16 crafting model, 500 steps of batch 256 per class); the CPU protocol uses fewer, smaller batches and its
own victim as the crafting model (``tools/grid.py``).

Why this family for issue 19: none of the defaults, nor the opt-in stages, were chosen looking at it; it was
added after the JPEG term became the default (docs/evaluation.md), as the held-out family. It is neither
sample-wise adversarial (TAP, SEP, EM) nor random or hand-shaped class-wise noise (URP, LSP, AR, OPS), nor a
filter (CUDA): a class-wise pattern optimised against a clean model, bounded in L2 rather than L-inf.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_stream.devices import resolve_device

from .base import Budget, autocast_on, signed
from .pgd import Budget as TimeBudget
from .pgd import PoisonIncomplete, load_state, save_state, to_device, to_numpy_delta

HYP_L2 = 0.5
BUDGET = Budget("l2", HYP_L2)


@dataclass(frozen=True)
class HYPSettings:
    eps: float = HYP_L2
    step_size: float = HYP_L2 / 5  # the paper's eps / 5
    steps: int = 500               # per class (the paper: 5 x its 100 PGD steps)
    batch_size: int = 256


def _project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * (eps / norm).clamp(max=1.0)


def universal_delta(model, x: torch.Tensor, target: int, settings: HYPSettings, generator: torch.Generator,
                    amp: bool) -> torch.Tensor:
    """One (1, C, H, W) perturbation that lowers CE(model(x + delta), target) over seeded batches of ``x``."""
    s = settings
    delta = torch.zeros((1, *x.shape[1:]), device=x.device)
    labels = torch.full((s.batch_size,), target, device=x.device, dtype=torch.long)
    for _ in range(s.steps):
        idx = torch.randint(len(x), (min(s.batch_size, len(x)),), device=x.device, generator=generator)
        delta = delta.detach().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model((x[idx] + delta).clamp(0, 1)), labels[:len(idx)])
        (grad,) = torch.autograd.grad(loss, delta)
        step = grad / grad.flatten().norm().clamp_min(1e-12)
        delta = _project_l2(delta.detach() - s.step_size * step, s.eps)
    return delta.detach()


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, device: str | None = None,
             surrogate=None, settings: HYPSettings = HYPSettings(), num_classes: int = 10,
             state_path: Path | None = None, max_seconds: float | None = None, log=print,
             targets: np.ndarray | None = None, kind: str = "hyp", precision: str = "bf16") -> np.ndarray:
    """Float NHWC delta: image i gets its class's universal perturbation, made toward ``targets[class]`` (the
    class itself by default: hypocritical; ``tools.poisons.uap`` passes a derangement). Each finished class is
    saved to ``state_path``, so a run stopped by ``max_seconds`` resumes at the next class."""
    name = kind.upper()
    if surrogate is None:
        raise ValueError(f"{name} needs a crafting model trained on clean data")
    targets = np.arange(num_classes) if targets is None else np.asarray(targets)
    device = resolve_device(device)
    amp = autocast_on(device, precision)  # bf16 autocast, as TAP and EM
    model = surrogate.to(device).eval().requires_grad_(False)
    x, y = to_device(images, labels, device)
    signature = signed({"kind": kind, "seed": seed, "n": len(y), "settings": asdict(settings),
                        "targets": targets.tolist()}, precision)
    state = load_state(state_path, device, signature)
    deltas = [] if state is None else list(state["deltas"].float().unbind(0))
    if deltas:
        log(f"{name}: resumed at class {len(deltas)}")
    clock, class_cost = TimeBudget(max_seconds), 0.0
    for c in range(len(deltas), num_classes):
        if class_cost and clock.over(class_cost):  # at least one class per call
            raise PoisonIncomplete(f"{name} stopped at class {c}/{num_classes} (time budget); rerun to resume")
        t = time.time()
        # a generator per class, seeded from (seed, class): a resumed run draws the same batches
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + c)
        deltas.append(universal_delta(model, x, int(targets[c]), settings, gen, amp)[0])
        class_cost = time.time() - t
        save_state(state_path, {"signature": signature, "deltas": torch.stack(deltas).cpu()})
        log(f"{name}: class {c} done (L2 {deltas[-1].flatten().norm():.3f}, {class_cost:.0f} s)")
    per_class = torch.stack(deltas).to(device)
    delta = (x + per_class[y]).clamp(0, 1) - x  # what each stored image actually carries
    return to_numpy_delta(delta)
