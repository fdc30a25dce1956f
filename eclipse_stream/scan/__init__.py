"""``eclipse-stream scan``: does a labelled image dataset look poisoned by an availability attack?

Availability poisons ("unlearnable examples": URP, LSP, AR, OPS, EM, TAP, CUDA, SEP, ...) make the labels
learnable from a shortcut that clean photos do not carry. A scan samples up to ``per_class`` images of every
class (``sampling``), asks several quick probes how well held-out labels can be predicted from one kind of
evidence each (``probes``: cross-validated, closed-form, seconds on a CPU), and compares every probe's score
with that probe's bounds at this sample size, calibrated on clean CIFAR-10 only (``verdict``). Beside the
whole input, every shard (or every input, or every group the caller gives) is scored on a sample of its own,
so a poisoned minority of sources is found and named (``by``). ``report`` holds the result, its JSON and plot.

The verdicts: "likely poisoned" (exit 10), "no sign of the poison types tested" (exit 0; it is not a proof
of cleanness: it says that no probe saw more than clean photos show), "inconclusive" (exit 11: between the
bounds, or too few images per class, with the number needed). docs/scan.md has the calibration, the
measured detection per poison family and sample size, and the limits.

API: :func:`scan_shards` (tar / .beton shards, as ``purify`` takes them), :func:`scan_samples` (an iterable
of WebDataset sample dicts, raw or decoded), :func:`scan_arrays` (NHWC uint8 images + labels). Each returns
a :class:`ScanResult` (``verdict``, ``score``, ``exit_code``, ``groups``, ``to_dict()``, ``write_json()``,
``plot()``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import numpy as np
import torch

from ..devices import resolve_device
from ..formats import LABEL_KEYS  # noqa: F401  (re-exported)
from .config import EXIT_CODES, INCONCLUSIVE, LIKELY_POISONED, NO_SIGN, ScanConfig
from .probes import NO_NULL, THOROUGH, ProbeData, run_probe
from .report import ScanResult
from .sampling import Sample, Sampled, sample_arrays, sample_samples, sample_shards, subsample
from .verdict import judge, judge_relative

__all__ = [
    "LIKELY_POISONED", "NO_SIGN", "INCONCLUSIVE", "EXIT_CODES", "LABEL_KEYS",
    "ScanConfig", "ScanResult", "scan_shards", "scan_samples", "scan_arrays", "sample_shards",
]


def scan_arrays(images: np.ndarray, labels: Sequence, cfg: ScanConfig | None = None, *,
                reference: tuple[np.ndarray, Sequence] | None = None, groups: Sequence | None = None) -> ScanResult:
    """Scan in-memory images (N x H x W x 3 uint8, one size) and their labels (ints or names).

    Up to ``cfg.per_class`` images per class are used (a seeded random choice). ``groups``: optional group name
    of every image, for per-group verdicts (e.g. the source each image came from).
    """
    cfg = cfg or ScanConfig()
    t0 = time.perf_counter()
    sample = sample_arrays(images, labels, cfg, groups)
    ref = sample_arrays(*reference, cfg).whole if reference is not None else None
    return _scan(sample, cfg, ref, t0, time.perf_counter() - t0)


def scan_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike], cfg: ScanConfig | None = None, *,
                reference: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> ScanResult:
    """Scan tar / .beton shards (a folder, brace pattern, file, or a list of these), as purify reads them.

    ``reference``: optional shards of clean images of the same classes (e.g. the sparse clean set).
    """
    cfg = cfg or ScanConfig()
    t0 = time.perf_counter()
    sample = sample_shards(inputs, cfg)
    ref = sample_shards(reference, cfg, groups=False).whole if reference is not None else None
    return _scan(sample, cfg, ref, t0, time.perf_counter() - t0)


def scan_samples(samples: Iterable[dict], cfg: ScanConfig | None = None, *,
                 reference: Iterable[dict] | None = None) -> ScanResult:
    """Scan an iterable of WebDataset samples: raw (bytes fields) or decoded (PIL, arrays, tensors); the
    per-group verdicts are per ``__url__`` (shard).

    E.g. ``scan_samples(wds.WebDataset(urls).decode("pil"), ScanConfig(label_key="cls"))``.
    """
    cfg = cfg or ScanConfig()
    t0 = time.perf_counter()
    sample = sample_samples(samples, cfg)
    ref = sample_samples(reference, cfg, groups=False).whole if reference is not None else None
    return _scan(sample, cfg, ref, t0, time.perf_counter() - t0)


def _probe_all(sampled: Sampled, names: Sequence[str], cfg: ScanConfig, device: torch.device,
               null: bool) -> tuple[dict, dict]:
    x = torch.from_numpy(sampled.images).to(device).permute(0, 3, 1, 2).double().div(255)
    data = ProbeData(x, sampled.labels, len(sampled.classes), cfg.folds, cfg.seed)
    found = {name: run_probe(name, data) for name in names}
    control = {}
    if null:  # the same images with their labels shuffled: no signal to learn
        shuffled = data.shuffled()
        control = {name: run_probe(name, shuffled) for name in names if name not in NO_NULL}
    return found, control


def _matched(sampled: Sampled, ref: Sampled, seed: int) -> tuple[Sampled, Sampled]:
    """Both at the same per-class count (the smaller)."""
    n = int(min(np.bincount(sampled.labels).min(), np.bincount(ref.labels).min()))
    return subsample(sampled, n, seed), subsample(ref, n, seed)


def _judge(sampled: Sampled, names, cfg, device, ref: Sampled | None, null: bool):
    """Probe one sample and judge it: (judgement, probe records, null records, bounds, reference record)."""
    reference = None
    if ref is not None:
        sampled, ref = _matched(sampled, ref, cfg.seed)
    found, control = _probe_all(sampled, names, cfg, device, null=null and ref is None)
    scores = {p: r["score"] for p, r in found.items()}
    k = len(sampled.classes)
    if ref is None:
        judgement, bounds = judge(scores, sampled.labels, k, cfg, sampled.seen)
    else:
        ref_found, _ = _probe_all(ref, names, cfg, device, null=False)
        reference = {"probes": ref_found, "classes": ref.classes, "per_class_sampled": ref.per_class(),
                     "sources": ref.sources[:100], "skipped": ref.skipped}
        if ref.classes != sampled.classes:
            reference["warning"] = "the reference's classes differ from the data's"
        judgement, bounds = judge_relative(scores, {p: r["score"] for p, r in ref_found.items()}, sampled.labels,
                                           k, cfg)
    return sampled, judgement, found, control, bounds, reference


def _scan(sample: Sample, cfg: ScanConfig, ref: Sampled | None, t0: float, t_read: float) -> ScanResult:
    device = resolve_device(cfg.device)
    names = cfg.probe_names()
    t1 = time.perf_counter()
    whole, judgement, found, control, bounds, reference = _judge(sample.whole, names, cfg, device, ref, cfg.null)
    group_names = [p for p in names if p not in THOROUGH]  # the slow probes run on the whole sample only
    groups: dict[str, dict] = {}
    for name, group in sample.groups.items():
        if isinstance(group, str):
            groups[name] = {"not_scored": group}
            continue
        g, gj, g_found, _, _, _ = _judge(group, group_names, cfg, device, ref, null=False)
        groups[name] = {"verdict": gj.verdict, "score": gj.score, "threshold": gj.threshold,
                        "clean_below": gj.clean_below, "probe": gj.probe, "reason": gj.reason,
                        "scores": {p: r["score"] for p, r in g_found.items()}, "per_class_sampled": g.per_class()}
    whole_verdict = {"verdict": judgement.verdict, "score": judgement.score, "probe": judgement.probe,
                     "reason": judgement.reason}
    verdict, reason = judgement.verdict, judgement.reason
    flagged = [g for g, r in groups.items() if r.get("verdict") == LIKELY_POISONED]
    if flagged and verdict != LIKELY_POISONED:
        verdict = LIKELY_POISONED
        reason = (f"{len(flagged)} of {len(groups)} groups ({cfg.by}) look poisoned: "
                  + ", ".join(f"{g} ({groups[g]['probe']} {groups[g]['score']:.3f})" for g in flagged[:5])
                  + (" ..." if len(flagged) > 5 else "") + f"; the whole-input sample: {judgement.verdict}")
    cfg_dict = asdict(cfg)
    cfg_dict["probes"] = list(names)
    return ScanResult(
        verdict=verdict, score=judgement.score, threshold=judgement.threshold, clean_below=judgement.clean_below,
        mode="relative" if reference is not None else "absolute", reason=reason, classes=whole.classes,
        per_class_sampled=whole.per_class(), seen=whole.seen, probes=found, null=control, reference=reference,
        skipped=whole.skipped, sources=whole.sources, config=cfg_dict, device=str(device),
        seconds={"read": round(t_read, 3), "probes": round(time.perf_counter() - t1, 3),
                 "total": round(time.perf_counter() - t0, 3)},
        best_probe=judgement.probe, bounds=bounds, whole=whole_verdict, groups=groups,
    )
