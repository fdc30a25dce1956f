"""Reading shards from a local S3 server (moto, through s3fs) vs from local disk: purify's reader, same shards.

* **reader**: ``reading.read_shard`` over every shard in turn, in this process: the format's reader (the tar
  read through ``storage.open_input``: a local file, or an s3fs file), JPEG decode, resolution policy and
  bucketing into batches, exactly what one purify reader worker does. Images/s from first byte to last batch.
* **raw bytes**: ``storage.open_input(...).read()`` of every shard: what the storage path alone delivers.
* The S3 server is moto's (``python -m moto.server``) in a separate process on this machine, so the figures
  measure the client side (s3fs, HTTP, the reader over a file object), not a network.

    python -m benchmarks.bench_remote             # 4,000 images in 4 shards, 3 rounds
    python -m benchmarks.bench_remote --quick     # seconds
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eclipse_stream import storage
from eclipse_stream.config import PurifyConfig
from eclipse_stream.events import Batch
from eclipse_stream.outdir import Task
from eclipse_stream.reading import ReadSettings, read_shard

from . import common

FULL = {"images": 4000, "per_shard": 1000, "rounds": 3, "batch_size": 256}
QUICK = {"images": 200, "per_shard": 100, "rounds": 1, "batch_size": 64}
BUCKET = "bench"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_server():
    """moto's S3 server in a subprocess on a free local port; yields its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto's server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def read_all(locations: list[str], settings: ReadSettings) -> dict:
    t0 = time.perf_counter()
    images = 0
    for i, loc in enumerate(locations):
        for ev in read_shard(Task(i, loc, storage.shard_name(loc)), settings):
            if isinstance(ev, Batch):
                images += len(ev.items)
            elif type(ev).__name__ == "ShardFailed":
                raise RuntimeError(f"{loc}: {ev.reason}")
    wall = time.perf_counter() - t0
    return {"images": images, "wall_s": wall, "images_per_s": images / wall}


def read_bytes(locations: list[str]) -> dict:
    t0 = time.perf_counter()
    n = 0
    for loc in locations:
        with storage.open_input(loc) as f:
            n += len(f.read())
    wall = time.perf_counter() - t0
    return {"MiB": n / 2**20, "wall_s": wall, "MiB_per_s": n / 2**20 / wall}


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--per-shard", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="each path is read this many times, alternating")
    p.add_argument("--batch-size", type=int, default=None)
    args = common.resolve(p.parse_args(argv), FULL, QUICK)
    env = common.environment("cpu")
    os.environ.update(FAKE_AWS)
    import s3fs

    settings = ReadSettings.from_config(PurifyConfig(batch_size=args.batch_size), None)
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as work, moto_server() as endpoint:
        jpegs = common.read_cifar_jpegs(min(args.images, 50_000), args.cifar)
        shards = common.write_shards(Path(work), jpegs, args.images, args.per_shard)
        storage.set_options({"endpoint_url": endpoint})
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        for s in shards:
            fs.put_file(str(s), f"{BUCKET}/{s.name}")
        paths = {"local disk": [str(s) for s in shards], "S3 (moto, s3fs)": [f"s3://{BUCKET}/{s.name}"
                                                                           for s in shards]}
        read_all(paths["local disk"][:1], settings)  # warm up: imports, page cache, the s3fs client
        read_all(paths["S3 (moto, s3fs)"][:1], settings)
        results = {k: [] for k in paths}
        for _ in range(args.rounds):
            for name, locs in paths.items():
                results[name].append(read_all(locs, settings))
                raw.append({"path": name, **read_bytes(locs)})
    for name, runs in results.items():
        best = common.median([r["images_per_s"] for r in runs])
        rows.append({"path": name, "images": runs[0]["images"], "rounds": len(runs),
                     "median_images_per_s": best, "each_images_per_s": ", ".join(f"{r['images_per_s']:.0f}"
                                                                                 for r in runs)})
    ratio = rows[1]["median_images_per_s"] / rows[0]["median_images_per_s"]
    targets = [common.target("reading from the local S3 server / local disk (images/s, purify's reader)",
                             ratio, 0.9)]
    notes = ["one reader in this process (what one purify reader worker does); moto's server in another process",
             "local disk reads come from the page cache after the warm-up; the S3 path goes through HTTP on "
             "127.0.0.1 to moto, which keeps objects in memory"]
    common.write_results("bench_remote", args, env, {"reader": rows, "raw_bytes": raw}, targets, notes)
    return rows


if __name__ == "__main__":
    main()
