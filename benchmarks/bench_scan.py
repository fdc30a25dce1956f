"""How long ``eclipse-stream scan`` takes as a whole command, and whether it finds a poisoned minority of shards.

* **time**: the CLI with default settings (100 images per class, per-shard verdicts) on CPU-protocol sets
  (10,000 CIFAR-10 training images in 4 shards: the clean one and each finished poisoned one under
  ``--poisoned-root``), wall clock of the whole command in a subprocess (Python start, imports, reading,
  probes, report); ``--thorough`` once on the clean set.
* **mixed sets**: 10 shards of 1,000 images (100 per class each) cut from the same 10,000 images, 2 of them
  taken from a poisoned copy (``--mixed`` families): each shard's verdict and the whole set's (20% poisoned).

Detection and false-positive rates at every sample size are measured by ``python -m tools.scan_calibration``
(docs/scan.md), not here.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_scan --clean runs/eval-cpu/clean/train \\
        --poisoned-root runs/eval-cpu/poisoned                      # minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_scan --quick       # seconds: a tiny URP set made here
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from . import common

FULL = {"per_class": 100, "group_per_class": 50, "families": "cuda,tap,sep,em", "mixed": "lsp,tap,cuda",
        "shards": 10, "poisoned_shards": 2, "thorough": True}
QUICK = {"per_class": 25, "group_per_class": 25, "families": "urp", "mixed": "urp", "shards": 4,
         "poisoned_shards": 1, "thorough": False}
TIME_TARGET_S = 60.0


def run_cli(inputs: list[Path], report: Path, *extra: str) -> dict:
    """The whole scan command in a subprocess; its exit status, verdict, groups and wall seconds."""
    cmd = [sys.executable, "-m", "eclipse_stream.cli", "scan", *map(str, inputs), "--report", str(report), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 10, 11):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    return {"exit_status": proc.returncode, "verdict": data["verdict"], "probe": data["best_probe"],
            "score": round(data["score"], 3), "wall_s": round(wall, 1), "read_s": data["seconds"]["read"],
            "probes_s": data["seconds"]["probes"], "groups": data["groups"], "images": sum(data["seen"].values())}


def read_set(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    from tools.common import read_split

    return read_split(folder)


def write_mixed(out: Path, clean: tuple, poisoned: tuple, shards: int, poisoned_idx: list[int]) -> list[Path]:
    """``shards`` shards, each with an equal share of every class (classes interleaved); shard i is cut from the
    poisoned copy when i is in ``poisoned_idx``. The same images either way (the poisoned copy of each)."""
    keys, images, labels = clean
    p_keys, p_images, p_labels = poisoned
    if keys != p_keys or not np.array_equal(labels, p_labels):
        raise ValueError("the poisoned set is not a copy of the clean one (keys or labels differ)")
    out.mkdir(parents=True, exist_ok=True)
    part = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        part[members] = np.arange(len(members)) * shards // len(members)
    paths = []
    for i in range(shards):
        src = p_images if i in poisoned_idx else images
        path = out / f"mixed-{i:06d}.tar"
        tmp = path.with_suffix(".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for j in np.flatnonzero(part == i):
                sink.write({"__key__": keys[j], "png": src[j], "cls": int(labels[j])})
        tmp.rename(path)
        paths.append(path)
    return paths


def quick_data(work: Path) -> tuple[Path, Path]:
    """A tiny clean set (tools.prepare) and its URP copy, made here (seconds)."""
    from tools.poisons.driver import poison_split
    from tools.prepare import prepare

    prepare(None, work / "clean", limit_per_class=100, shard_size=250, sparse_per_class=10, beton=False,
            test_limit_per_class=10)
    poison_split("urp", work / "clean" / "train", work / "poisoned" / "urp", log=lambda *_: None)
    return work / "clean" / "train", work / "poisoned"


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--clean", type=Path, default=None, help="clean CPU-protocol training shards")
    p.add_argument("--poisoned-root", type=Path, default=None, help="folder of poisoned sets (<kind>/norms.json)")
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--group-per-class", type=int, default=None)
    p.add_argument("--thorough", action=argparse.BooleanOptionalAction, default=None,
                   help="also time --thorough on the clean set")
    p.add_argument("--families", default=None, help="poisoned sets to time (those present)")
    p.add_argument("--mixed", default=None, help="families for the mixed-shard sets")
    p.add_argument("--shards", type=int, default=None)
    p.add_argument("--poisoned-shards", type=int, default=None)
    p.add_argument("--work", type=Path, default=None, help="where the mixed shards go [default: a temporary folder]")
    args = common.resolve(p.parse_args(), FULL, QUICK)
    env = common.environment("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.quick and args.clean is None:
            args.clean, args.poisoned_root = quick_data(work / "quick")
        if args.clean is None or args.poisoned_root is None:
            p.error("--clean and --poisoned-root are needed (or --quick)")
        extra = ["--per-class", str(args.per_class), "--group-per-class", str(args.group_per_class), "--device", "cpu"]
        timing = []
        sets = [("clean", args.clean)] + [(k, args.poisoned_root / k) for k in args.families.split(",")
                                           if (args.poisoned_root / k / "norms.json").is_file()]
        for name, folder in sets:
            r = run_cli([folder], work / f"{name}.json", *extra)
            timing.append({"set": name, "options": "default", **{k: v for k, v in r.items() if k != "groups"},
                           "groups_flagged": sum(g.get("verdict") == "likely poisoned" for g in r["groups"].values())})
            print(json.dumps(timing[-1]), flush=True)
        if args.thorough:
            r = run_cli([args.clean], work / "clean-thorough.json", *extra, "--thorough")
            timing.append({"set": "clean", "options": "--thorough", **{k: v for k, v in r.items() if k != "groups"},
                           "groups_flagged": sum(g.get("verdict") == "likely poisoned" for g in r["groups"].values())})
            print(json.dumps(timing[-1]), flush=True)

        mixed = []
        clean = read_set(args.clean)
        poisoned_idx = list(range(1, 1 + 4 * args.poisoned_shards, 4))[:args.poisoned_shards]  # e.g. shards 1 and 5
        for kind in args.mixed.split(","):
            folder = args.poisoned_root / kind
            if not (folder / "norms.json").is_file():
                continue
            shards = write_mixed(work / f"mixed-{kind}", clean, read_set(folder), args.shards, poisoned_idx)
            r = run_cli([shards[0].parent], work / f"mixed-{kind}.json", *extra)
            verdicts = {Path(g).name: v.get("verdict", "not scored") for g, v in r["groups"].items()}
            bad = {shards[i].name for i in poisoned_idx}
            mixed.append({"family": kind, "shards": args.shards, "poisoned_shards": sorted(bad),
                          "poisoned_flagged": sum(verdicts[s] == "likely poisoned" for s in bad),
                          "clean_flagged": sum(verdicts[s] == "likely poisoned" for s in verdicts if s not in bad),
                          "clean_not_no_sign": sum(verdicts[s] != "no sign of the poison types tested"
                                                   for s in verdicts if s not in bad),
                          "whole_verdict": r["verdict"], "whole_sample_verdict": json.loads(
                              (work / f"mixed-{kind}.json").read_text())["whole"]["verdict"],
                          "exit_status": r["exit_status"], "wall_s": r["wall_s"],
                          "group_scores": {s: round(v["score"], 3) for s, v in
                                           ((Path(g).name, v) for g, v in r["groups"].items()) if "score" in v}})
            print(json.dumps(mixed[-1]), flush=True)

    default_clean = next((t for t in timing if t["set"] == "clean" and t["options"] == "default"), None)
    slowest = max((t["wall_s"] for t in timing if t["options"] == "default"), default=None)
    targets = [common.target(f"default scan at {args.per_class}/class, whole command (slowest set)", slowest,
                             TIME_TARGET_S, at_most=True, unit=" s")]
    for m in mixed:
        targets.append(common.target(f"mixed {m['family']}: poisoned shards flagged", m["poisoned_flagged"],
                                     len(m["poisoned_shards"])))
        targets.append(common.target(f"mixed {m['family']}: clean shards flagged", m["clean_flagged"], 0,
                                     at_most=True))
        targets.append(common.target(f"mixed {m['family']}: whole set flagged (exit 10)",
                                     float(m["exit_status"] == 10), 1.0))
    notes = [f"clean set exit status {default_clean['exit_status']}" if default_clean else "no clean timing"]
    common.write_results("bench_scan", args, env, {"CLI time": timing, "Mixed sets": mixed}, targets, notes)


if __name__ == "__main__":
    main()
