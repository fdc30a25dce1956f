"""``python -m tools.scan_calibration``: calibrate ``eclipse-stream scan`` on clean data and measure it.

Subcommands (each caches every probe score it computes in ``runs/scan-cal/scores.jsonl``, keyed by data set,
images per class, seed, probe and the probe's code, so a rerun only computes what is new):

* ``clean``: every probe's score on ``--subsets`` clean CIFAR-10 subsets at 25, 50, 100 and 200 images per
  class, drawn by the scan's own seeded sampling from the *calibration pool* (training images 1000-4999 of every
  class, disjoint from the poisoned sets, which are made from the first 1000); ``--write`` stores their mean and
  standard deviation with the false-positive policy in ``eclipse_stream/scan/calibration.json``. No poisoned
  image is used.
* ``validate``: false positives of the shipped calibration on other clean data: subsets of the first 1000
  training images per class, of the test split, and of the test split processed the same way for every class
  (JPEG quality 75, a Gaussian blur, grayscale, resize 32 -> 64 -> 32).
* ``families``: the verdict on every poison family at every size (seeds 0, 1, 2), and the leave-one-family-out
  probe selection; ``--purified KIND=DIR`` adds purified sets.
* ``report``: docs/results/scan-calibration.{json,md} from the cache (the verdicts are recomputed from the
  cached scores with the shipped calibration).

The verdict logic used here is the library's (``eclipse_stream.scan.verdict.judge``) on the library's probes
(``eclipse_stream.scan.probes``) of the library's sample (``sampling.sample_arrays``): what a user's scan of the
same images does.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import torch

from eclipse_stream.scan import probes as probe_module
from eclipse_stream.scan.config import INCONCLUSIVE, LIKELY_POISONED, NO_SIGN, ScanConfig
from eclipse_stream.scan.probes import DEFAULT, PROBES, THOROUGH, ProbeData
from eclipse_stream.scan.sampling import sample_arrays
from eclipse_stream.scan.verdict import CALIBRATION_FILE, calibration, judge, judge_relative

from .common import (
    CLASS_INDEX,
    PROJECT_ROOT,
    decode_image,
    git_commit,
    iter_cifar_tar,
    provenance,
    read_split,
    resolve_data_dir,
    write_json,
)

WORK = PROJECT_ROOT / "runs" / "scan-cal"
SIZES = (25, 50, 100, 200)
#: The false-positive policy: a probe flags a set at 4 clean standard deviations above the clean mean (one-sided
#: Gaussian tail 3e-5 per probe) and calls it clean below 3 (0.13% per probe of clean sets inconclusive); no probe's
#: sd counts as less than 0.025, i.e. a probe must rise at least 0.10 above clean photos to flag a set. The first
#: policy (min_sd 0.01, fixed before any poisoned set was scored) flagged 16 of 20 clean test subsets blurred
#: (sigma 1) at 200 per class: the blur lifts the pixels probe from 0.04 to 0.08-0.11, a tight distribution's
#: 4-6 sd. The floor was raised on that evidence alone (before TAP, EM or SEP had been scored) and the
#: processing check repeated on other images (docs/scan.md).
POLICY = {"z_poisoned": 4.0, "z_clean": 3.0, "min_sd": 0.025}
POOL_START = 1000  # the calibration pool: training images POOL_START.. of each class (the poisons use the first 1000)
FAMILIES = ("urp", "lsp", "ar", "ops", "em", "cuda", "tap", "sep")
GENERATED = ("urp", "lsp", "ar", "ops")  # seconds to make: made here in memory, as the driver makes them
#: Families whose scores shaped a probe or a bound of the shipped scan (docs/scan.md says how): the first three
#: probes were chosen on URP, LSP, AR and OPS, the spectrum probe after CUDA's scores; the probes and the policy were
#: frozen (bb4054d) before TAP, EM or SEP were scored.
#: (The scan's own split: which families shaped the *scan*. Which ones shaped the *defense's* defaults is
#: tools/families.py; the two differ, e.g. EM is tuned on for the defense and held out for the scan.)
TUNED_ON = {"urp": True, "lsp": True, "ar": True, "ops": True, "cuda": True, "tap": False, "em": False, "sep": False}
PROCESSING = ("jpeg75", "blur", "gray", "resize")
CLASS_COUNTS = (2, 5, 10)  # class counts calibrated (a set of another count uses the nearest, see verdict.py)
MIN_RUNS = 20  # clean subsets a probe needs at a size before it has bounds there


# --------------------------------------------------------------------------------------------- data


def cifar(split: str, data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All of a CIFAR-10 split, class by class, lowest file numbers first (decoded once, cached as .npz)."""
    path = WORK / f"cifar-{split}.npz"
    if not path.is_file():
        items = iter_cifar_tar(resolve_data_dir(data_dir) / f"{split}.tar.gz")
        images = np.stack([decode_image(b) for _, _, b in items])
        labels = np.array([CLASS_INDEX[c] for c, _, _ in items], dtype=np.int64)
        WORK.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=images, labels=labels)
    z = np.load(path)
    return z["images"], z["labels"]


def per_class_slice(images, labels, start: int, stop: int | None):
    idx = np.concatenate([np.flatnonzero(labels == c)[start:stop] for c in np.unique(labels)])
    return images[idx], labels[idx]


def processed(kind: str, images: np.ndarray) -> np.ndarray:
    """The same processing for every image: JPEG q75, Gaussian blur (sigma 1), grayscale, or 32 -> 64 -> 32."""
    from PIL import Image, ImageFilter

    def jpeg(im):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=75)
        return Image.open(io.BytesIO(buf.getvalue()))

    op = {"jpeg75": jpeg, "blur": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
          "gray": lambda im: im.convert("L"),
          "resize": lambda im: im.resize((64, 64), Image.BILINEAR).resize((32, 32), Image.BILINEAR)}[kind]
    return np.stack([np.asarray(op(Image.fromarray(im)).convert("RGB")) for im in images])


def family_set(kind: str, poisoned_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """A poisoned CPU-protocol set (the first 1000 training images per class): URP/LSP/AR/OPS made here at
    their documented budgets (``-half``: half of it) with seed 0, as ``tools.poisons.driver`` makes them; the
    others read from ``poisoned_root/<kind>`` (``python -m tools.evaluate poison``)."""
    base, _, half = kind.partition("-")
    if base in GENERATED:
        path = WORK / f"poison-{kind}.npz"
        if not path.is_file():
            from tools.poisons import POISONS
            from tools.poisons.base import Budget, quantize

            clean, labels = per_class_slice(*cifar("train"), 0, POOL_START)
            module = POISONS[base]
            if not half:
                poisoned = quantize(clean, module.generate(clean, labels, seed=0), module.BUDGET)
            elif base == "ops":  # an L0 budget: the same pixel, moved half way to the class colour
                poisoned = quantize(clean, module.generate(clean, labels, seed=0) * 0.5, module.BUDGET)
            else:
                eps = module.BUDGET.eps / 2
                poisoned = quantize(clean, module.generate(clean, labels, seed=0, eps=eps),
                                    Budget(module.BUDGET.norm, eps))
            np.savez(path, images=poisoned, labels=labels)
        z = np.load(path)
        return z["images"], z["labels"]
    folder = poisoned_root / kind
    if not (folder / "norms.json").is_file():
        raise click.ClickException(f"{folder}: no finished poisoned set (norms.json marks one)")
    _, images, labels = read_split(folder)
    return images, labels


def shard_set(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    _, images, labels = read_split(folder)
    return images, labels


# --------------------------------------------------------------------------------------------- scores


def probe_hash(name: str) -> str:
    """The code a probe's score depends on: its function, the module's functions and constants it reaches."""
    module = vars(probe_module)
    seen: dict[str, str] = {}

    def walk(code) -> None:
        for ref in code.co_names:
            obj = module.get(ref)
            if ref in seen or obj is None:
                continue
            if inspect.isfunction(obj) and obj.__module__ == probe_module.__name__:
                seen[ref] = inspect.getsource(obj)
                walk(obj.__code__)
            elif isinstance(obj, (int, float, str, tuple)):
                seen[ref] = repr(obj)
        for const in code.co_consts:
            if inspect.iscode(const):
                walk(const)

    fn = PROBES[name]
    seen[name] = inspect.getsource(fn)
    walk(fn.__code__)
    return hashlib.sha256("".join(f"{k}\n{v}" for k, v in sorted(seen.items())).encode()).hexdigest()[:10]


class Cache:
    """Probe scores by (set, images per class, seed, probe, probe code), appended to a JSON-lines file."""

    def __init__(self, path: Path = WORK / "scores.jsonl"):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    @staticmethod
    def key(set_name: str, n: int, seed: int, probe: str) -> str:
        return f"{set_name}|{n}|{seed}|{probe}|{probe_hash(probe)}"

    def get(self, set_name: str, n: int, seed: int, probe: str) -> dict | None:
        return self.rows.get(self.key(set_name, n, seed, probe))

    def scores(self, set_name, n, seed, names, images=None, labels=None) -> dict[str, float]:
        """Every probe's score on this set's seeded sample, computed (and cached) where missing."""
        missing = [p for p in names if self.get(set_name, n, seed, p) is None]
        if missing:
            if images is None:
                raise KeyError(f"{set_name} n={n} seed={seed}: not cached and no images given")
            images, labels = images() if callable(images) else (images, labels)
            cfg = ScanConfig(per_class=n, seed=seed, null=False, by="none")
            sampled = sample_arrays(images, labels, cfg).whole
            x = torch.from_numpy(sampled.images).permute(0, 3, 1, 2).double().div(255)
            data = ProbeData(x, sampled.labels, len(sampled.classes), cfg.folds, cfg.seed)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                for p in missing:
                    t0 = time.perf_counter()
                    score = PROBES[p](data)["score"]
                    row = {"key": self.key(set_name, n, seed, p), "score": score,
                           "seconds": round(time.perf_counter() - t0, 3)}
                    self.rows[row["key"]] = row
                    f.write(json.dumps(row) + "\n")
        return {p: self.get(set_name, n, seed, p)["score"] for p in names}


def verdict_of(scores: dict[str, float], n: int, probes=None, k: int = 10) -> tuple[str, str, float]:
    """The library's verdict on one sample of n per class of k classes: (verdict, deciding probe, its score)."""
    scores = {p: s for p, s in scores.items() if probes is None or p in probes}
    labels = np.repeat(np.arange(k), n)
    j, _ = judge(scores, labels, k, ScanConfig(per_class=n, null=False, by="none"))
    return j.verdict, j.probe, j.score


def _probe_names(thorough: bool, probes: str | None) -> tuple[str, ...]:
    if probes:
        return tuple(probes.split(","))
    return DEFAULT + (THOROUGH if thorough else ())


def _log(msg: str) -> None:
    click.echo(msg, err=True)


# --------------------------------------------------------------------------------------------- commands


@click.group(help=__doc__)
def main() -> None:
    torch.set_num_threads(1)


def class_subset(k: int, seed: int) -> np.ndarray:
    """The classes of a k-class subset (seeded per subset): a dataset of fewer classes than CIFAR-10."""
    return np.sort(np.random.default_rng([1000, k, seed]).choice(10, size=k, replace=False))


def pool_name(k: int) -> str:
    return "pool" if k == 10 else f"pool-k{k}"


def with_classes(load, k: int, seed: int):
    """A loader of only the seed's k classes (all of them for k = 10)."""
    if k == 10:
        return load

    def sub():
        images, labels = load()
        keep = np.isin(labels, class_subset(k, seed))
        return images[keep], labels[keep]
    return sub


@main.command()
@click.option("--subsets", type=int, default=40, show_default=True, help="Clean subsets per size.")
@click.option("--sizes", default=",".join(map(str, SIZES)), show_default=True)
@click.option("--classes", "class_counts", default="10", show_default=True,
              help="Class counts to calibrate (fewer than 10: a seeded random choice of classes per subset).")
@click.option("--probes", default=None, help="Comma-separated probes [default: the default set].")
@click.option("--thorough", is_flag=True, help="Also the opt-in probes.")
@click.option("--write", is_flag=True, help="Write eclipse_stream/scan/calibration.json from the scores.")
def clean(subsets, sizes, class_counts, probes, thorough, write):
    """Probe scores on clean subsets of the calibration pool; --write stores the calibration."""
    names = _probe_names(thorough, probes)
    cache = Cache()
    pool = None

    def load():
        nonlocal pool
        pool = pool or per_class_slice(*cifar("train"), POOL_START, None)
        return pool

    for k in [int(c) for c in class_counts.split(",")]:
        for n in [int(s) for s in sizes.split(",")]:
            t0 = time.time()
            for seed in range(subsets):
                cache.scores(pool_name(k), n, seed, names, with_classes(load, k, seed))
            _log(f"clean k={k} n={n}: {subsets} subsets ({time.time() - t0:.0f} s)")
    if write:
        write_calibration(cache, subsets)


def write_calibration(cache: Cache, subsets: int) -> dict:
    """calibration.json from the cached clean-pool scores: per class count, probe and size with MIN_RUNS+ runs."""
    tables: dict[str, dict] = {}
    sizes_seen: set[int] = set()
    for k in CLASS_COUNTS:
        table: dict[str, dict] = {}
        for p in PROBES:
            rows = {}
            for n in SIZES:
                got = [g for g in (cache.get(pool_name(k), n, s, p) for s in range(subsets)) if g]
                if len(got) >= MIN_RUNS:  # the slow opt-in probe is calibrated on fewer subsets than the others
                    scores = np.array([g["score"] for g in got])
                    rows[str(n)] = {"mean": round(float(scores.mean()), 5),
                                    "sd": round(float(scores.std(ddof=1)), 5),
                                    "max": round(float(scores.max()), 5), "runs": len(scores)}
                    sizes_seen.add(n)
            if rows:
                table[p] = rows
        if table:
            tables[str(k)] = table
    cal = {"version": 2, "classes": 10, "folds": ScanConfig().folds, "probe_size": ScanConfig().probe_size,
           "sizes": sorted(sizes_seen), "needed_for_half_budget": 50, "policy": POLICY,
           "data": (f"CIFAR-10 training split, images {POOL_START}-4999 of every class (JPEG q75 as shipped); "
                    f"up to {subsets} subsets per size (runs: how many) drawn by the scan's own seeded sampling; "
                    "fewer classes: a seeded random choice of classes per subset"),
           "made_by": f"python -m tools.scan_calibration clean --subsets {subsets} --classes "
                      f"{','.join(tables)} --write",
           "commit": git_commit(), "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "probes": tables["10"], "by_classes": {k: t for k, t in tables.items() if k != "10"}}
    CALIBRATION_FILE.write_text(json.dumps(cal, indent=1) + "\n")
    calibration.cache_clear()
    _log(f"wrote {CALIBRATION_FILE}: {', '.join(f'{p} ({len(r)} sizes)' for p, r in tables['10'].items())}; "
         f"class counts {', '.join(tables)}")
    return cal


VALIDATION_SEED = 100  # class choices of the k-class validation subsets: other seeds than the calibration's


def set_classes(set_name: str) -> int:
    return int(set_name.rsplit("-k", 1)[1]) if "-k" in set_name else 10


def _validation_sets():
    """(name, loader) of the clean validation sets; ``test-kK``: K classes of the test split, chosen per subset."""
    def first():
        return per_class_slice(*cifar("train"), 0, POOL_START)

    sets = [("train-first1000", first), ("test", lambda: cifar("test"))]
    sets += [(f"test-k{k}", lambda: cifar("test")) for k in CLASS_COUNTS if k != 10]
    for kind in PROCESSING:  # the processing check repeated on other images after the policy's revision
        def load_first(kind=kind):
            path = WORK / f"first1000-{kind}.npz"
            if not path.is_file():
                images, labels = first()
                np.savez(path, images=processed(kind, images), labels=labels)
            z = np.load(path)
            return z["images"], z["labels"]
        sets.append((f"train-first1000-{kind}", load_first))
    for kind in PROCESSING:
        def load(kind=kind):
            images, labels = cifar("test")
            path = WORK / f"test-{kind}.npz"
            if not path.is_file():
                np.savez(path, images=processed(kind, images), labels=labels)
            z = np.load(path)
            return z["images"], z["labels"]
        sets.append((f"test-{kind}", load))
    return sets


@main.command()
@click.option("--subsets", type=int, default=20, show_default=True)
@click.option("--sizes", default=",".join(map(str, SIZES)), show_default=True)
@click.option("--probes", default=None)
@click.option("--thorough", is_flag=True)
@click.option("--only", default=None, help="Comma-separated validation set names.")
def validate(subsets, sizes, probes, thorough, only):
    """Verdicts on clean validation sets (false positives)."""
    names = _probe_names(thorough, probes)
    cache = Cache()
    for set_name, load in _validation_sets():
        if only and set_name not in only.split(","):
            continue
        data = None

        def loader(load=load):
            nonlocal data
            data = data or load()
            return data

        k = set_classes(set_name)
        for n in [int(s) for s in sizes.split(",")]:
            verdicts = []
            for seed in range(subsets):
                scores = cache.scores(set_name, n, seed, names, with_classes(loader, k, VALIDATION_SEED + seed))
                verdicts.append(verdict_of(scores, n, k=k)[0])
            _log(f"{set_name} n={n}: {verdicts.count(LIKELY_POISONED)} flagged, {verdicts.count(INCONCLUSIVE)} "
                 f"inconclusive of {subsets}")


@main.command()
@click.option("--families", default=",".join(FAMILIES), show_default=True)
@click.option("--seeds", type=int, default=3, show_default=True)
@click.option("--sizes", default=",".join(map(str, SIZES)), show_default=True)
@click.option("--probes", default=None)
@click.option("--thorough", is_flag=True)
@click.option("--poisoned-root", type=click.Path(path_type=Path), show_default=True,
              default=PROJECT_ROOT / "runs" / "eval-cpu" / "poisoned",
              help="Folder of finished poisoned sets (<kind>/norms.json).")
@click.option("--purified", multiple=True, help="NAME=DIR: a purified set (shards) to score as NAME.")
def families(families, seeds, sizes, probes, thorough, poisoned_root, purified):
    """Probe scores and verdicts on poisoned (and purified) sets."""
    names = _probe_names(thorough, probes)
    cache = Cache()
    jobs = [(k, lambda k=k: family_set(k, poisoned_root)) for k in families.split(",") if k]
    jobs += [(name, lambda d=d: shard_set(Path(d))) for name, _, d in (p.partition("=") for p in purified)]
    for set_name, load in jobs:
        data = None

        def loader(load=load):
            nonlocal data
            data = data or load()
            return data

        for n in [int(s) for s in sizes.split(",")]:
            out = []
            for seed in range(seeds):
                scores = cache.scores(set_name, n, seed, names, loader)
                out.append(verdict_of(scores, n))
            _log(f"{set_name} n={n}: " + "; ".join(f"{v} ({p} {s:.3f})" for v, p, s in out))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=PROJECT_ROOT / "docs" / "results" / "scan-calibration",
              show_default=True, help="Writes OUT.json and OUT.md.")
@click.option("--clean-subsets", type=int, default=20)
@click.option("--seeds", type=int, default=3)
@click.option("--purified", multiple=True, help="NAME=FAMILY: a purified set scored by `families --purified`.")
def report(out, clean_subsets, seeds, purified):
    """Tables from the cached scores (nothing is computed): false positives, detection, leave-one-family-out."""
    cache = Cache()
    cal = calibration()
    names = tuple(p for p in DEFAULT if p in cal["probes"])
    result = {"environment": {**provenance("cpu"), "policy": cal["policy"], "calibration": cal["made_by"],
                              "calibration_commit": cal["commit"], "probes": list(names),
                              "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
              "clean": [], "families": [], "lofo": [], "purified": []}
    for set_name, _ in _validation_sets():
        for n in SIZES:
            rows = [cache.get(set_name, n, s, p) for s in range(clean_subsets) for p in names]
            if not all(rows):
                continue
            k = set_classes(set_name)
            verdicts = [verdict_of(cache.scores(set_name, n, s, names), n, k=k) for s in range(clean_subsets)]
            result["clean"].append({"set": set_name, "classes": k, "per_class": n, "subsets": clean_subsets,
                                    "false_positives": sum(v[0] == LIKELY_POISONED for v in verdicts),
                                    "inconclusive": sum(v[0] == INCONCLUSIVE for v in verdicts),
                                    "max_z": round(max(_max_z(cache.scores(set_name, n, s, names), n, k)
                                                       for s in range(clean_subsets)), 2)})
    fam_scores: dict[tuple[str, int], list[dict]] = {}
    for kind in [*FAMILIES, *(f"{k}-half" for k in GENERATED)]:
        for n in SIZES:
            got = [[cache.get(kind, n, s, p) for p in names] for s in range(seeds)]
            if not all(all(g) for g in got):
                continue
            scores = [cache.scores(kind, n, s, names) for s in range(seeds)]
            fam_scores[(kind, n)] = scores
            verdicts = [verdict_of(sc, n) for sc in scores]
            result["families"].append({
                "family": kind, "per_class": n, "tuned_on": TUNED_ON.get(kind.split("-")[0], False),
                "flagged": sum(v[0] == LIKELY_POISONED for v in verdicts), "runs": len(verdicts),
                "inconclusive": sum(v[0] == INCONCLUSIVE for v in verdicts),
                "verdicts": [v[0] for v in verdicts], "scores": [round(v[2], 3) for v in verdicts],
                "probes": [v[1] for v in verdicts],
                "probe_scores": {p: [round(sc[p], 3) for sc in scores] for p in names}})
    result["lofo"] = leave_one_family_out(fam_scores, names)
    result["reference"] = []  # --reference: the clean test split's subset of the same seed and size as reference
    for set_name in ["train-first1000", *FAMILIES]:
        runs = clean_subsets if set_name == "train-first1000" else seeds
        for n in SIZES:
            pairs = [(cache.scores(set_name, n, s, names), cache.scores("test", n, s, names)) for s in range(runs)
                     if all(cache.get(set_name, n, s, p) and cache.get("test", n, s, p) for p in names)]
            if len(pairs) == runs:
                labels = np.repeat(np.arange(10), n)
                js = [judge_relative(a, b, labels, 10, ScanConfig(per_class=n, by="none"))[0] for a, b in pairs]
                result["reference"].append({"set": set_name, "per_class": n, "runs": runs,
                                            "flagged": sum(j.verdict == LIKELY_POISONED for j in js),
                                            "inconclusive": sum(j.verdict == INCONCLUSIVE for j in js),
                                            "excess": [round(j.score, 3) for j in js[:3]],
                                            "probes": sorted({j.probe for j in js})})
    result["thorough"] = []
    for p in (t for t in THOROUGH if t in cal["probes"]):
        for set_name in [*FAMILIES, "test", "test-blur"]:
            for n in SIZES:
                runs = [r for r in (cache.get(set_name, n, s, p) for s in range(clean_subsets)) if r]
                if runs:
                    verdicts = [verdict_of({p: r["score"]}, n)[0] for r in runs]
                    result["thorough"].append({"probe": p, "set": set_name, "per_class": n, "runs": len(runs),
                                               "flagged_alone": verdicts.count(LIKELY_POISONED),
                                               "scores": [round(r["score"], 3) for r in runs[:3]],
                                               "seconds_each": round(float(np.mean([r["seconds"] for r in runs])), 1)})
    for item in purified:
        name, _, family = item.partition("=")
        for n in SIZES:
            before = [cache.get(family, n, 0, p) for p in names]
            after = [cache.get(name, n, 0, p) for p in names]
            if all(before) and all(after):
                vb = verdict_of(cache.scores(family, n, 0, names), n)
                va = verdict_of(cache.scores(name, n, 0, names), n)
                result["purified"].append({"family": family, "set": name, "per_class": n,
                                           "before": {"verdict": vb[0], "probe": vb[1], "score": round(vb[2], 3)},
                                           "after": {"verdict": va[0], "probe": va[1], "score": round(va[2], 3)}})
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    _log(f"wrote {out}.json and {out}.md")


def _max_z(scores: dict[str, float], n: int, k: int = 10) -> float:
    from eclipse_stream.scan.verdict import bounds_for

    return max(bounds_for(p, n, k=k).z(s) for p, s in scores.items())


def caught(scores: list[dict], n: int, probe: str) -> bool:
    """Does ``probe`` alone flag the family in most of its scans at this size?"""
    verdicts = [verdict_of({probe: sc[probe]}, n)[0] for sc in scores]
    return verdicts.count(LIKELY_POISONED) * 2 > len(verdicts)


def select_probes(fam_scores: dict, families: list[str], names: tuple[str, ...]) -> list[str]:
    """The selection rule: greedily add the probe that newly catches the most (family, size >= 50) cells of the
    tuning families, ties to the earlier (cheaper) probe in the default order, until none adds one."""
    cells = [(f, n) for (f, n) in fam_scores if f in families and n >= 50]
    covered: set = set()
    chosen: list[str] = []
    while True:
        gains = {p: {c for c in cells if c not in covered and caught(fam_scores[c], c[1], p)}
                 for p in names if p not in chosen}
        best = max(gains, key=lambda p: (len(gains[p]), -names.index(p)), default=None)
        if best is None or not gains[best]:
            return chosen
        chosen.append(best)
        covered |= gains[best]


def leave_one_family_out(fam_scores: dict, names: tuple[str, ...]) -> list[dict]:
    """For each family: the probes the rule selects without it, and its verdicts under those probes."""
    fams = sorted({f for f, _ in fam_scores}, key=lambda f: [*FAMILIES, *(f"{k}-half" for k in GENERATED)].index(f))
    rows = []
    for held in fams:  # a family's half-budget variant is held out with it
        chosen = select_probes(fam_scores, [f for f in fams if f.split("-")[0] != held.split("-")[0]], names)
        for (f, n), scores in sorted(fam_scores.items(), key=lambda kv: kv[0][1]):
            if f != held:
                continue
            verdicts = [verdict_of(sc, n, chosen)[0] if chosen else INCONCLUSIVE for sc in scores]
            rows.append({"held_out": held, "per_class": n, "probes_selected_without_it": chosen,
                         "flagged": verdicts.count(LIKELY_POISONED), "runs": len(verdicts)})
    return rows


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = ["# `eclipse-stream scan`: calibration, false positives, detection", "",
             f"Commit {env['git_commit']}, {env['device']}, torch {env['torch']}; probes {', '.join(env['probes'])}; "
             f"policy {env['policy']} (calibration: `{env['calibration']}` at {env['calibration_commit']}). "
             "Tables made by `python -m tools.scan_calibration report` from the cached scores.", "",
             "## Clean data (false positive = 'likely poisoned')", "",
             "| set | images/class | subsets | false positives | inconclusive | largest z |",
             "|---|---|---|---|---|---|"]
    for c in r["clean"]:
        lines.append(f"| {c['set']} | {c['per_class']} | {c['subsets']} | {c['false_positives']} | "
                     f"{c['inconclusive']} | {c['max_z']} |")
    lines += ["", "## Poisoned sets (CPU protocol, 1,000 images per class; seeds 0, 1, 2)", "",
              "| family | tuned_on | images/class | flagged | verdicts | deciding probe (score) |",
              "|---|---|---|---|---|---|"]
    short = {LIKELY_POISONED: "poisoned", NO_SIGN: "no sign", INCONCLUSIVE: "inconclusive"}
    for f in r["families"]:
        lines.append(f"| {f['family']} | {'yes' if f['tuned_on'] else 'no'} | {f['per_class']} | "
                     f"{f['flagged']}/{f['runs']} | {', '.join(short[v] for v in f['verdicts'])} | "
                     f"{', '.join(f'{p} ({s:.2f})' for p, s in zip(f['probes'], f['scores']))} |")
    lines += ["", "## Leave one family out", "",
              "The probes the selection rule (`select_probes`) picks from the tuning families without the held-out "
              "one, and the held-out family's verdicts under only those probes.", "",
              "| held out | images/class | probes selected without it | flagged |", "|---|---|---|---|"]
    for row in r["lofo"]:
        lines.append(f"| {row['held_out']} | {row['per_class']} | {', '.join(row['probes_selected_without_it'])} | "
                     f"{row['flagged']}/{row['runs']} |")
    if r.get("reference"):
        lines += ["", "## With a clean reference (`--reference`: a test-split subset of the same size)", "",
                  "| set | images/class | runs | flagged | inconclusive | excess (first 3) | deciding probes |",
                  "|---|---|---|---|---|---|---|"]
        for t in r["reference"]:
            lines.append(f"| {t['set']} | {t['per_class']} | {t['runs']} | {t['flagged']} | {t['inconclusive']} | "
                         f"{', '.join(f'{v:+.2f}' for v in t['excess'])} | {', '.join(t['probes'])} |")
    if r.get("thorough"):
        lines += ["", "## The opt-in probe alone (`--thorough`)", "",
                  "| probe | set | images/class | runs | flagged by it alone | scores (first 3) | s each |",
                  "|---|---|---|---|---|---|---|"]
        for t in r["thorough"]:
            lines.append(f"| {t['probe']} | {t['set']} | {t['per_class']} | {t['runs']} | {t['flagged_alone']} | "
                         f"{', '.join(f'{v:.2f}' for v in t['scores'])} | {t['seconds_each']} |")
    if r["purified"]:
        lines += ["", "## Before and after `eclipse-stream purify` (seed 0)", "",
                  "| family | images/class | poisoned | purified |", "|---|---|---|---|"]
        for p in r["purified"]:
            b, a = p["before"], p["after"]
            lines.append(f"| {p['family']} | {p['per_class']} | {short[b['verdict']]} ({b['probe']} {b['score']:.2f}) "
                         f"| {short[a['verdict']]} ({a['probe']} {a['score']:.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
