"""The CPU path of ``purify_shards`` (device stage = identity) vs plain webdataset, and host memory vs data size.

* **identity pipeline**: ``purify_shards(purifier=IdentityPurifier())``, a purifier that returns its
  input batch unchanged. Everything
  else runs as in a real purification: read, decode (imageio policies), bucketing/batching,
  ordering, JPEG re-encode, TarWriter write, fsync, stats and manifest. Device: CPU.
* **plain webdataset**: ``webdataset.WebDataset(shard)`` -> ``PIL.Image.open(...).convert("RGB")``
  -> ``save(JPEG, quality)`` -> ``TarWriter``, one shard per task in a pool of ``--workers``
  processes (the same number of reader processes the pipeline gets).
* **host memory**: the identity pipeline runs in a subprocess on 10x and 100x ``--base-images``
  (same shard size, so 10x more shards); the peak RSS of its process tree (the process plus its
  DataLoader workers, summed, sampled every ``--sample-interval`` s with psutil) should be flat.

    python -m benchmarks.bench_io             # base 1,000 images: 10,000 and 100,000
    python -m benchmarks.bench_io --quick     # seconds on a CPU
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import psutil
import torch

from eclipse_stream.pipeline import PurifyConfig, purify_shards

from . import common

FULL = {"base_images": 1000, "per_shard": 1000, "batch_size": 256, "workers": 4, "encode_threads": 4,
        "jpeg_quality": 95, "sample_interval": 0.05}
QUICK = {"base_images": 8, "per_shard": 40, "batch_size": 16, "workers": 1, "encode_threads": 1}


class IdentityPurifier:
    """The device stage replaced by identity: the batch comes back as it went in."""

    fingerprint = "identity"  # what the output's stats record instead of a checkpoint
    calls: list = []

    def __call__(self, x, generator=None):
        self.calls.append(len(x))
        return x


def identity_purify(shards: Path, out: Path, args) -> dict:
    """purify_shards with the identity device stage on the CPU; images and wall seconds."""
    cfg = PurifyConfig(batch_size=args.batch_size, workers=args.workers, encode_threads=args.encode_threads,
                       jpeg_quality=args.jpeg_quality, device="cpu", overwrite=True)
    t0 = time.perf_counter()
    result = purify_shards(shards, out, cfg=cfg, purifier=IdentityPurifier(), progress=False)
    wall = time.perf_counter() - t0
    if not IdentityPurifier.calls:
        raise RuntimeError("purify_shards never called the identity purifier")
    images = sum(s["written"] for s in result.processed)
    return {"images": images, "wall_s": wall, "images_per_s": images / wall}


def plain_shard(src: str, dst: str, quality: int) -> int:
    """read -> decode (PIL) -> encode (PIL) -> TarWriter, for one shard; returns images written."""
    import webdataset as wds
    from PIL import Image

    n = 0
    with wds.TarWriter(dst, encoder=False) as sink:
        for sample in wds.WebDataset(src, shardshuffle=False):
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            sink.write({"__key__": sample["__key__"], "jpg": buf.getvalue(), "cls": sample["cls"]})
            n += 1
    return n


def plain_webdataset(shards: list[Path], out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(str(s), str(out / s.name), args.jpeg_quality) for s in shards]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        images = sum(pool.starmap(plain_shard, tasks))
    wall = time.perf_counter() - t0
    return {"images": images, "wall_s": wall, "images_per_s": images / wall}


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with suppress(psutil.Error):  # a worker may exit between listing and reading
            total += p.memory_info().rss
    return total


def run_child(shards: Path, out: Path, args) -> dict:
    """The identity pipeline in a subprocess; its result plus the peak RSS of its process tree."""
    cmd = [sys.executable, "-m", "benchmarks.bench_io", "--child", str(shards), str(out),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--encode-threads", str(args.encode_threads), "--jpeg-quality", str(args.jpeg_quality),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.Error:
            break
        time.sleep(args.sample_interval)
    stdout = proc.stdout.read()
    if proc.wait():
        raise RuntimeError(f"identity pipeline subprocess failed ({proc.returncode}): {' '.join(cmd)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_tree_rss_mib"] = peak / 2**20
    return result


def child_main(args) -> None:
    shards, out = map(Path, args.child)
    result = identity_purify(shards, out, args)
    # ru_maxrss is in KiB on Linux: the largest single process, this one and its reaped workers
    result["max_process_rss_mib"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    result["identity_calls"] = len(IdentityPurifier.calls)
    print(json.dumps(result))


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--base-images", type=int, default=None, help="the base size; runs at 10x and 100x it")
    p.add_argument("--per-shard", type=int, default=None, help="images per shard")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="reader processes (pipeline) = pool size (plain)")
    p.add_argument("--encode-threads", type=int, default=None)
    p.add_argument("--jpeg-quality", type=int, default=None)
    p.add_argument("--sample-interval", type=float, default=None, help="seconds between RSS samples")
    p.add_argument("--workdir", type=Path, default=None, help="where shards go (kept); default a temp dir")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = common.resolve(p.parse_args(argv), FULL, QUICK)
    if args.child:
        return child_main(args)
    env = common.environment("cpu")

    memory, throughput = [], []
    with ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-io-")))
        jpegs = common.read_cifar_jpegs(min(100 * args.base_images, 50_000), args.cifar)
        runs = {}
        for scale in (10, 100):
            n = scale * args.base_images
            shards = common.write_shards(work / f"x{scale}", jpegs, n, args.per_shard)
            runs[scale] = run_child(work / f"x{scale}", work / f"out-x{scale}", args)
            memory.append({"scale": f"{scale}x", "images": runs[scale]["images"], "shards": len(shards),
                           "peak_tree_rss_mib": runs[scale]["peak_tree_rss_mib"],
                           "max_process_rss_mib": runs[scale]["max_process_rss_mib"],
                           "images_per_s": runs[scale]["images_per_s"]})
            print(common.table(memory[-1:]), flush=True)
        plain = plain_webdataset(shards, work / "out-plain", args)  # the 100x shards
        throughput = [{"path": "purify_shards, identity device stage", **{k: runs[100][k] for k in plain}},
                      {"path": "plain webdataset read/decode/encode/write", **plain}]

    ratio = runs[100]["images_per_s"] / plain["images_per_s"]
    rss_growth = memory[1]["peak_tree_rss_mib"] / memory[0]["peak_tree_rss_mib"]
    targets = [common.target("CPU I/O path: identity pipeline / plain webdataset (images/s)", ratio, 1.0),
               common.target("peak RSS of the process tree, 100x / 10x data", rss_growth, 1.10, at_most=True)]
    notes = [f"ratio measured on the 100x data ({runs[100]['images']} images); workers={args.workers} for both",
             "peak_tree_rss_mib sums RSS over the process and its workers (shared pages counted in each)",
             "the plain path encodes JPEG with PIL defaults at the same quality; the pipeline keeps the "
             "source's chroma subsampling and also writes stats, manifest and sha256"]
    common.write_results("bench_io", args, env, {"throughput": throughput, "memory": memory}, targets, notes)
    return throughput, memory


if __name__ == "__main__":
    main()
