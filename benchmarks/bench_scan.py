"""How well `eclipse-stream scan` tells poisoned from clean CIFAR-10, and how fast it is.

Measures, on the shared CIFAR-10 (real images):

* detection: for URP, LSP, AR, OPS (``tools/poisons``, the generators ``python -m tools.evaluate
  poison`` uses) at their documented budget and at half of it, the verdict of a scan at several
  images per class, over several seeds (each seed: another random subset and other folds);
* false positives: scans of clean subsets (a different random subset per seed);
* time: the CLI on 10 shards of 2,500 CIFAR-sized images (``tools.evaluate prepare``), clean and
  URP-poisoned (``tools.evaluate poison urp``), wall clock of the whole command.

Half budget: URP L-inf 4/255, LSP L2 0.65, AR L2 0.5; OPS has an L0 budget of one pixel, so its
"half" keeps the pixel and moves it half way to the class colour.

Poisons are generated on the first ``--pool`` images per class of the prepared training split
(generating them on all 50,000 images is the same construction, only slower); clean subsets are
drawn from all ``--limit-per-class`` images per class.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_scan --per-class 10,25,50,100,200   # ~10 min on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_scan --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _git() -> str:
    """HEAD, plus the uncommitted files (of the package, the tools, this script) the run used, if any."""
    def run(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = run("status", "--porcelain", "--", "eclipse_stream", "benchmarks/bench_scan.py", "tools").splitlines()
    files = sorted(line.split(maxsplit=1)[1] for line in dirty if line.endswith(".py"))
    return run("rev-parse", "--short", "HEAD").strip() + (f" + uncommitted {', '.join(files)}" if files else "")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def poisoned_images(kind: str, fraction: float, clean: np.ndarray, labels: np.ndarray, seed: int = 0):
    from tools.poisons import POISONS
    from tools.poisons.base import Budget, quantize

    module = POISONS[kind]
    budget = module.BUDGET
    if kind == "ops":  # L0 budget: same pixel, moved `fraction` of the way to the class colour
        return quantize(clean, module.generate(clean, labels, seed=seed) * fraction, budget)
    eps = budget.eps * fraction
    return quantize(clean, module.generate(clean, labels, seed=seed, eps=eps), Budget(budget.norm, eps))


def prepare(work: Path, limit: int) -> Path:
    """10 training shards of 2,500 images with the project's own tool (skipped when present)."""
    out = work / f"clean{limit}"
    if not (out / "train" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "tools.evaluate", "prepare", "--limit-per-class", str(limit),
                        "--no-beton", "--out", str(out)], cwd=ROOT, check=True)
    return out / "train"


def poison_shards(work: Path, train: Path, kind: str) -> Path:
    out = work / f"{kind}-{train.parent.name}"
    if not (out / "norms.json").is_file():
        subprocess.run([sys.executable, "-m", "tools.evaluate", "poison", kind, "--in", str(train),
                        "--out", str(out)], cwd=ROOT, check=True)
    return out


def time_cli(shards: Path, report: Path, plot: Path) -> dict:
    cmd = [sys.executable, "-m", "eclipse_stream.cli", "scan", str(shards), "--report", str(report),
           "--plot", str(plot)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    data = json.loads(report.read_text())
    n_shards = len(list(shards.glob("*.tar")))
    return {"input": str(shards.relative_to(ROOT)), "shards": n_shards, "images_in_input": sum(data["seen"].values()),
            "exit_status": r.returncode, "verdict": data["verdict"], "score": round(data["score"], 3),
            "wall_seconds": round(wall, 1), "read_seconds": data["seconds"]["read"],
            "probe_seconds": data["seconds"]["probes"], "stdout": r.stdout}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "scan")
    p.add_argument("--limit-per-class", type=int, default=2500, help="prepared training images per class")
    p.add_argument("--pool", type=int, default=500, help="images per class the poisons are generated on")
    p.add_argument("--per-class", default="10,25,50,100", help="scan sizes (images per class)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per poisoned cell")
    p.add_argument("--clean-seeds", type=int, default=20, help="clean subsets per size")
    p.add_argument("--poisons", default="urp,lsp,ar,ops")
    p.add_argument("--parts", default="detection,clean,relative,timing",
                   help="which measurements: detection, clean, relative (--reference mode), timing")
    p.add_argument("--relative-per-class", default="50,100", help="scan sizes for the --reference mode")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few seeds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.quick:
        args.limit_per_class, args.pool, args.per_class = 100, 50, "25"  # pool within the first half (relative)
        args.seeds, args.clean_seeds, args.relative_per_class = 1, 2, "25"
        args.parts = args.parts.replace("timing", "")
    torch.set_num_threads(1)

    from eclipse_stream.scan import ScanConfig, scan_arrays
    from tools.common import read_split

    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    train = prepare(args.work, args.limit_per_class)
    _, clean_all, labels_all = read_split(train)
    pool_idx = np.concatenate([np.flatnonzero(labels_all == c)[:args.pool] for c in range(10)])
    clean_pool, labels_pool = clean_all[pool_idx], labels_all[pool_idx]
    sizes = [int(s) for s in args.per_class.split(",")]
    defaults = ScanConfig()

    parts = set(args.parts.split(","))
    rows, clean_rows, relative_rows = [], [], []
    for kind in args.poisons.split(",") if "detection" in parts else []:
        for fraction in (1.0, 0.5):
            images = poisoned_images(kind, fraction, clean_pool, labels_pool)
            for n in sizes:
                results = [scan_arrays(images, labels_pool, ScanConfig(per_class=n, seed=s, null=False))
                           for s in range(args.seeds)]
                rows.append({"poison": kind, "budget": "documented" if fraction == 1 else "half", "per_class": n,
                             "flagged": sum(r.verdict == "likely poisoned" for r in results),
                             "inconclusive": sum(r.verdict == "inconclusive" for r in results),
                             "runs": len(results), "scores": [round(r.score, 3) for r in results],
                             "best_probe": sorted({r.best_probe for r in results}),
                             "seconds_each": round(float(np.mean([r.seconds["total"] for r in results])), 2)})
                print(json.dumps(rows[-1]), flush=True)
    for n in sizes if "clean" in parts else []:
        results = [scan_arrays(clean_all, labels_all, ScanConfig(per_class=n, seed=s, null=False))
                   for s in range(args.clean_seeds)]
        scores = [r.score for r in results]
        clean_rows.append({"per_class": n, "runs": len(results),
                           "false_positives": sum(r.verdict == "likely poisoned" for r in results),
                           "inconclusive": sum(r.verdict == "inconclusive" for r in results),
                           "score_mean": round(float(np.mean(scores)), 3), "score_max": round(max(scores), 3),
                           "seconds_each": round(float(np.mean([r.seconds["total"] for r in results])), 2)})
        print(json.dumps(clean_rows[-1]), flush=True)

    if "relative" in parts:
        # data from the first half of every class, the clean reference from the other half (disjoint images);
        # the poisoned pool lies in the first half
        half = np.zeros(len(labels_all), dtype=bool)
        for c in range(10):
            members = np.flatnonzero(labels_all == c)
            half[members[:len(members) // 2]] = True
        ref = (clean_all[~half], labels_all[~half])
        for n in [int(v) for v in args.relative_per_class.split(",")]:
            results = [scan_arrays(clean_all[half], labels_all[half], ScanConfig(per_class=n, seed=s, null=False),
                                   reference=ref) for s in range(args.clean_seeds)]
            scores = [r.score for r in results]
            relative_rows.append({"data": "clean", "budget": "-", "per_class": n, "runs": len(results),
                                  "flagged": sum(r.verdict == "likely poisoned" for r in results),
                                  "inconclusive": sum(r.verdict == "inconclusive" for r in results),
                                  "score_min": round(min(scores), 3), "score_max": round(max(scores), 3)})
            print(json.dumps(relative_rows[-1]), flush=True)
            for kind in args.poisons.split(","):
                for fraction in (1.0, 0.5):
                    images = poisoned_images(kind, fraction, clean_pool, labels_pool)
                    r = scan_arrays(images, labels_pool, ScanConfig(per_class=n, seed=0, null=False), reference=ref)
                    relative_rows.append({"data": kind, "budget": "documented" if fraction == 1 else "half",
                                          "per_class": n, "runs": 1, "flagged": int(r.verdict == "likely poisoned"),
                                          "inconclusive": int(r.verdict == "inconclusive"),
                                          "score_min": round(r.score, 3), "score_max": round(r.score, 3)})
                    print(json.dumps(relative_rows[-1]), flush=True)

    timing = []
    if "timing" in parts:
        timing.append(time_cli(train, args.work / "clean-10shards.json", args.work / "clean-10shards.png"))
        urp = poison_shards(args.work, train, "urp")
        timing.append(time_cli(urp, args.work / "urp-10shards.json", args.work / "urp-10shards.png"))
        for t in timing:
            print(json.dumps({k: v for k, v in t.items() if k != "stdout"}), flush=True)

    env = {"machine": _cpu(), "torch": torch.__version__, "python": platform.python_version(),
           "commit": _git(), "command": " ".join(["python -m benchmarks.bench_scan", *sys.argv[1:]]),
           "threads": torch.get_num_threads(), "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "defaults": {"threshold": defaults.threshold, "clean_below": defaults.clean_below,
                        "probes": list(defaults.probes), "folds": defaults.folds},
           "total_seconds": round(time.time() - started, 1)}
    env["defaults"].update(relative_threshold=defaults.relative_threshold,
                           relative_clean_below=defaults.relative_clean_below)
    out = {"environment": env, "detection": rows, "clean": clean_rows, "relative": relative_rows, "timing": timing}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"bench_scan-cpu-{stamp}{'-quick' if args.quick else ''}"
    base.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(out) + "\n")
    print(markdown(out))


def markdown(out: dict) -> str:
    env = out["environment"]
    lines = [f"# bench_scan ({env['date_utc']})", "",
             f"Machine: {env['machine']}; torch {env['torch']}, {env['threads']} thread; commit {env['commit']}; "
             f"`{env['command']}`; {env['total_seconds']} s in all.", "",
             "## Detection (flagged = verdict 'likely poisoned')", "",
             "| poison | budget | images/class | flagged | inconclusive | scores | probe | s/scan |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["detection"]:
        lines.append(f"| {r['poison']} | {r['budget']} | {r['per_class']} | {r['flagged']}/{r['runs']} | "
                     f"{r['inconclusive']} | {', '.join(f'{s:.2f}' for s in r['scores'])} | "
                     f"{', '.join(r['best_probe'])} | {r['seconds_each']} |")
    lines += ["", "## Clean subsets (false positive = verdict 'likely poisoned')", "",
              "| images/class | subsets | false positives | inconclusive | mean score | max score | s/scan |",
              "|---|---|---|---|---|---|---|"]
    for r in out["clean"]:
        lines.append(f"| {r['per_class']} | {r['runs']} | {r['false_positives']} | {r['inconclusive']} | "
                     f"{r['score_mean']} | {r['score_max']} | {r['seconds_each']} |")
    if out.get("relative"):
        lines += ["", "## With a clean reference (`--reference`, disjoint clean images; score = excess)", "",
                  "| data | budget | images/class | runs | flagged | inconclusive | score min | score max |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in out["relative"]:
            lines.append(f"| {r['data']} | {r['budget']} | {r['per_class']} | {r['runs']} | {r['flagged']} | "
                         f"{r['inconclusive']} | {r['score_min']} | {r['score_max']} |")
    if out["timing"]:
        lines += ["", "## CLI time, default settings", "",
                  "| input | shards | images | verdict (exit) | score | wall s | read s | probes s |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in out["timing"]:
            lines.append(f"| {t['input']} | {t['shards']} | {t['images_in_input']} | {t['verdict']} "
                         f"({t['exit_status']}) | {t['score']} | {t['wall_seconds']} | {t['read_seconds']} | "
                         f"{t['probe_seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
