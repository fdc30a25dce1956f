"""The probes: each asks "can the labels of held-out images of this set be predicted from one kind of
evidence?", and answers with the same kind of record.

Every probe is one function ``probe(data: ProbeData) -> dict`` registered with ``@probe``; the dict holds
``score`` (``(acc - 1/K) / (1 - 1/K)`` of the cross-validated held-out balanced accuracy: 0 at chance, 1 when
every held-out image is classified right), ``heldout_accuracy``, ``class_recall`` and ``learning_curve``
(held-out accuracy by training images per class). The verdict (``verdict.py``) compares each probe's score
with that probe's own calibrated clean-score bounds at the sample's size, so adding a probe is one function
here, one test, and a calibration run (``python -m tools.scan_calibration``) that gives it bounds; a probe
without bounds is reported but does not vote.

Why label learnability: every availability poison ("unlearnable examples") works by planting a shortcut that
is easier to learn than the image content and correlated with the class. A quick model that only sees one
kind of evidence (high-pass pixels, their texture, coarse colour layout, the power spectrum, colour
statistics) then predicts held-out labels far better than the same model on clean photos (Zhu, Yu & Gao,
"Detection and Defense of Unlearnable Examples", AAAI 2024: simple models on pixels detect them). Processing
applied to every class alike (JPEG, a blur, grayscale, resizing) changes every class's evidence the same
way and adds none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ProbeData", "PROBES", "DEFAULT", "THOROUGH", "probe", "run_probe"]


@dataclass(frozen=True)
class ProbeData:
    """What every probe sees: the sampled images and their labels, and how to cross-validate."""

    x: torch.Tensor         # (N, 3, S, S) float64 in [0, 1], on the scan's device
    labels: np.ndarray      # (N,) int64 class indices
    k: int                  # number of classes
    folds: int = 4
    seed: int = 0

    def shuffled(self) -> ProbeData:
        """The same images with their labels shuffled (seeded): nothing to learn, the no-signal control."""
        return replace(self, labels=np.random.default_rng(self.seed + 1).permutation(self.labels))


Probe = Callable[[ProbeData], dict]
PROBES: dict[str, Probe] = {}
#: The probes a default scan runs, and those --thorough adds (slower).
DEFAULT = ("pixels", "texture", "blocks", "spectrum", "colour")
THOROUGH = ("learning",)
#: Probes too slow to repeat on shuffled labels for the plot's control curve.
NO_NULL = {"learning"}


def probe(fn: Probe) -> Probe:
    """Register a probe under its function's name."""
    PROBES[fn.__name__] = fn
    return fn


def run_probe(name: str, data: ProbeData) -> dict:
    return PROBES[name](data)


# --------------------------------------------------------------------------------------------- the probes


@probe
def pixels(data: ProbeData) -> dict:
    """High-pass pixels (the image minus its 3x3 blur): class-wise pixel patterns (URP, OPS, CUDA's filtered
    edges, ...). The high-pass removes most of a natural image's energy and keeps most of a perturbation's."""
    return linear_probe(data, _highpass(data.x).flatten(1), ridge=0.1)


@probe
def texture(data: ProbeData) -> dict:
    """Auto-correlations of the high-pass residual: a per-class noise *process* (AR, sample-wise noise with
    class-wise statistics), even when every image gets a different draw."""
    return linear_probe(data, _texture(data.x), ridge=0.01)


@probe
def blocks(data: ProbeData) -> dict:
    """The 4 x 4 grid of mean colours: patch-wise patterns that the high-pass removes (LSP's 8 x 8 patches)."""
    return linear_probe(data, F.adaptive_avg_pool2d(data.x, 4).flatten(1), ridge=0.01)


@probe
def spectrum(data: ProbeData) -> dict:
    """Per-channel log power spectrum: class-wise filters (CUDA's 3 x 3 convolutions) and class-wise noise
    colours show up as spectra that differ by class; a filter applied to every class shifts every spectrum
    alike (the probe standardises each frequency), so it adds nothing."""
    x = data.x - data.x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.rfft2(x, norm="ortho").abs().pow(2)
    return linear_probe(data, power.add(1e-8).log().flatten(1), ridge=0.1)


@probe
def colour(data: ProbeData) -> dict:
    """Colour statistics of the whole image (channel means, spreads and covariances): class-wise colour
    casts, contrast or saturation changes that no spatial pattern carries."""
    x = data.x.flatten(2)
    centred = x - x.mean(2, keepdim=True)
    cov = torch.einsum("ncp,ndp->ncd", centred, centred) / x.shape[2]
    iu = torch.triu_indices(3, 3, device=x.device)
    return linear_probe(data, torch.cat([x.mean(2), cov[:, iu[0], iu[1]]], 1), ridge=0.01)


# --------------------------------------------------------------------------------------------- features


def _highpass(x: torch.Tensor) -> torch.Tensor:
    """The image minus its 3x3 box blur (edge-replicated)."""
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _texture(x: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Second-order statistics of the high-pass residual: for every offset in a half window of ``radius``
    and every channel pair, the mean product of the residual with its shifted self, divided by the
    residual's mean power, plus the log power per channel."""
    h = _highpass(x)
    _, _, height, width = h.shape
    core = h[:, :, radius:height - radius, radius:width - radius]
    area = core.shape[2] * core.shape[3]
    feats = []
    for a in range(radius + 1):
        for b in range(-radius, radius + 1):
            if a == 0 and b < 0:
                continue
            shifted = h[:, :, radius + a:height - radius + a, radius + b:width - radius + b]
            feats.append(torch.einsum("nchw,ndhw->ncd", core, shifted).flatten(1) / area)
    power = core.pow(2).mean(dim=(2, 3))
    return torch.cat([torch.cat(feats, 1) / power.mean(1, keepdim=True).clamp_min(1e-12),
                      power.clamp_min(1e-12).log()], 1)


# --------------------------------------------------------------------------------------------- linear probe


def linear_probe(data: ProbeData, features: torch.Tensor, ridge: float) -> dict:
    """Ridge regression on one-hot labels, closed form, ``folds``-fold cross-validated, and its learning curve
    over 2, 4, 8, ... training images per class. Features are standardised over the whole sample (no labels
    involved); ``ridge`` is relative to the training features' mean squared norm. Wide features are solved in
    the dual with one Gram matrix of the sample, shared by every fold and curve point."""
    labels, k = data.labels, data.k
    a = (features - features.mean(0)) / features.std(0).clamp_min(1e-6)
    gram = a @ a.T if len(a) <= GRAM_MAX else None
    fold, rank = _folds(labels, data.folds, data.seed)
    y = torch.from_numpy(labels).to(a.device)
    present = np.bincount(labels, minlength=k)[np.unique(labels)]
    per_class_train = int(present.min() * (data.folds - 1) // data.folds)
    sizes = [m for m in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if m < per_class_train] + [None]
    ranks = {f: _rank_in_train(rank, fold, f, labels) for f in range(data.folds)}
    curve, full = [], None
    for m in sizes:
        pred = np.empty(len(labels), dtype=np.int64)
        for f in range(data.folds):
            test = fold == f
            train = ~test if m is None else (~test) & (ranks[f] < m)
            tr = torch.from_numpy(np.flatnonzero(train)).to(a.device)
            te = torch.from_numpy(np.flatnonzero(test)).to(a.device)
            pred[test] = _ridge_predict(a, gram, tr, te, y, k, ridge).cpu().numpy()
        acc, recalls = balanced_accuracy(pred, labels, k)
        counts = np.bincount(labels[fold != 0], minlength=k)
        curve.append({"train_per_class": int(m if m is not None else counts[counts > 0].min()),
                      "heldout_accuracy": acc})
        if m is None:
            full = (acc, recalls)
    return outcome(*full, k, curve)


GRAM_MAX = 4096  # samples up to which one Gram matrix (GRAM_MAX^2 float64: 128 MiB) serves every fit


def outcome(acc: float, recalls: list[float], k: int, curve: list[dict]) -> dict:
    """The record every probe returns."""
    chance = 1.0 / k
    return {"score": (acc - chance) / (1 - chance), "heldout_accuracy": acc, "class_recall": recalls,
            "learning_curve": curve}


def _ridge_predict(a: torch.Tensor, gram: torch.Tensor | None, tr: torch.Tensor, te: torch.Tensor,
                   y: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """Predicted classes of rows ``te`` of ``a`` by ridge regression on the one-hot labels of rows ``tr``."""
    targets = F.one_hot(y[tr], k).to(a.dtype) - 1.0 / k
    n, d = len(tr), a.shape[1]
    if n <= d:  # dual: (A A^T + reg I)^-1 Y
        g = gram[tr][:, tr] if gram is not None else a[tr] @ a[tr].T
        cross = gram[te][:, tr] if gram is not None else a[te] @ a[tr].T
        g.diagonal().add_(lam * float(g.diagonal().sum()) / n)
        return (cross @ torch.linalg.solve(g, targets)).argmax(1)
    a_tr = a[tr]
    cov = a_tr.T @ a_tr  # primal: (A^T A + reg I)^-1 A^T Y
    cov.diagonal().add_(lam * float(cov.diagonal().sum()) / n)
    return (a[te] @ torch.linalg.solve(cov, a_tr.T @ targets)).argmax(1)


def _folds(labels: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified fold of every image, and its rank inside its class (the order training images are added)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = np.arange(len(members)) % folds
        rank[members] = np.arange(len(members))
    return fold, rank


def _rank_in_train(rank: np.ndarray, fold: np.ndarray, f: int, labels: np.ndarray) -> np.ndarray:
    """Per image, its order among its class's training images when fold ``f`` is held out."""
    out = np.full(len(labels), np.iinfo(np.int64).max)
    for c in np.unique(labels):
        members = np.flatnonzero((labels == c) & (fold != f))
        out[members[np.argsort(rank[members])]] = np.arange(len(members))
    return out


def balanced_accuracy(pred: np.ndarray, y: np.ndarray, k: int) -> tuple[float, list[float]]:
    recalls = [float((pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in range(k)]
    return float(np.nanmean(recalls)), recalls


# --------------------------------------------------------------------------------------------- learning dynamics

LEARNING_STEPS = 400     # SGD steps of the small CNN (a fixed budget, whatever the sample size)
LEARNING_BATCH = 64
LEARNING_CHECKPOINTS = (25, 50, 100, 200, 400)


@probe
def learning(data: ProbeData) -> dict:
    """Learning dynamics of a small CNN (three 3x3 conv layers, 16-32-64 channels) trained for a fixed budget
    (``LEARNING_STEPS`` SGD steps) on three quarters of the sample: held-out accuracy on the last quarter as
    the score, and how fast the training and held-out accuracy rise (``fit_curve``). A poisoned set is fitted in
    few steps *and* the fit carries over to held-out images of the same set; on clean photos a small CNN on a
    few hundred images fits slowly and generalises little. Slower than the linear probes (seconds to tens of
    seconds on a CPU): opt-in (``thorough``)."""
    labels, k = data.labels, data.k
    fold, _ = _folds(labels, data.folds, data.seed)
    test = fold == 0
    device = data.x.device
    x = data.x.float()
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    y = torch.from_numpy(labels).to(device)
    tr = torch.from_numpy(np.flatnonzero(~test)).to(device)
    te = torch.from_numpy(np.flatnonzero(test)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(data.seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(data.seed)
        net = _small_cnn(k).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    fit, correct, seen = [], 0, 0
    for step in range(1, LEARNING_STEPS + 1):
        batch = tr[torch.randint(len(tr), (min(LEARNING_BATCH, len(tr)),), generator=gen).to(device)]
        net.train()
        logits = net(x[batch])
        loss = F.cross_entropy(logits, y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += int((logits.argmax(1) == y[batch]).sum())
        seen += len(batch)
        if step in LEARNING_CHECKPOINTS:
            pred = _predict(net, x[te])
            fit.append({"step": step, "train_accuracy": correct / seen,
                        "heldout_accuracy": balanced_accuracy(pred, labels[test], k)[0]})
            correct = seen = 0
    acc, recalls = balanced_accuracy(_predict(net, x[te]), labels[test], k)
    n_train = np.bincount(labels[~test], minlength=k)
    result = outcome(acc, recalls, k, [{"train_per_class": int(n_train[n_train > 0].min()), "heldout_accuracy": acc}])
    result["fit_curve"] = fit
    return result


def _small_cnn(k: int) -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, k))


@torch.no_grad()
def _predict(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    net.eval()
    return torch.cat([net(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).cpu().numpy()
