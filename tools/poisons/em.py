"""EM: sample-wise error-minimising noise (Huang et al., ICLR 2021, "Unlearnable examples").

Min-min bi-level optimisation with a ResNet18: alternate ``train_steps`` SGD steps of
the model on the perturbed data with, for every image, ``pgd_steps`` of sign-gradient
descent on the model's loss w.r.t. the perturbation (L-inf 8/255, step 0.8/255), until
the model classifies the perturbed training set with accuracy above ``stop_accuracy``.
Perturbations start uniform in the ball, as in the authors' code. The real run needs a
GPU; progress is saved every round (``state_path``) so it resumes across calls. The CPU
protocol makes a smaller EM (``tools/grid.py``: ``PROTOCOLS["cpu"].poison_defaults``): a
ResNet18 of width 0.125 and 10 PGD steps a round, on its 10,000-image subset.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_stream.devices import resolve_device

from ..models import resnet18
from .base import LINF_8, Budget, autocast_on, signed
from .pgd import Budget as TimeBudget
from .pgd import PoisonIncomplete, descend, load_state, save_state, to_device, to_numpy_delta

BUDGET = Budget("linf", LINF_8)


@dataclass(frozen=True)
class EMSettings:
    eps: float = LINF_8
    step_size: float = 0.8 / 255
    pgd_steps: int = 20
    train_steps: int = 10
    batch_size: int = 512
    lr: float = 0.1
    stop_accuracy: float = 0.99
    max_rounds: int = 100
    width: float = 1.0


def _accuracy(model, x, y, delta, batch_size, amp) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        for s in range(0, len(y), batch_size):
            out = model((x[s:s + batch_size] + delta[s:s + batch_size]).clamp(0, 1))
            correct += (out.argmax(1) == y[s:s + batch_size]).sum().item()
    return correct / len(y)


def min_min_start(images: np.ndarray, labels: np.ndarray, seed: int, device: str | None, width: float, lr: float,
                  eps: float, precision: str = "bf16"):
    """What a min-min run (EM, REM) starts from: the device, whether to autocast, the data on the device, a fresh
    ResNet18 of ``width`` with its SGD, and noise uniform in the ``eps`` ball, all drawn from ``seed``."""
    device = resolve_device(device)
    # bf16 autocast, on a CPU too: 2x faster there (0.85 vs 1.71 s a PGD step of 512 at width 0.25) where it has
    # bf16 instructions; precision="fp32" where it has not (base.PRECISIONS)
    amp = autocast_on(device, precision)
    torch.manual_seed(seed)
    x, y = to_device(images, labels, device)
    model = resnet18(width=width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(seed)
    delta = (torch.rand(x.shape, device=device, generator=gen) * 2 - 1) * eps
    return device, amp, x, y, model, opt, delta


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, device: str | None = None,
             settings: EMSettings = EMSettings(), state_path: Path | None = None,
             max_seconds: float | None = None, log=print, precision: str = "bf16") -> np.ndarray:
    """Float NHWC delta of sample-wise error-minimising noise."""
    s = settings
    device, amp, x, y, model, opt, delta = min_min_start(images, labels, seed, device, s.width, s.lr, s.eps,
                                                         precision)
    # max_rounds only says when to stop, so a run may be resumed with a larger one.
    signature = signed({"kind": "em", "seed": seed, "n": len(y), "order": "shuffled",
                        "settings": {k: v for k, v in asdict(s).items() if k != "max_rounds"}}, precision)
    first_round, cursor, done = 0, 0, False
    state = load_state(state_path, device, signature)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        delta = state["delta"].to(device).float()
        first_round, cursor, done = state["round"], state["cursor"], state["done"]
        log(f"EM: resumed after round {first_round}")
    clock, round_cost = TimeBudget(max_seconds), 0.0
    for rnd in range(first_round, 0 if done else s.max_rounds):
        if rnd > first_round and clock.over(round_cost):
            raise PoisonIncomplete(f"EM stopped after round {rnd} (time budget); rerun to resume")
        t_round = time.time()
        cursor = _train_steps(model, opt, x, y, delta, cursor, s, amp, seed)
        model.eval()
        for start in range(0, len(y), s.batch_size):
            sl = slice(start, start + s.batch_size)
            delta[sl] = descend(model, x[sl], y[sl], delta[sl], s.eps, s.step_size, s.pgd_steps, amp)
        acc = _accuracy(model, x, y, delta, s.batch_size, amp)
        round_cost = time.time() - t_round
        log(f"EM round {rnd + 1}: accuracy on perturbed data {acc:.4f} ({round_cost:.1f}s)")
        done = acc >= s.stop_accuracy
        save_state(state_path, {"signature": signature, "model": model.state_dict(),
                                "optimizer": opt.state_dict(), "delta": delta.half().cpu(),
                                "round": rnd + 1, "cursor": cursor, "done": done})
        if done:
            break
    return to_numpy_delta(delta)


def _epoch_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The training order of one pass over the data: a permutation drawn from (seed, epoch) alone, so a resumed
    run trains in the same order. Sets are often stored class by class; unshuffled batches of one class
    teach the model only that class's bias, and EM then never leaves chance accuracy."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def _train_steps(model, opt, x, y, delta, cursor: int, s: EMSettings, amp: bool, seed: int = 0) -> int:
    """The "train" half of min-min: a few SGD steps on the currently perturbed data, in shuffled passes.

    ``cursor`` counts the samples trained on so far (pass = cursor // n); returns the new count.
    """
    model.train()
    n = len(y)
    for _ in range(s.train_steps):
        epoch, pos = divmod(cursor, n)
        idx = _epoch_order(n, seed, epoch, x.device)[pos:pos + s.batch_size]  # the pass's last batch may be short
        cursor += len(idx)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model((x[idx] + delta[idx]).clamp(0, 1)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return cursor
