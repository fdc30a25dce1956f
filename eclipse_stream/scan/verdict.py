"""From probe scores to a verdict, with bounds calibrated on clean data only.

``calibration.json`` (written by ``python -m tools.scan_calibration clean``) holds, for every probe and for
25, 50, 100 and 200 images per class, the mean and standard deviation of that probe's score on many clean
CIFAR-10 subsets. A probe's bounds at a sample of n images per class are

    likely poisoned from   mean(n) + Z_POISONED * sd(n)
    no sign below          mean(n) + Z_CLEAN * sd(n)

(mean and sd interpolated in log2(n); ``sd`` at least ``MIN_SD``). The z values are the false-positive policy,
stated in the file and in docs/scan.md; no poisoned set enters the calibration. The verdict:

* ``inconclusive`` when the median class has fewer images than the smallest calibrated size (it says how many
  are needed);
* ``likely poisoned`` when any probe reaches its poisoned bound (the one furthest above its clean mean is named);
* ``no sign of the poison types tested`` when every calibrated probe is below its clean bound;
* ``inconclusive`` in between (it says when a larger sample could decide).

With a clean ``reference`` the judgement is the excess of a probe's score over the reference's (fixed bounds).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import INCONCLUSIVE, LIKELY_POISONED, NO_SIGN, ScanConfig

__all__ = ["Bounds", "Judgement", "bounds_for", "calibration", "judge", "judge_relative"]

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@functools.lru_cache(maxsize=1)
def calibration() -> dict:
    """The shipped calibration (see the module docstring)."""
    return json.loads(CALIBRATION_FILE.read_text())


@dataclass(frozen=True)
class Bounds:
    """One probe's clean statistics and bounds at one sample size."""

    mean: float
    sd: float
    poisoned: float     # score >= this: likely poisoned
    clean: float        # score < this: no sign
    extrapolated: bool  # the size lies outside the calibrated sizes

    def z(self, score: float) -> float:
        """How many clean standard deviations ``score`` lies above the clean mean."""
        return (score - self.mean) / self.sd


@dataclass(frozen=True)
class Judgement:
    verdict: str
    score: float        # the deciding probe's score (or excess, with a reference)
    threshold: float    # its likely-poisoned bound
    clean_below: float  # its no-sign bound
    probe: str          # the deciding probe
    reason: str


def _tables(cal: dict) -> dict[int, dict]:
    """Calibration tables by class count (10: ``probes``; others: ``by_classes``)."""
    return {int(cal.get("classes", 10)): cal["probes"], **{int(k): t for k, t in cal.get("by_classes", {}).items()}}


def _stats(rows: dict, per_class: float) -> tuple[float, float]:
    """Clean mean and sd at ``per_class``, interpolated in log2 between the calibrated sizes."""
    sizes = sorted(int(s) for s in rows)
    logs = [math.log2(s) for s in sizes]
    t = math.log2(max(per_class, 1))
    means = [rows[str(s)]["mean"] for s in sizes]
    sds = [rows[str(s)]["sd"] for s in sizes]
    if t <= logs[0] or len(sizes) == 1:
        return means[0], sds[0]
    if t >= logs[-1]:  # beyond the largest size: the last segment's trend (clean scores rise with n)
        slope = (means[-1] - means[-2]) / (logs[-1] - logs[-2])
        return means[-1] + max(0.0, slope) * (t - logs[-1]), sds[-1]
    return float(np.interp(t, logs, means)), float(np.interp(t, logs, sds))


def bounds_for(probe: str, per_class: float, cal: dict | None = None, k: int | None = None) -> Bounds | None:
    """``probe``'s bounds at ``per_class`` images per class for ``k`` classes (default: the calibration's);
    None if the probe is not calibrated (for so few classes). Between calibrated class counts mean and sd are
    interpolated in log(k); above the largest count the largest count's table is used."""
    cal = cal or calibration()
    tables = {c: t[probe] for c, t in _tables(cal).items() if t.get(probe)}
    if not tables:
        return None
    counts = sorted(tables)
    k = k or int(cal.get("classes", 10))
    if k < counts[0]:  # fewer classes than any calibrated for this probe (e.g. the opt-in probe: 10 only)
        return None
    lower = max([c for c in counts if c <= k], default=counts[0])
    upper = min([c for c in counts if c >= k], default=counts[-1])
    m_lo, s_lo = _stats(tables[lower], per_class)
    if upper == lower:
        mean, sd = m_lo, s_lo
    else:
        m_hi, s_hi = _stats(tables[upper], per_class)
        w = (math.log(k) - math.log(lower)) / (math.log(upper) - math.log(lower))
        mean, sd = m_lo + w * (m_hi - m_lo), s_lo + w * (s_hi - s_lo)
    sizes = sorted(int(s) for s in tables[lower])
    policy = cal["policy"]
    sd = max(sd, policy["min_sd"])
    return Bounds(mean, sd, mean + policy["z_poisoned"] * sd, mean + policy["z_clean"] * sd,
                  extrapolated=not sizes[0] <= per_class <= sizes[-1] or k > counts[-1])


def _median_per_class(labels: np.ndarray, k: int) -> float:
    counts = np.bincount(labels, minlength=k)
    return float(np.median(counts))


def judge(scores: dict[str, float], labels: np.ndarray, k: int, cfg: ScanConfig,
          seen: dict[str, int] | None = None) -> tuple[Judgement, dict[str, dict]]:
    """The verdict on one sample, and each probe's bounds (``{probe: {mean, sd, poisoned, clean, z}}``)."""
    cal = calibration()
    n = _median_per_class(labels, k)
    table: dict[str, dict] = {}
    for name, score in scores.items():
        b = bounds_for(name, n, cal, k)
        if b is None and cfg.threshold is None:
            table[name] = {"calibrated": False}
            continue
        hi = cfg.threshold if cfg.threshold is not None else b.poisoned
        lo = min(cfg.clean_below if cfg.clean_below is not None else (b.clean if b else hi), hi)
        table[name] = {"calibrated": b is not None, "poisoned": hi, "clean": lo,
                       **({"clean_mean": b.mean, "clean_sd": b.sd, "z": b.z(score)} if b else {})}
    voting = {p: t for p, t in table.items() if "poisoned" in t}
    if not voting:
        raise ValueError(f"none of the probes {', '.join(scores)} has calibrated bounds; pass a threshold")

    def strength(p):  # how far above its clean range a probe's score is
        t = voting[p]
        return t.get("z", (scores[p] - t["poisoned"]) * 100)

    best = max(voting, key=strength)
    t = voting[best]
    caution = ""
    if k > max(_tables(cal)) and cfg.threshold is None:
        caution = (f" (the bounds were calibrated up to {max(_tables(cal))} classes, this sample has {k}: a "
                   "--reference of clean images of the same classes is the sound judge here)")
    what = (f"the {best} probe scores {scores[best]:.3f}"
            + (f", {t['z']:.1f} clean standard deviations above clean CIFAR-10 ({t['clean_mean']:.3f})"
               if "z" in t else ""))
    smallest = min(int(s) for s in cal["sizes"])
    if n < smallest:
        return Judgement(INCONCLUSIVE, scores[best], t["poisoned"], t["clean"], best,
                         f"too few images per class to judge (median {n:g}; at least {smallest} needed, "
                         f"{cal.get('needed_for_half_budget', 2 * smallest)} for weaker poisons); {what}"), table
    flagged = [p for p in voting if scores[p] >= voting[p]["poisoned"]]
    if flagged:
        best = max(flagged, key=strength)
        t = voting[best]
        what = (f"the {best} probe scores {scores[best]:.3f}"
                + (f", {t['z']:.1f} clean standard deviations above clean CIFAR-10 ({t['clean_mean']:.3f})"
                   if "z" in t else ""))
        others = [p for p in flagged if p != best]
        return Judgement(LIKELY_POISONED, scores[best], t["poisoned"], t["clean"], best,
                         what + ": the labels are learnable from a shortcut"
                         + (f" (also over its bound: {', '.join(others)})" if others else "") + caution), table
    if all(scores[p] < voting[p]["clean"] for p in voting):
        return Judgement(NO_SIGN, scores[best], t["poisoned"], t["clean"], best,
                         what + ": within the range of clean photos on every probe" + caution), table
    between = [p for p in voting if scores[p] >= voting[p]["clean"]]
    more = ""
    largest = max(int(s) for s in cal["sizes"])
    if seen and n < largest and min(seen.values()) > n:
        more = f"; a larger sample may decide (--per-class {min(largest, min(seen.values()))})"
    return Judgement(INCONCLUSIVE, scores[best], t["poisoned"], t["clean"], best,
                     what + f": between the clean and poisoned bounds ({', '.join(between)})" + more + caution), table


def judge_relative(scores: dict[str, float], ref_scores: dict[str, float], labels: np.ndarray, k: int,
                   cfg: ScanConfig) -> tuple[Judgement, dict[str, dict]]:
    """The verdict against a clean reference sampled alike: each probe's excess over the reference's score,
    against that probe's bounds for a difference of two clean samples (z * sqrt(2) * clean sd at this size)."""
    cal = calibration()
    n = _median_per_class(labels, k)
    policy = cal["policy"]
    table: dict[str, dict] = {}
    for p in scores:
        b = bounds_for(p, n, cal, k)
        if b is None and cfg.relative_threshold is None:
            table[p] = {"calibrated": False, "excess": scores[p] - ref_scores[p]}
            continue
        spread = math.sqrt(2) * b.sd if b else None
        hi = cfg.relative_threshold if cfg.relative_threshold is not None else policy["z_poisoned"] * spread
        lo = cfg.relative_clean_below if cfg.relative_clean_below is not None else (
            policy["z_clean"] * spread if b else hi)
        table[p] = {"calibrated": b is not None, "poisoned": hi, "clean": min(lo, hi),
                    "excess": scores[p] - ref_scores[p], **({"z": (scores[p] - ref_scores[p]) / spread} if b else {})}
    voting = {p: t for p, t in table.items() if "poisoned" in t}
    if not voting:
        raise ValueError(f"none of the probes {', '.join(scores)} has calibrated bounds; pass a threshold")

    def describe(p):
        t = voting[p]
        return (f"the {p} probe learns these labels {t['excess']:+.3f} better than on the clean reference "
                f"({scores[p]:.3f} vs {ref_scores[p]:.3f})")

    def strength(p):
        return voting[p].get("z", (voting[p]["excess"] - voting[p]["poisoned"]) * 100)

    best = max(voting, key=strength)
    smallest = min(int(s) for s in cal["sizes"])
    if n < smallest:
        verdict, reason = INCONCLUSIVE, (f"too few images per class to judge (median {n:g}; at least {smallest} "
                                         f"needed); {describe(best)}")
    elif any(voting[p]["excess"] >= voting[p]["poisoned"] for p in voting):
        verdict, reason = LIKELY_POISONED, describe(best) + ": the labels are learnable from a shortcut"
    elif all(voting[p]["excess"] < voting[p]["clean"] for p in voting):
        verdict, reason = NO_SIGN, describe(best) + ": no probe learns them better than on clean images"
    else:
        verdict, reason = INCONCLUSIVE, describe(best) + ": between the bounds"
    t = voting[best]
    return Judgement(verdict, t["excess"], t["poisoned"], t["clean"], best, reason), table
