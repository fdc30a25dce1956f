"""TAP: targeted adversarial poisoning (Fowl et al., NeurIPS 2021, "Adversarial examples make
strong poisons").

Every training image becomes a targeted adversarial example, for a ResNet18 trained on
clean data, towards a fixed permutation of the classes (a seeded derangement, so no class
maps to itself): ``steps`` of sign-gradient descent on CE(model(x + delta), pi(y)) in the
L-inf 8/255 ball, from a uniform random start. The surrogate comes from the victim
trainer (a checkpoint it wrote, any of its architectures); the driver trains one when none
is given. The paper's setting (ResNet18, 250 steps) needs a GPU; the CPU protocol makes TAP
against its own CPU victim trained on the clean subset, with fewer, larger steps
(``tools/grid.py``: ``PROTOCOLS["cpu"].poison_defaults``). Finished batches are saved
(``state_path``), so a run resumes across calls.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from eclipse_stream.devices import resolve_device

from ..models import build_model
from .base import LINF_8, Budget, autocast_on, signed
from .pgd import Budget as TimeBudget
from .pgd import PoisonIncomplete, descend, load_state, save_state, to_device, to_numpy_delta

BUDGET = Budget("linf", LINF_8)


@dataclass(frozen=True)
class TAPSettings:
    eps: float = LINF_8
    step_size: float = 0.5 / 255
    steps: int = 250
    batch_size: int = 512


def derangement(num_classes: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point: the attacker's target class for each true class."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(num_classes)
        if not (perm == np.arange(num_classes)).any():
            return perm


def load_surrogate(checkpoint: Path, width: float | None, device: torch.device):
    """The model of a victim-trainer checkpoint (its recipe's architecture and width), in eval mode with
    frozen weights; ``width`` None takes the width recorded in the checkpoint."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)  # tensors and plain containers only
    signature = state.get("signature", {})
    arch = signature.get("recipe", {}).get("arch", "resnet18")
    model = build_model(arch, width=signature.get("width", 1.0) if width is None else width).to(device)
    model.load_state_dict(state["model"])
    model.eval().requires_grad_(False)
    return model


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, device: str | None = None,
             surrogate=None, settings: TAPSettings = TAPSettings(), num_classes: int = 10,
             state_path: Path | None = None, max_seconds: float | None = None, log=print,
             precision: str = "bf16") -> np.ndarray:
    """Float NHWC delta: class-targeted L-inf PGD against ``surrogate`` (an nn.Module)."""
    if surrogate is None:
        raise ValueError("TAP needs a trained surrogate model")
    device = resolve_device(device)
    amp = autocast_on(device, precision)  # bf16 autocast, on a CPU too (about 2x there, as for EM)
    s = settings
    model = surrogate.to(device).eval().requires_grad_(False)
    x, y = to_device(images, labels, device)
    target = torch.from_numpy(derangement(num_classes, seed)).to(device)[y]
    gen = torch.Generator(device=device).manual_seed(seed)
    delta = (torch.rand(x.shape, device=device, generator=gen) * 2 - 1) * s.eps
    signature = signed({"kind": "tap", "seed": seed, "n": len(y), "settings": asdict(s)}, precision)
    start0 = 0
    state = load_state(state_path, device, signature)
    if state is not None:
        delta, start0 = state["delta"].to(device).float(), state["next"]
        log(f"TAP: resumed at image {start0}")
    clock, batch_cost = TimeBudget(max_seconds), 0.0
    for start in range(start0, len(y), s.batch_size):
        if start > start0 and clock.over(batch_cost):
            save_state(state_path, {"signature": signature, "delta": delta.half().cpu(), "next": start})
            raise PoisonIncomplete(f"TAP stopped at image {start}/{len(y)} (time budget); rerun to resume")
        t = time.time()
        sl = slice(start, start + s.batch_size)
        delta[sl] = descend(model, x[sl], target[sl], delta[sl], s.eps, s.step_size, s.steps, amp)
        batch_cost = time.time() - t
    save_state(state_path, {"signature": signature, "delta": delta.half().cpu(), "next": len(y)})
    log(f"TAP: {len(y)} images done")
    return to_numpy_delta(delta)
