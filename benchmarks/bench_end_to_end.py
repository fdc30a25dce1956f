"""Shards in -> shards out (``purify_shards``) vs the purifier alone, on the same images and settings.

Data: WebDataset shards (jpg + cls) built from real CIFAR-10 JPEGs, cycled to ``--images``.

* **purifier alone**: the same images, pre-decoded to uint8 batches in (pinned) host memory,
  each batch copied to the device, purified and copied back, one after the other.
* **end to end**: ``eclipse_stream.pipeline.purify_shards`` over the shards (read, decode,
  batch, purify, encode, write), after a warm-up run on one small shard.

Device busy fraction = (sum of the device time of the purifier calls) / wall time. The calls
are timed by handing ``purify_shards`` a purifier (``purifier=``) that brackets each call of the
ECLIPSE purifier with CUDA events (perf_counter on a CPU). Under ``--quick`` on a CPU the purifier
and the I/O share the same few cores, so the ratio says little; the target is for a GPU.

    python -m benchmarks.bench_end_to_end                     # paper, small x 100, 10 steps, bf16
    python -m benchmarks.bench_end_to_end --presets paper --steps 100
    python -m benchmarks.bench_end_to_end --quick             # seconds on a CPU
    python -m benchmarks.bench_end_to_end --device cpu --presets tiny --steps 1,10 --images 2000 \
        --per-shard 500 --batch-size 64 --workers 1 --encode-threads 1 --precision fp32   # a CPU figure
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch

from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import Purifier, PurifierConfig

from . import common

FULL = {"presets": ["paper", "small"], "steps": [100, 10], "precision": "bf16", "t_star": 100, "batch_size": 256,
        "images": 10240, "per_shard": 1024, "workers": 4, "encode_threads": 4}
QUICK = {"presets": ["tiny"], "steps": [2], "batch_size": 8, "images": 32, "per_shard": 16, "workers": 1,
         "encode_threads": 1}


class TimedPurifier:
    """A purifier (callable) that appends the device time of each call (seconds, or a CUDA event pair) to
    ``self.log``; handed to ``purify_shards(purifier=...)`` or called directly."""

    def __init__(self, purifier: Purifier):
        self.purifier, self.log = purifier, []
        self.device = purifier.device

    def __call__(self, x, generator=None):
        if x.device.type != "cuda":
            t0 = time.perf_counter()
            out = self.purifier(x, generator=generator)
            self.log.append(time.perf_counter() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.purifier(x, generator=generator)
        end.record()
        self.log.append((start, end))  # read after the run: no synchronisation inside the loop
        return out


def device_seconds(log: list) -> float:
    return sum(e if isinstance(e, float) else e[0].elapsed_time(e[1]) / 1e3 for e in log)


def purifier_alone(denoiser, pcfg: PurifierConfig, x: torch.Tensor, batch_size: int, device) -> dict:
    """Host uint8 batches -> device -> purify, queued back to back with one sync at the end (the device's best
    case: no download and no per-batch wait, which the pipeline must overlap instead); after one warm-up batch."""
    purifier = TimedPurifier(Purifier(denoiser, pcfg))
    batches = [b.pin_memory() if device.type == "cuda" else b for b in x.split(batch_size)]
    purifier(batches[0].to(device), generator=torch.Generator(device).manual_seed(0)).cpu()
    purifier.log.clear()
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        purifier(b.to(device, non_blocking=True), generator=torch.Generator(device).manual_seed(i))
    common.sync(device)
    wall = time.perf_counter() - t0
    return {"images": len(x), "wall_s": wall, "images_per_s": len(x) / wall,
            "busy_fraction": device_seconds(purifier.log) / wall}


def end_to_end(denoiser, cfg: PurifyConfig, shards: Path, warm: Path, out: Path, profile: Path | None = None) -> dict:
    """purify_shards on ``shards`` (after a warm-up run on ``warm``), timed with perf_counter; with ``profile``,
    the timed run is also profiled (cProfile of the main process, written there)."""
    purify_shards(warm, out / "warm", denoiser, cfg, progress=False)
    timed = TimedPurifier(Purifier(denoiser, cfg.purifier))
    profiler = None
    if profile is not None:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    result = purify_shards(shards, out / "purified", denoiser, cfg, purifier=timed, progress=False)
    wall = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    images = sum(s["written"] for s in result.processed)
    return {"images": images, "wall_s": wall, "images_per_s": images / wall,
            "busy_fraction": device_seconds(timed.log) / wall}


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--presets", type=common.csv(), default=None)
    p.add_argument("--steps", type=common.csv(int), default=None)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--t-star", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="images in the shards (CIFAR-10 cycled)")
    p.add_argument("--per-shard", type=int, default=None, help="images per shard")
    p.add_argument("--workers", type=int, default=None, help="PurifyConfig.workers (reader processes)")
    p.add_argument("--encode-threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="where shards go (kept); default a temp dir")
    p.add_argument("--denoiser", default=None, help="a trained checkpoint instead of untrained presets")
    p.add_argument("--profile", type=Path, default=None,
                   help="cProfile each end-to-end run's main process into PROFILE-<preset>-<steps>.prof")
    args = common.resolve(p.parse_args(argv), FULL, QUICK)
    if args.denoiser:  # one trained checkpoint instead of the untrained presets
        args.presets = [common.checkpoint_preset(args.denoiser)]
    device = torch.device(args.device)
    env = common.environment(device)

    rows = []
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        jpegs = common.read_cifar_jpegs(min(args.images, 50_000), args.cifar)
        shards = work / "shards"
        common.write_shards(shards, jpegs, args.images, args.per_shard)
        common.write_shards(work / "warm", jpegs, args.batch_size, args.batch_size, prefix="warm")
        x = common.decode_uint8(jpegs, args.images)
        for preset in args.presets:
            denoiser = common.make_denoiser(preset, 32, seed=args.seed, checkpoint=args.denoiser, device=device)
            for steps in args.steps:
                pcfg = PurifierConfig(t_star=args.t_star, steps=steps, precision=args.precision)
                cfg = PurifyConfig(purifier=pcfg, batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                                   encode_threads=args.encode_threads, device=str(device), overwrite=True)
                alone = purifier_alone(denoiser, pcfg, x, args.batch_size, device)
                prof = (args.profile.with_name(f"{args.profile.name}-{preset}-{steps}.prof")
                        if args.profile else None)
                e2e = end_to_end(denoiser, cfg, shards, work / "warm", work / f"out-{preset}-{steps}", prof)
                row = {"preset": preset, "steps": steps, "precision": args.precision, "batch": args.batch_size,
                       "images": e2e["images"], "alone_images_per_s": alone["images_per_s"],
                       "e2e_images_per_s": e2e["images_per_s"],
                       "e2e_over_alone": e2e["images_per_s"] / alone["images_per_s"],
                       "alone_busy_fraction": alone["busy_fraction"], "e2e_busy_fraction": e2e["busy_fraction"],
                       "alone_wall_s": alone["wall_s"], "e2e_wall_s": e2e["wall_s"]}
                rows.append(row)
                print(common.table([row]), flush=True)

    targets = [common.target(f"end to end / purifier alone ({r['preset']}, {r['steps']} steps, {r['precision']})",
                             r["e2e_over_alone"], 0.90, gpu_only=True, device=args.device) for r in rows]
    notes = ["busy fraction = device time of purifier calls (CUDA events; perf_counter on CPU) / wall time",
             "purifier alone: uploads + purify queued back to back, outputs left on the device, one sync at "
             "the end; the pipeline also downloads, encodes and writes, so the ratio is a strict one"]
    common.write_results("bench_end_to_end", args, env, {"results": rows}, targets, notes)
    return rows


if __name__ == "__main__":
    main()
