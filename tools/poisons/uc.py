"""UC: unlearnable clusters (Zhang, Ma, Yi, Sang, Jiang, Wang & Xu, CVPR 2023, "Unlearnable Clusters: Towards
Label-agnostic Unlearnable Examples").

The labels are never read. The images are grouped by k-means on a surrogate's features (K clusters; K = the
number of classes, the paper's choice), and each cluster k gets one *universal* L-inf perturbation delta_k that
pulls the surrogate's features of that cluster's images toward the centre of another cluster, (k + offset) mod K
(offset 1, the paper's): descent on KL(softmax(centre) || softmax(features(x + delta_k))). Every image of
cluster k then carries delta_k. The perturbation is neither class-wise (the clusters cut across the labels) nor
sample-wise, and acts on features rather than on a classifier's loss.

What the paper does that this CPU version does not: delta_k is the output of a generator network on a fixed noise
input, trained with Adam (here delta_k is optimised directly with sign-gradient steps in the same ball: the
generator is a parametrisation of it); eps 16/255 on 224-px sets (here 8/255 by default, the budget of every other
L-inf family of this evaluation and of ECLIPSE's tables); a surrogate trained elsewhere (ImageNet RN50, CLIP;
here, with no other data on this machine, the CPU victim trained on the clean split with its own seed, 3; its
features are the input of its linear head).

Why this family for issue 19: it was added (2026-12-07) as the held-out check of the next default change, with the
rule written down and committed before any defended cell ran on it. None of the defaults, nor the class-wise
deblurring, were chosen with a label-agnostic family in view: every family seen before is per sample (URP, EM,
TAP, SEP), per class (LSP, AR, OPS, HYP, UAP, CUDA) or both.
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

BUDGET = Budget("linf", LINF_8)


@dataclass(frozen=True)
class UCSettings:
    eps: float = LINF_8
    step_size: float = 1 / 255
    steps: int = 100            # sign-gradient steps per cluster
    batch_size: int = 128       # images of the cluster per step
    clusters: int = 0           # 0: as many as the classes
    target_offset: int = 1      # cluster k is pulled toward the centre of cluster (k + offset) mod K
    kmeans_iters: int = 50


def features(model, x: torch.Tensor, batch_size: int = 1000, amp: bool = False) -> torch.Tensor:
    """The input of the model's linear head ``fc`` (the penultimate features), for a batch or, chunked, a set."""
    captured = []
    hook = model.fc.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        for i in range(0, len(x), batch_size):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                model(x[i:i + batch_size])
    finally:
        hook.remove()
    return torch.cat(captured).float()


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (k-means++ start, Lloyd steps): (centres (k, d), assignment (n,)). An emptied cluster
    restarts at the point farthest from its centre."""
    n = len(points)
    if n < k:
        raise ValueError(f"k-means: {n} points cannot make {k} clusters")
    first = int(torch.randint(n, (1,), generator=generator, device=points.device))
    centres = [points[first]]
    dist = (points - centres[0]).pow(2).sum(1)
    for _ in range(1, k):  # k-means++: the next centre drawn with probability ~ squared distance
        idx = int(torch.multinomial(dist / dist.sum().clamp_min(1e-12), 1, generator=generator))
        centres.append(points[idx])
        dist = torch.minimum(dist, (points - points[idx]).pow(2).sum(1))
    centres = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long, device=points.device)
    for _ in range(iters):
        d = torch.cdist(points, centres)
        new = d.argmin(1)
        for c in range(k):
            members = new == c
            if members.any():
                centres[c] = points[members].mean(0)
            else:
                far = int(d.gather(1, new[:, None]).squeeze(1).argmax())
                centres[c], new[far] = points[far], c
        if torch.equal(new, assign):
            break
        assign = new
    return centres, assign


def cluster_delta(model, x: torch.Tensor, anchor: torch.Tensor, settings: UCSettings, generator: torch.Generator,
                  amp: bool) -> torch.Tensor:
    """One (1, C, H, W) L-inf perturbation that pulls the features of ``x`` (one cluster's images) toward
    ``anchor`` (another cluster's centre), over seeded batches."""
    s = settings
    target = anchor.softmax(-1).expand(min(s.batch_size, len(x)), -1)
    delta = torch.zeros((1, *x.shape[1:]), device=x.device)
    captured = []
    hook = model.fc.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        for _ in range(s.steps):
            idx = torch.randint(len(x), (min(s.batch_size, len(x)),), device=x.device, generator=generator)
            delta = delta.detach().requires_grad_(True)
            captured.clear()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                model((x[idx] + delta).clamp(0, 1))
            loss = F.kl_div(captured[0].float().log_softmax(-1), target[:len(idx)], reduction="batchmean")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() - s.step_size * grad.sign()).clamp(-s.eps, s.eps)
    finally:
        hook.remove()
    return delta.detach()


def generate(images: np.ndarray, labels: np.ndarray, seed: int = 0, device: str | None = None,
             surrogate=None, settings: UCSettings = UCSettings(), num_classes: int = 10,
             state_path: Path | None = None, max_seconds: float | None = None, log=print,
             precision: str = "bf16") -> np.ndarray:
    """Float NHWC delta: image i gets its feature cluster's universal perturbation. ``labels`` only set the
    number of clusters when ``settings.clusters`` is 0; which image is in which cluster ignores them. Each finished
    cluster is saved to ``state_path``, so a run stopped by ``max_seconds`` resumes at the next one."""
    if surrogate is None:
        raise ValueError("UC needs a surrogate model (its features are clustered)")
    s = settings
    k = s.clusters or num_classes
    device = resolve_device(device)
    amp = autocast_on(device, precision)  # bf16 autocast, as TAP, HYP and EM
    model = surrogate.to(device).eval().requires_grad_(False)
    x, y = to_device(images, labels, device)
    signature = signed({"kind": "uc", "seed": seed, "n": len(y), "settings": asdict(s), "clusters": k}, precision)
    state = load_state(state_path, device, signature)
    if state is None:
        with torch.no_grad():
            feats = features(model, x, amp=amp)
        gen = torch.Generator(device=feats.device).manual_seed(seed)
        centres, assign = kmeans(feats, k, s.kmeans_iters, gen)
        deltas = []
        save_state(state_path, {"signature": signature, "centres": centres.cpu(), "assign": assign.cpu(),
                                "deltas": torch.zeros((0, *x.shape[1:]))})
        sizes = torch.bincount(assign, minlength=k).tolist()
        purity = sum(int(torch.bincount(y[assign == c]).max()) for c in range(k) if sizes[c]) / len(y)
        log(f"UC: {k} clusters of {min(sizes)}..{max(sizes)} images; {purity:.1%} of the images are in their "
            f"cluster's most common class")
    else:
        centres, assign = state["centres"].to(device), state["assign"].to(device)
        deltas = list(state["deltas"].float().unbind(0))
        log(f"UC: resumed at cluster {len(deltas)}")
    clock, cost = TimeBudget(max_seconds), 0.0
    for c in range(len(deltas), k):
        if cost and clock.over(cost):  # at least one cluster per call
            raise PoisonIncomplete(f"UC stopped at cluster {c}/{k} (time budget); rerun to resume")
        t = time.time()
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + c)  # per cluster: a resume draws the same
        members = x[assign == c]
        deltas.append(cluster_delta(model, members, centres[(c + s.target_offset) % k], s, gen, amp)[0])
        cost = time.time() - t
        save_state(state_path, {"signature": signature, "centres": centres.cpu(), "assign": assign.cpu(),
                                "deltas": torch.stack(deltas).cpu()})
        log(f"UC: cluster {c} done ({len(members)} images, {cost:.0f} s)")
    per_cluster = torch.stack(deltas).to(device)
    delta = (x + per_cluster[assign]).clamp(0, 1) - x
    return to_numpy_delta(delta)
