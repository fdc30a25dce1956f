"""Large images (issue 22): whole-command cost per pixel and peak memory of ``purify``, tiled vs native.

Each run is ``eclipse-stream purify`` in a child process (``purify_shards`` with the CLI's defaults and the
given settings) on one tar of JPEGs of one size, with the same total pixel count at every size (``--pixels``):
2,048 images of 32 x 32, 42 of 224 x 224, 8 of 512 x 512, 2 of 1024 x 1024 by default. Images are CIFAR-10
training JPEGs resized (bicubic) to the size: speed does not depend on the content, and the package must
not need a photo collection. For every run: images/s and microseconds per pixel of the purify call (shards in,
shards out: read, decode, prefilter, noise, UNet, encode, write, stats; not the interpreter start-up or the
imports, reported apart as the process wall time), and the peak RSS of the process tree (the child and its
reader workers, summed, sampled with psutil) and of the largest single process (``ru_maxrss``).

Targets (issue 22): per pixel, tiled at 224/512/1024 within 1.3x of the 32-px run; peak memory within 1.5x
of the 32-px run (same total pixels). At 32 px both modes are the same code path (an image that fits in one
tile is purified whole), so the 32-px run is made once. Native 1024 takes minutes a run on a CPU and is only
run with ``--native-sizes`` naming it.

    python -m benchmarks.bench_large_images                    # 32, 224, 512, 1024; native at 224, 512
    python -m benchmarks.bench_large_images --quick            # seconds: 32 and 224, few pixels
    python -m benchmarks.bench_large_images --repeats 2        # each run twice, interleaved; the faster counts
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from PIL import Image

from . import common

FULL = {"sizes": [32, 224, 512, 1024], "native_sizes": [224, 512], "pixels": 2048 * 32 * 32, "batch_size": 64,
        "workers": 1, "repeats": 1, "precision": "fp32"}
QUICK = {"sizes": [32, 224], "native_sizes": [224], "pixels": 128 * 32 * 32}


def make_shard(folder: Path, jpegs: list[tuple[int, bytes]], size: int, count: int) -> Path:
    """One tar of ``count`` JPEGs (quality 95) of ``size`` x ``size`` made from CIFAR-10 images, cycled."""
    from webdataset import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"s{size}.tar"
    with TarWriter(str(path), encoder=False, mtime=0.0) as sink:
        for i in range(count):
            label, data = jpegs[i % len(jpegs)]
            img = Image.open(io.BytesIO(data)).convert("RGB")
            if size != 32:
                img = img.resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": str(label).encode()})
    return path


def child_main(spec: dict) -> None:
    """In the child: one purify run; prints its result as JSON."""
    import torch

    from eclipse_stream.pipeline import PurifyConfig, purify_shards
    from eclipse_stream.purifier import PurifierConfig

    torch.set_num_threads(spec["threads"])
    denoiser = spec.get("denoiser")
    if spec.get("preset"):  # an untrained preset at this size: speed does not depend on the weights
        denoiser = common.make_denoiser(spec["preset"], spec["image_size"], device=spec["device"])
    pcfg = PurifierConfig(precision=spec["precision"], large_images=spec["mode"])
    cfg = PurifyConfig(purifier=pcfg, batch_size=spec["batch_size"], workers=spec["workers"], device=spec["device"],
                       overwrite=True)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    result = purify_shards(spec["shard"], spec["out"], denoiser, cfg, progress=False)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024  # KiB on Linux
    print(json.dumps({"purify_s": seconds, "cpu_s": cpu, "written": sum(s["written"] for s in result.processed),
                      "max_process_rss_mib": rss}))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (the reader workers, once joined)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run(spec: dict, interval: float = 0.05) -> dict:
    """A child process running one purify; its result with the process wall time and the tree's peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_large_images", "--child", json.dumps(spec)],
                            cwd=common.ROOT, stdout=subprocess.PIPE, text=True, env=spec["env"])
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, tree_rss(ps))
        time.sleep(interval)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"benchmark child failed ({proc.returncode}) for {spec['mode']} {spec['size']}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(process_wall_s=time.perf_counter() - t0, peak_tree_rss_mib=peak / 2**20)
    return result


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=common.csv(int), default=None, help="image sides, px (square images)")
    p.add_argument("--native-sizes", type=common.csv(int), default=None, help="sizes also run with native")
    p.add_argument("--pixels", type=int, default=None, help="total pixels per run (images = pixels / size^2)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="runs of each setting, interleaved; the fastest is kept")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--denoiser", default=None, help="checkpoint; default the shipped one")
    p.add_argument("--preset", default=None, help="an untrained preset instead (speed only), at --image-size")
    p.add_argument("--image-size", type=int, default=32, help="the preset's training size S (tiles S..2S)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    args = common.resolve(args, FULL, QUICK)
    env = common.environment(args.device)
    threads = args.threads or 1
    env["torch_threads"] = threads
    child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}

    runs: dict[tuple[str, int], list[dict]] = {}
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-large-")))
        jpegs = common.read_cifar_jpegs(max(1, min(args.pixels // 1024, 5000)), args.cifar)
        settings = [("tiled", s) for s in args.sizes] + [("native", s) for s in args.native_sizes if s != 32]
        shards = {s: make_shard(work / "in" / str(s), jpegs, s, max(1, round(args.pixels / s**2)))
                  for s in {s for _, s in settings}}
        for rep in range(args.repeats):
            for mode, size in settings:
                spec = {"mode": mode, "size": size, "shard": str(shards[size]), "out": str(work / f"out-{mode}-{size}"),
                        "threads": threads, "batch_size": args.batch_size, "workers": args.workers,
                        "precision": args.precision, "device": args.device, "denoiser": args.denoiser,
                        "preset": args.preset, "image_size": args.image_size, "env": child_env}
                r = run(spec)
                runs.setdefault((mode, size), []).append(r)
                print(f"[{rep}] {mode:6s} {size:5d}px: {r['purify_s']:.2f} s purify, {r['cpu_s']:.2f} CPU s, "
                      f"{r['peak_tree_rss_mib']:.0f} MiB tree", flush=True)

    rows = []
    for (mode, size), rs in runs.items():
        best = min(rs, key=lambda r: r["purify_s"])
        pixels = best["written"] * size * size
        cpu = min(r["cpu_s"] for r in rs)
        rows.append({"mode": mode if size > 2 * args.image_size else "either (one tile)", "size": size,
                     "images": best["written"],
                     "pixels": pixels, "purify_s": best["purify_s"], "images_per_s": best["written"] / best["purify_s"],
                     "us_per_pixel": best["purify_s"] / pixels * 1e6, "cpu_s": cpu,
                     "cpu_us_per_pixel": cpu / pixels * 1e6, "process_wall_s": best["process_wall_s"],
                     "peak_tree_rss_mib": max(r["peak_tree_rss_mib"] for r in rs),
                     "max_process_rss_mib": max(r["max_process_rss_mib"] for r in rs),
                     "runs_purify_s": [round(r["purify_s"], 2) for r in rs],
                     "runs_cpu_s": [round(r["cpu_s"], 2) for r in rs]})
    ref = min(rows, key=lambda r: r["size"]) if rows else None  # the smallest size: the reference
    for r in rows:
        if ref:
            r["cost_vs_32"] = r["us_per_pixel"] / ref["us_per_pixel"]
            r["cpu_cost_vs_32"] = r["cpu_us_per_pixel"] / ref["cpu_us_per_pixel"]
            r["rss_vs_32"] = r["peak_tree_rss_mib"] / ref["peak_tree_rss_mib"]
    targets = []
    for r in rows:
        if r["mode"] == "tiled" and ref:
            base = f"{ref['size']} px"
            targets.append(common.target(f"tiled {r['size']} px: wall time per pixel / {base}", r["cost_vs_32"], 1.3,
                                         at_most=True))
            targets.append(common.target(f"tiled {r['size']} px: CPU time per pixel / {base}", r["cpu_cost_vs_32"],
                                         1.3, at_most=True))
            targets.append(common.target(f"tiled {r['size']} px: peak tree RSS / {base} (equal pixels)",
                                         r["rss_vs_32"], 1.5, at_most=True))
    model = (f"untrained {args.preset} preset at {args.image_size} px (speed only)" if args.preset
             else args.denoiser or "the shipped denoiser (tiny, 32 px)")
    notes = [f"denoiser: {model}; the *_vs_32 columns compare with the smallest size run",
             f"{args.pixels:,} pixels a run at every size; CIFAR-10 JPEGs resized to the size, stored as JPEG q95",
             f"torch threads {threads} in the child, {args.workers} reader worker(s), batch size {args.batch_size}, "
             f"{args.precision}, the default recipe (impulse prefilter + 1 step at t* = 100)",
             "purify_s: the purify_shards call in the child (the fastest of the repeats); process_wall_s adds the "
             "interpreter start-up, imports and denoiser load; cpu_s: user + system CPU seconds of that call in the "
             "child and its reader workers (the least of the repeats), the cost measure that other jobs on a shared "
             "machine disturb least",
             "peak_tree_rss_mib: the child and its reader workers summed (shared pages counted in each), sampled "
             "every 0.05 s; max_process_rss_mib: ru_maxrss of the largest single process",
             "a 2-core VM shared with other jobs: timings move from run to run; see runs_purify_s"]
    common.write_results("bench_large_images", args, env, {"results": rows}, targets, notes)
    return rows


if __name__ == "__main__":
    main()
