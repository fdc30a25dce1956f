"""EntF: entangled features (Wen, Zhao, Liu, Backes, Wang & Zhang, ICLR 2023, "Is adversarial training really a
silver bullet for mitigating data poisoning?").

An availability poison made to survive adversarial training: it works in the penultimate-layer feature space of
an *adversarially trained* reference model, whose features are the robust ones an adversarially trained victim
would learn, and entangles the classes there. With mu_c the mean feature of the clean training images of class c
under the reference model (eval mode), each training image x of class y gets an L-inf 8/255 delta that

- EntF-push (``variant="push"``, the default): pushes its feature away from its own class centroid,
  maximising ||f(x + delta) - mu_y||^2;
- EntF-pull (``variant="pull"``): pulls its feature toward the centroid of the class nearest to its own,
  minimising ||f(x + delta) - mu_c'||^2, c' = argmin_{c != y} ||mu_y - mu_c|| (fixed once, from the centroids).

Why this family: added on 2026-12-08, after the luma-only JPEG term of the training-time corruption was adopted
and frozen; held out (``tools/families.py``). Written from the paper's description, read, not copied from code.
The objectives, the reference model being adversarially trained (PGD adversarial training, Madry et al.) on the
clean training images and the 8/255 budget are the paper's. Our reading of the paper (settings it may not state):
the reference model's adversary (radius 4/255, the image kept in [0, 1], a uniform random start, the model in eval
mode while the adversarial batch is crafted and in train mode for the update, a random 4-pixel crop and flip of
each clean image first, as standard CIFAR adversarial training does), its optimiser (SGD, momentum 0.9, nesterov,
the CPU victim's one-cycle schedule, as AAP's reference model), the attack (projected sign-gradient ascent for
push, descent for pull, from zero with no random start, 2.5 eps / steps a step, the image clamped to [0, 1]) and
the full-scale defaults below (a ResNet18 trained 40 epochs, batch 128, lr 0.1, weight decay 5e-4, with 10 PGD
steps of 1/255; 250 attack steps). The CPU protocol (``tools/grid.py``) makes it against its own victim
architecture (quarter-width ResNet-9) adversarially trained 15 epochs (3 PGD steps of 2/255 within 4/255), with 100
attack steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from eclipse_stream.devices import resolve_device

from ..models import build_model
from .base import LINF_8, Budget, autocast_on, signed
from .pgd import Budget as TimeBudget
from .pgd import PoisonIncomplete, load_state, save_state, to_device, to_numpy_delta
from .pgd import train_reference as train_reference_model
from .rem import attack as pgd_ascent
from .rem import augment
from .uc import features

BUDGET = Budget("linf", LINF_8)
VARIANTS = ("push", "pull")


@dataclass(frozen=True)
class EntFSettings:
    eps: float = LINF_8
    variant: str = "push"             # push (from the own class centroid) | pull (toward the nearest other one)
    steps: int = 250
    step_factor: float = 2.5          # step size = step_factor * eps / steps
    arch: str = "resnet18"            # the reference model (tools.models.ARCHS)
    width: float = 1.0
    train_epochs: int = 40
    train_lr: float = 0.1
    train_batch_size: int = 128
    weight_decay: float = 5e-4
    adv_eps: float = 4 / 255          # the reference model's adversarial training: PGD radius,
    adv_step_size: float = 1 / 255    # step size
    adv_steps: int = 10               # and steps (from a uniform random start)
    batch_size: int = 512             # images attacked at once

    @property
    def step_size(self) -> float:
        return self.step_factor * self.eps / self.steps


def adversarial_batch(model, x: torch.Tensor, y: torch.Tensor, settings: EntFSettings, amp: bool,
                      generator: torch.Generator) -> torch.Tensor:
    """The adversarial training's inner maximisation: PGD on CE within ``adv_eps`` of ``x`` (and in [0, 1]) from a
    uniform random start, the model put in eval mode (its batch-norm statistics fixed) while it is crafted."""
    model.eval()
    return pgd_ascent(model, x, y, settings.adv_eps, settings.adv_step_size, settings.adv_steps, amp, generator)


def train_reference(x: torch.Tensor, y: torch.Tensor, settings: EntFSettings, seed: int, num_classes: int,
                    amp: bool, log=print):
    """The reference model: ``settings.arch`` adversarially trained on the clean images (each batch cropped and
    flipped, then replaced by :func:`adversarial_batch`; :func:`.pgd.train_reference`: one SGD step on it in train
    mode, the CPU victim's one-cycle schedule), returned frozen in eval mode."""
    s = settings
    return train_reference_model(x, y, name="EntF", arch=s.arch, width=s.width, num_classes=num_classes,
                                 epochs=s.train_epochs, lr=s.train_lr, batch_size=s.train_batch_size,
                                 weight_decay=s.weight_decay, seed=seed, amp=amp, log=log,
                                 batch_input=lambda model, xb, yb, gen: adversarial_batch(model, augment(xb, gen), yb,
                                                                                          s, amp, gen))


def class_centroids(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, amp: bool) -> torch.Tensor:
    """(num_classes, d): the mean penultimate feature of each class's clean images (the model in eval mode)."""
    with torch.no_grad():
        f = features(model, x, amp=amp)
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, y, f)
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).to(f.dtype)
    return sums / counts[:, None]


def centres(centroids: torch.Tensor, y: torch.Tensor, variant: str) -> torch.Tensor:
    """Each image's centre: its own class centroid (push) or the centroid of the class nearest to its own
    (pull; classes without images are never chosen)."""
    if variant not in VARIANTS:
        raise ValueError(f"EntF variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    if variant == "push":
        return centroids[y]
    dist = torch.cdist(centroids, centroids)
    present = torch.bincount(y, minlength=len(centroids)) > 0
    dist = dist.masked_fill(torch.eye(len(centroids), dtype=torch.bool, device=dist.device) | ~present[None], math.inf)
    return centroids[dist.argmin(1)[y]]


def attack(model, x: torch.Tensor, centre: torch.Tensor, delta: torch.Tensor, settings: EntFSettings,
           amp: bool) -> torch.Tensor:
    """Projected sign-gradient ascent (push) or descent (pull) on ||f(x + delta) - centre||^2 in the L-inf ball
    and the [0, 1] box."""
    s = settings
    sign = 1.0 if s.variant == "push" else -1.0
    for _ in range(s.steps):
        delta = delta.detach().requires_grad_(True)
        f = features(model, (x + delta).clamp(0, 1), batch_size=len(x), amp=amp)
        loss = (f - centre).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + sign * s.step_size * grad.sign()).clamp(-s.eps, s.eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, device: str | None = None,
             settings: EntFSettings = EntFSettings(), num_classes: int = 10, state_path: Path | None = None,
             max_seconds: float | None = None, log=print, precision: str = "bf16") -> np.ndarray:
    """Float NHWC delta: the reference model adversarially trained, the class centroids of the clean images, then
    the push (or pull) attack from zero. Resumable: the reference model, the centroids and every finished batch
    are saved."""
    device = resolve_device(device)
    amp = autocast_on(device, precision)
    s = settings
    if s.variant not in VARIANTS:
        raise ValueError(f"EntF variant must be one of {', '.join(VARIANTS)}, not {s.variant!r}")
    x, y = to_device(images, labels, device)
    signature = signed({"kind": "entf", "seed": seed, "n": len(y), "settings": asdict(s)}, precision)
    state = load_state(state_path, device, signature)
    if state is not None and "model" in state:
        model = build_model(s.arch, num_classes=num_classes, width=s.width).to(device)
        model.load_state_dict(state["model"])
        model.eval().requires_grad_(False)
        centroids = state["centroids"].to(device)
        delta, start0 = state["delta"].to(device).float(), state["next"]
        log(f"EntF: resumed at image {start0}")
    else:
        model = train_reference(x, y, s, seed, num_classes, amp, log)
        centroids = class_centroids(model, x, y, num_classes, amp)
        delta, start0 = torch.zeros_like(x), 0
        save_state(state_path, {"signature": signature, "model": model.state_dict(), "centroids": centroids.cpu(),
                                "delta": delta.half().cpu(), "next": 0})
    centre = centres(centroids, y, s.variant)
    clock, batch_cost = TimeBudget(max_seconds), 0.0
    for start in range(start0, len(y), s.batch_size):
        if start > start0 and clock.over(batch_cost):
            save_state(state_path, {"signature": signature, "model": model.state_dict(),
                                    "centroids": centroids.cpu(), "delta": delta.half().cpu(), "next": start})
            raise PoisonIncomplete(f"EntF stopped at image {start}/{len(y)} (time budget); rerun to resume")
        t = time.time()
        sl = slice(start, start + s.batch_size)
        delta[sl] = attack(model, x[sl], centre[sl], delta[sl], s, amp)
        batch_cost = time.time() - t
        log(f"EntF-{s.variant}: {min(start + s.batch_size, len(y))}/{len(y)} images ({batch_cost:.1f}s a batch)")
    save_state(state_path, {"signature": signature, "model": model.state_dict(), "centroids": centroids.cpu(),
                            "delta": delta.half().cpu(), "next": len(y)})
    log(f"EntF-{s.variant}: {len(y)} images done")
    return to_numpy_delta(delta)
