"""Reading shards from a local S3 server (moto, through s3fs) vs from local disk: purify's reader, same shards.

* **reader**: what one purify reader worker does, in this process: the input listed (``expand_shards``: a
  folder, or one LIST of the S3 prefix), then ``reading.ShardEvents`` over its shards: each shard's format
  reader (the tar read through ``storage.open_input``: a local file, or the object in range requests read
  ahead on a thread, the next shard started while one is decoded: ``storage.read_in_order``), JPEG decode,
  resolution policy and bucketing into batches. Images/s from the listing to the last batch. The S3 path
  is measured with purify's default read-ahead (``--read-ahead-mib``) and with none (each shard fetched
  when its turn comes, in blocks, without a thread), to show what the read-ahead buys.
* **raw bytes**: ``storage.open_input(...).read()`` of every shard: what the storage path alone delivers.
* The S3 server is moto's (``python -m moto.server``) in a separate process on this machine, so the figures
  measure the client side (s3fs, HTTP, the reader over a file object) and moto's own CPU, not a network.
  The CPU seconds of this process and of moto's are recorded per row, and the load average: on a shared
  machine a busy neighbour moves the ratio.

    python -m benchmarks.bench_remote             # 4,000 images in 4 shards of 1,000, 3 rounds
    python -m benchmarks.bench_remote --images 10000 --per-shard 5000   # realistic shard sizes (23 MB each)
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
from dataclasses import replace
from pathlib import Path

from eclipse_stream import storage
from eclipse_stream.config import PurifyConfig, default_of
from eclipse_stream.events import Batch, ShardFailed
from eclipse_stream.outdir import Task
from eclipse_stream.reading import ReadSettings, ShardEvents
from eclipse_stream.sources import expand_shards

from . import common

FULL = {"images": 4000, "per_shard": 1000, "rounds": 3, "batch_size": 256}
QUICK = {"images": 200, "per_shard": 100, "rounds": 1, "batch_size": 64}
BUCKET = "bench"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_server():
    """moto's S3 server in a subprocess on a free local port; yields (endpoint URL, PID)."""
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
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process, or of process ``pid``."""
    if pid is None:
        return time.process_time()  # every thread of this process, nanosecond clock
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_all(source: str, settings: ReadSettings, server_pid: int | None = None) -> dict:
    """List ``source`` and read every shard as one purify reader worker does; images/s over the whole."""
    cpu0, server0 = cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    shards = [str(s) for s in expand_shards(source)]
    images = 0
    for ev in ShardEvents([Task(i, loc, storage.shard_name(loc)) for i, loc in enumerate(shards)], settings):
        if isinstance(ev, Batch):
            images += len(ev.items)
        elif isinstance(ev, ShardFailed):
            raise RuntimeError(f"{shards[ev.shard]}: {ev.reason}")
    wall = time.perf_counter() - t0
    return {"images": images, "wall_s": wall, "images_per_s": images / wall, "cpu_s": cpu_seconds() - cpu0,
            "server_cpu_s": (cpu_seconds(server_pid) - server0) if server_pid else 0.0}


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
    p.add_argument("--read-ahead-mib", type=int, default=default_of(PurifyConfig, "read_ahead_mib"),
                   help="purify's --read-ahead-mib for the S3 row (the other S3 row uses 0)")
    args = common.resolve(p.parse_args(argv), FULL, QUICK)
    env = common.environment("cpu")
    os.environ.update(FAKE_AWS)
    import s3fs

    base = PurifyConfig(batch_size=args.batch_size)
    with_ahead = ReadSettings.from_config(replace(base, read_ahead_mib=args.read_ahead_mib), None)
    no_ahead = ReadSettings.from_config(replace(base, read_ahead_mib=0), None)
    rows, raw = [], []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as work, moto_server() as (endpoint, server_pid):
        jpegs = common.read_cifar_jpegs(min(args.images, 50_000), args.cifar)
        shards = common.write_shards(Path(work) / "shards", jpegs, args.images, args.per_shard)
        storage.set_options({"endpoint_url": endpoint})
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        for s in shards:
            fs.put_file(str(s), f"{BUCKET}/in/{s.name}")
        local, remote = str(Path(work) / "shards"), f"s3://{BUCKET}/in/"
        paths = {"local disk": (local, with_ahead),
                 f"S3 (moto, s3fs), read-ahead {args.read_ahead_mib} MiB": (remote, with_ahead),
                 "S3 (moto, s3fs), no read-ahead": (remote, no_ahead)}
        read_all(local, with_ahead)  # warm up: imports, page cache, the s3fs client
        read_all(remote, with_ahead)
        results = {k: [] for k in paths}
        for _ in range(args.rounds):
            for name, (source, settings) in paths.items():
                results[name].append(read_all(source, settings, server_pid if source == remote else None))
            raw.append({"path": "local disk", **read_bytes([str(s) for s in shards])})
            raw.append({"path": "S3 (moto, s3fs)", **read_bytes(storage.list_shards(remote, (".tar",)))})
        load.append(os.getloadavg()[0])
        shard_mb = sum(s.stat().st_size for s in shards) / len(shards) / 1e6
    for name, runs in results.items():
        rows.append({"path": name, "images": runs[0]["images"], "rounds": len(runs),
                     "median_images_per_s": common.median([r["images_per_s"] for r in runs]),
                     "each_images_per_s": ", ".join(f"{r['images_per_s']:.0f}" for r in runs),
                     "median_cpu_s": common.median([r["cpu_s"] for r in runs]),
                     "median_server_cpu_s": common.median([r["server_cpu_s"] for r in runs])})
    ratio = rows[1]["median_images_per_s"] / rows[0]["median_images_per_s"]
    targets = [common.target("reading from the local S3 server / local disk (images/s, purify's reader)",
                             ratio, 0.9)]
    notes = [f"{len(shards)} shards of {args.per_shard} images ({shard_mb:.1f} MB each); one reader in this "
             "process (what one purify reader worker does); moto's server in another process on the same cores",
             "local disk reads come from the page cache after the warm-up; the S3 path goes through HTTP on "
             "127.0.0.1 to moto, which keeps objects in memory and closes the connection after every request "
             "(werkzeug's development server): each request pays a new TCP connection, which S3 does not",
             f"S3 without read-ahead: {rows[2]['median_images_per_s'] / rows[0]['median_images_per_s']:.3f}x local",
             f"1-minute load average before / after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} CPUs"]
    common.write_results("bench_remote", args, env, {"reader": rows, "raw_bytes": raw}, targets, notes)
    return rows


if __name__ == "__main__":
    main()
