"""What a scan found: ``ScanResult`` (verdict, evidence per probe and per group), its terminal summary, JSON
report and PNG plot."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..fsutil import atomic_path
from ..outputs import check_output_files
from .config import EXIT_CODES, INCONCLUSIVE, LIKELY_POISONED, NO_SIGN

__all__ = ["ScanResult"]


@dataclass
class ScanResult:
    """What a scan found. ``verdict`` is one of LIKELY_POISONED, NO_SIGN, INCONCLUSIVE.

    ``score``, ``threshold`` and ``clean_below`` are the deciding probe's (``best_probe``): its score and its
    bounds at this sample size. ``bounds`` has every probe's bounds and clean statistics; ``groups`` the
    per-group verdicts (one per shard, input or given group; each scored on its own sample); ``whole`` the
    verdict of the whole-input sample alone (the verdict is "likely poisoned" when it or any group is)."""

    verdict: str
    score: float
    threshold: float
    clean_below: float
    mode: str                   # "absolute" or "relative" (against a clean reference)
    reason: str
    classes: list[str]
    per_class_sampled: dict[str, int]
    seen: dict[str, int]
    probes: dict                # probe -> score, heldout_accuracy, class_recall, learning_curve
    null: dict                  # probe -> the same on shuffled labels (empty if not run)
    reference: dict | None      # the reference's probes, classes and sources, if one was given
    skipped: list[dict]
    sources: list[str]
    config: dict
    device: str
    seconds: dict
    best_probe: str = ""
    bounds: dict = field(default_factory=dict)      # probe -> {poisoned, clean, clean_mean, clean_sd, z}
    whole: dict = field(default_factory=dict)       # the whole-input sample's own verdict, score, probe
    groups: dict = field(default_factory=dict)      # group -> {verdict, score, probe, ...} or {"not_scored": why}

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def flagged_groups(self) -> list[str]:
        return [g for g, r in self.groups.items() if r.get("verdict") == LIKELY_POISONED]

    def to_dict(self) -> dict:
        from .. import __version__

        d = asdict(self)
        d["exit_code"] = self.exit_code
        d["version"] = __version__
        d["sources"] = self.sources if len(self.sources) <= 100 else self.sources[:100] + ["..."]
        return d

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(check_output_files({"report": path}, self._inputs(), "scan")["report"])
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def _inputs(self) -> list[str]:
        """What this scan read (its shards, and its reference's): never overwritten by the report or plot."""
        return [s for s in self.sources + (self.reference or {}).get("sources", []) if not s.startswith("<")]

    def summary(self) -> str:
        """A few lines for a terminal."""
        n = sum(self.per_class_sampled.values())
        if self.mode == "relative":
            head = (f"verdict: {self.verdict} (excess over the clean reference {self.score:.3f}; likely poisoned "
                    f"from {self.threshold:.2f}, no sign below {self.clean_below:.2f})")
        else:
            head = (f"verdict: {self.verdict} ({self.best_probe} score {self.score:.3f}; its bounds at this sample "
                    f"size: likely poisoned from {self.threshold:.3f}, no sign below {self.clean_below:.3f})")
        lines = [head, f"  {self.reason}"]
        if self.whole and self.whole.get("verdict") != self.verdict:
            lines.append(f"  whole-input sample alone: {self.whole['verdict']} ({self.whole['reason']})")
        lines.append(f"  {'probe':9s} {'score':>6s}  {'clean mean':>10s}  {'poisoned from':>13s}  "
                     "held-out accuracy by training images per class")
        for name, p in self.probes.items():
            b = self.bounds.get(name, {})
            curve = " ".join(f"{c['train_per_class']}:{c['heldout_accuracy']:.2f}" for c in p["learning_curve"])
            mean = f"{b['clean_mean']:.3f}" if "clean_mean" in b else "-"
            hi = f"{b['poisoned']:.3f}" if "poisoned" in b else "(not calibrated)"
            line = f"  {name:9s} {p['score']:6.3f}  {mean:>10s}  {hi:>13s}  {curve}"
            if self.reference:
                line += f"  (clean reference score {self.reference['probes'][name]['score']:.3f})"
            lines.append(line)
        if self.groups:
            lines.append(self._groups_line())
            for g, r in self.groups.items():
                if "verdict" in r:
                    lines.append(f"    {r['verdict']:>33s}  {r['probe']} {r['score']:.3f} (from {r['threshold']:.3f})"
                                 f"  {g}")
                else:
                    lines.append(f"    {'not scored':>33s}  {r['not_scored']}  {g}")
        lines.append(f"  {n} images sampled from {len(self.classes)} classes "
                     f"({min(self.per_class_sampled.values())}-{max(self.per_class_sampled.values())} per class), "
                     f"{len(self.skipped)} skipped, {self.seconds['total']:.1f} s on {self.device}")
        lines.extend(f"  {line}" for line in self.next_steps())
        return "\n".join(lines)

    def next_steps(self) -> list[str]:
        """What to do about a "likely poisoned" verdict (none otherwise): the default defense, and class-wise
        deblurring where the spectrum probe also scores in its poisoned range (it does for class-wise noise too, but
        a class-wise filter such as CUDA is only undone by deblurring, whose gate leaves other classes alone;
        docs/purify.md, "Class-wise deblurring")."""
        if self.verdict != LIKELY_POISONED:
            return []
        steps = ["next: `eclipse-stream purify IN OUT`, then train on OUT with the default training-time "
                 "corruption (`eclipse_stream.RandomCorruption()`); README, \"Does it work?\""]
        spec, bound = self.probes.get("spectrum", {}).get("score"), self.bounds.get("spectrum", {}).get("poisoned")
        if spec is not None and bound is not None and spec >= bound:
            steps.append(f"the spectrum probe scores {spec:.3f} (poisoned from {bound:.3f}): the classes' spectra "
                         "differ, as under class-wise noise or a class-wise filter (e.g. CUDA's blurs); purification "
                         "does not undo a filter: `purify` deblurs such classes by default when its denoiser records "
                         "this dataset's clean class spectra (`train` on the labelled sparse set does; it warns which "
                         "classes it deblurred), otherwise run `eclipse-stream fit-kernels IN --clean CLEAN -o "
                         "kernels.json` (it leaves classes that are not blurred alone) and `purify --class-kernels "
                         "kernels.json`")
        return steps

    def _groups_line(self) -> str:
        counts: dict[str, int] = {}
        for r in self.groups.values():
            key = r.get("verdict", "not scored")
            counts[key] = counts.get(key, 0) + 1
        per = self.config.get("group_per_class")
        parts = ", ".join(f"{c} {v}" for v, c in counts.items())
        return f"  by {self.config.get('by')} ({len(self.groups)} groups, {per} images per class each): {parts}"

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG: held-out learning curves (and the reference / shuffled-label curves), per-class recall."""
        path = Path(check_output_files({"plot": path}, self._inputs(), "scan")["plot"])
        image = _draw_plot(self)
        with atomic_path(path) as tmp:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            tmp.write_bytes(buf.getvalue())
        return path


# --------------------------------------------------------------------------------------------- plot

_COLOURS = {"pixels": (31, 119, 180), "texture": (214, 39, 40), "blocks": (44, 160, 44),
            "spectrum": (148, 103, 189), "colour": (140, 86, 75), "learning": (227, 119, 194)}


def _draw_plot(result: ScanResult):
    """Two panels drawn with PIL (no plotting library needed): learning curves, per-class recall."""
    from PIL import Image, ImageDraw

    w, h = 1100, 470
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    colour = {LIKELY_POISONED: (200, 0, 0), NO_SIGN: (0, 130, 0), INCONCLUSIVE: (200, 120, 0)}[result.verdict]
    groups = result.flagged_groups()
    d.text((12, 8), f"{result.verdict.upper()}   {result.best_probe} score {result.score:.3f} "
                    f"({'excess over the clean reference' if result.mode == 'relative' else 'absolute'}); "
                    f"likely poisoned >= {result.threshold:.2f}, no sign < {result.clean_below:.2f}"
                    + (f"; groups flagged {len(groups)}, scored {sum('verdict' in g for g in result.groups.values())}"
                       f" of {len(result.groups)}" if result.groups else ""),
           fill=colour)
    d.text((12, 24), result.reason[:180], fill=(60, 60, 60))
    k = len(result.classes)
    chance = 1 / k

    # panel 1: held-out balanced accuracy vs training images per class (log2 axis)
    x0, y0, x1, y1 = 60, 64, 560, 400
    d.rectangle((x0, y0, x1, y1), outline="black")
    curves = {name: p["learning_curve"] for name, p in result.probes.items()}
    sizes = sorted({c["train_per_class"] for cs in curves.values() for c in cs})
    lo, hi = math.log2(max(1, sizes[0])), math.log2(max(2, sizes[-1]))

    def px(m, a):
        t = 0.5 if hi == lo else (math.log2(max(1, m)) - lo) / (hi - lo)
        return x0 + (x1 - x0) * t, y1 - (y1 - y0) * a

    for a in (0, 0.25, 0.5, 0.75, 1.0):
        d.line((x0 - 4, px(sizes[0], a)[1], x0, px(sizes[0], a)[1]), fill="black")
        d.text((x0 - 34, px(sizes[0], a)[1] - 6), f"{a:.2f}", fill="black")
    for m in sizes:
        d.text((px(m, 0)[0] - 6, y1 + 4), str(m), fill="black")
    d.text(((x0 + x1) / 2 - 80, y1 + 18), "training images per class (held-out: cross-validated)", fill="black")
    d.text((x0, y0 - 14), "held-out balanced accuracy", fill="black")
    _dashed(d, [(x0, px(sizes[0], chance)[1]), (x1, px(sizes[0], chance)[1])], (120, 120, 120))
    d.text((x1 - 48, px(sizes[0], chance)[1] - 12), "chance", fill=(120, 120, 120))
    if result.mode == "absolute":
        level = chance + result.threshold * (1 - chance)
        _dashed(d, [(x0, px(sizes[0], level)[1]), (x1, px(sizes[0], level)[1])], (200, 0, 0))
        d.text((x1 - 220, px(sizes[0], level)[1] - 12), f"{result.best_probe}'s bound (last point)", fill=(200, 0, 0))
    legend_y = y0 + 6
    for name, curve in curves.items():
        c = _COLOURS.get(name, (0, 0, 0))
        points = [px(p["train_per_class"], p["heldout_accuracy"]) for p in curve]
        d.line(points, fill=c, width=3) if len(points) > 1 else d.ellipse(_dot(points[0]), fill=c)
        d.text((x0 + 8, legend_y), f"{name}, this data: score {result.probes[name]['score']:.2f}", fill=c)
        legend_y += 14
        other = (result.reference or {}).get("probes", {}).get(name) or result.null.get(name)
        if other:
            what = "clean reference" if result.reference else "labels shuffled"
            _dashed(d, [px(p["train_per_class"], p["heldout_accuracy"]) for p in other["learning_curve"]], c)
            d.text((x0 + 8, legend_y), f"{name}, {what} (dashed): score {other['score']:.2f}", fill=c)
            legend_y += 14

    # panel 2: per-class held-out recall of the deciding probe
    best = result.best_probe
    recalls = result.probes[best]["class_recall"]
    ref_recalls = (result.reference or {}).get("probes", {}).get(best, {}).get("class_recall")
    bx0, by0, bx1, by1 = 620, 64, 1080, 400
    d.rectangle((bx0, by0, bx1, by1), outline="black")
    d.text((bx0, by0 - 14), f"per-class held-out recall, {best} probe"
                            + (" (grey: clean reference)" if ref_recalls else ""), fill="black")
    slot = (bx1 - bx0) / max(1, k)
    for i, r in enumerate(recalls):
        r = 0.0 if math.isnan(r) else r
        left = bx0 + i * slot + slot * 0.15
        right = bx0 + (i + 1) * slot - slot * 0.15
        if ref_recalls and i < len(ref_recalls):
            mid = (left + right) / 2
            rr = 0.0 if math.isnan(ref_recalls[i]) else ref_recalls[i]
            d.rectangle((mid, by1 - (by1 - by0) * rr, right, by1), fill=(170, 170, 170))
            right = mid
        d.rectangle((left, by1 - (by1 - by0) * r, right, by1), fill=_COLOURS.get(best, (0, 0, 0)))
        if k <= 20:
            d.text((bx0 + i * slot + 2, by1 + 4), result.classes[i][:max(1, int(slot / 6))], fill="black")
    cy = by1 - (by1 - by0) * chance
    _dashed(d, [(bx0, cy), (bx1, cy)], (120, 120, 120))
    n = sum(result.per_class_sampled.values())
    d.text((12, h - 22), f"{n} images, {k} classes, {result.config['folds']}-fold, seed {result.config['seed']}, "
                         f"view {result.config['view']} {result.config['probe_size']}px, device {result.device}; "
                         f"{len(result.skipped)} skipped", fill=(60, 60, 60))
    return img


def _dot(p, r: float = 3.0):
    return (p[0] - r, p[1] - r, p[0] + r, p[1] + r)


def _dashed(d, points, fill, dash: float = 6.0) -> None:
    for (ax, ay), (bx, by) in zip(points, points[1:]):
        length = math.hypot(bx - ax, by - ay)
        steps = max(1, int(length / dash))
        for s in range(0, steps, 2):
            t0, t1 = s / steps, min(1.0, (s + 1) / steps)
            d.line((ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                   fill=fill, width=2)
