"""SEP: self-ensemble protection (Chen, Lin & Wang, ICLR 2023, "Self-Ensemble Protection: Training
Checkpoints Are Good Data Protectors").

A model is trained once on the clean data and several of its *training checkpoints* are kept; every
image then becomes an error-maximising (untargeted) adversarial example against that self-ensemble:
``steps`` of sign-gradient *ascent* on the mean over checkpoints of CE(f_k(x + delta), y), inside the
L-inf 8/255 ball and the [0, 1] box, from a uniform random start. This is the paper's basic SEP (its
feature-alignment and variance-reduction refinements are not implemented). At CPU scale the
checkpoints come from the CPU protocol's own victim recipe (``tools/grid.py``); finished batches are
saved (``state_path``), so a run resumes across calls.

Why this family for issue 19: it is in the ECLIPSE paper's table (the strongest poison there,
9.01% undefended), it is made by an algorithm none of the defaults saw (an ensemble of checkpoints,
untargeted ascent), and the defense was never tuned on it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_stream.devices import resolve_device

from .base import LINF_8, Budget, autocast_on, signed
from .pgd import Budget as TimeBudget
from .pgd import PoisonIncomplete, load_state, save_state, to_device, to_numpy_delta
from .tap import load_surrogate

BUDGET = Budget("linf", LINF_8)


@dataclass(frozen=True)
class SEPSettings:
    eps: float = LINF_8
    step_size: float = 1 / 255
    steps: int = 30
    batch_size: int = 250


def ascend(models, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float, step_size: float,
           steps: int, amp: bool) -> torch.Tensor:
    """Sign-gradient ascent on the checkpoints' mean CE(f_k(x + delta), y) in the L-inf ball and [0, 1]."""
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            xa = (x + delta).clamp(0, 1)
            loss = sum(F.cross_entropy(m(xa), y) for m in models) / len(models)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, device: str | None = None,
             checkpoints: list[Path] | None = None, settings: SEPSettings = SEPSettings(),
             state_path: Path | None = None, max_seconds: float | None = None, log=print,
             precision: str = "bf16") -> np.ndarray:
    """Float NHWC delta: error-maximising noise against the ensemble of ``checkpoints`` (victim-trainer files)."""
    if not checkpoints:
        raise ValueError("SEP needs the checkpoints of a model trained on clean data")
    device = resolve_device(device)
    amp = autocast_on(device, precision)  # bf16 autocast, on a CPU too
    s = settings
    models = [load_surrogate(Path(c), None, device) for c in checkpoints]
    x, y = to_device(images, labels, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    delta = (torch.rand(x.shape, device=device, generator=gen) * 2 - 1) * s.eps
    signature = signed({"kind": "sep", "seed": seed, "n": len(y), "settings": asdict(s),
                        "checkpoints": [Path(c).name for c in checkpoints]}, precision)
    start0 = 0
    state = load_state(state_path, device, signature)
    if state is not None:
        delta, start0 = state["delta"].to(device).float(), state["next"]
        log(f"SEP: resumed at image {start0}")
    clock, batch_cost = TimeBudget(max_seconds), 0.0
    for start in range(start0, len(y), s.batch_size):
        if start > start0 and clock.over(batch_cost):
            save_state(state_path, {"signature": signature, "delta": delta.half().cpu(), "next": start})
            raise PoisonIncomplete(f"SEP stopped at image {start}/{len(y)} (time budget); rerun to resume")
        t = time.time()
        sl = slice(start, start + s.batch_size)
        delta[sl] = ascend(models, x[sl], y[sl], delta[sl], s.eps, s.step_size, s.steps, amp)
        batch_cost = time.time() - t
    save_state(state_path, {"signature": signature, "delta": delta.half().cpu(), "next": len(y)})
    log(f"SEP: {len(y)} images done against {len(models)} checkpoints")
    return to_numpy_delta(delta)
