"""The purifier alone: images/s, achieved TFLOP/s and fraction of the bf16 matmul peak.

Grid: presets x reverse steps x batch sizes x precisions (fp32 = TF32 off, tf32 = fp32 with
TF32 matmuls and convolutions, bf16 = the purifier's bf16 autocast), optionally also with the
UNet under ``torch.compile`` (``--compile``). Each row is timed with CUDA events (perf_counter
on a CPU) after warm-up calls of a 2-step purifier at the same shapes. Inputs are real
CIFAR-10 images (uint8, on the device).

FLOPs per UNet forward are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the
meta device (2 FLOPs per multiply-add); achieved TFLOP/s = images/s x UNet calls x FLOPs.
The bf16 peak is a large ``torch.matmul`` timed in the same run on the same device.

Correctness: every variant other than fp32 eager is run on the same images with the same
generator seed as fp32 eager; the mean absolute difference of the outputs, in 0..255 units,
must be <= 1.0.

``--baseline``: the reference-style loop (fp32 with PyTorch's default TF32 flags, batch 256,
no autocast, no channels_last, a Python loop of ``diffusion.p_sample`` with fresh
``torch.randn_like`` noise each step) and our speed-up over it.

    python -m benchmarks.bench_purifier --baseline            # GPU grid
    python -m benchmarks.bench_purifier --quick --baseline    # seconds on a CPU
"""

from __future__ import annotations

import torch

from eclipse_stream.diffusion import purification_timesteps
from eclipse_stream.purifier import Purifier, PurifierConfig

from . import common

FULL = {"presets": ["paper", "small", "tiny"], "steps": [100, 10], "batch_sizes": [256, 1024],
        "precisions": ["fp32", "tf32", "bf16"], "image_size": 32, "t_star": 100, "warmup": 2, "iters": 3,
        "max_seconds": 10.0, "peak_size": 8192, "check_batch": 64, "baseline_batch": 256}
QUICK = {"presets": ["tiny"], "steps": [2], "batch_sizes": [4], "precisions": ["fp32", "bf16"], "iters": 2,
         "peak_size": 256, "check_batch": 4, "baseline_batch": 4}
# our precision names -> the purifier's (tf32 is fp32 with the TF32 flags on)
PURIFIER_PRECISION = {"fp32": "fp32", "tf32": "fp32", "bf16": "bf16", "fp16": "fp16"}
MAX_DIFF = 1.0  # mean |bf16 - fp32| in 0..255 units


def make_purifier(denoiser, t_star: int, steps: int, precision: str, model=None) -> Purifier:
    """A purifier at ``precision``; ``model`` replaces the UNet (e.g. a torch.compile'd one)."""
    purifier = Purifier(denoiser, PurifierConfig(t_star=t_star, steps=steps,
                                                 precision=PURIFIER_PRECISION[precision]))
    if model is not None:
        purifier.model = model
    return purifier


def purify(purifier: Purifier, x: torch.Tensor, precision: str, seed: int) -> torch.Tensor:
    """One purifier call with TF32 set for ``precision`` and a generator seeded with ``seed``."""
    with common.tf32(precision == "tf32"):
        return purifier(x, generator=torch.Generator(x.device).manual_seed(seed))


def precision_diff(denoiser, x: torch.Tensor, *, t_star: int, steps: int, precision: str, model=None,
                   seed: int = 0) -> float:
    """Mean |out(precision, model) - out(fp32 eager)| in 0..255 units, same images and noise.

    ``x`` is a float batch in [0, 1]; float outputs are compared (no uint8 rounding).
    """
    ref = purify(make_purifier(denoiser, t_star, steps, "fp32"), x, "fp32", seed)
    out = purify(make_purifier(denoiser, t_star, steps, precision, model), x, precision, seed)
    return float((out.float() - ref.float()).abs().mean() * 255.0)


def bf16_matmul_peak(device: torch.device, n: int, iters: int = 10) -> float:
    """TFLOP/s of an n x n x n bf16 torch.matmul (median of ``iters`` after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = common.time_calls(lambda: torch.matmul(a, b), device, warmup=3, iters=iters, max_seconds=30)
    return 2 * n**3 / common.median(times) / 1e12


def reference_chain(denoiser, t_star: int, steps: int):
    """(chain, start index): the full chain from t*-1 as the reference does, or the respaced one."""
    if steps == t_star:
        return denoiser.diffusion, t_star - 1
    chain = denoiser.diffusion.respace(purification_timesteps(t_star, steps))
    return chain, chain.num_timesteps - 1


@torch.no_grad()
def reference_purify(model, chain, x_uint8: torch.Tensor, start: int) -> torch.Tensor:
    """The ECLIPSE reference code's way: fp32, q_sample to ``start``, then p_sample down to 0."""
    x = x_uint8.float() / 127.5 - 1.0
    n = x.shape[0]
    x = chain.q_sample(x, torch.full((n,), start, device=x.device, dtype=torch.long))
    for i in reversed(range(start + 1)):
        x = chain.p_sample(model, x, torch.full((n,), i, device=x.device, dtype=torch.long))
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def time_rows(args, device, preset, denoiser, x, flops, peak, compiled):
    """Timing rows of one preset over steps x batch sizes x precision variants."""
    rows = []
    variants = [(p, False) for p in args.precisions]
    variants += [(p, True) for p in args.precisions] if compiled is not None else []
    for steps in args.steps:
        for batch in args.batch_sizes:
            xb = x[:batch]
            for precision, is_compiled in variants:
                model = compiled if is_compiled else None
                purifier = make_purifier(denoiser, args.t_star, steps, precision, model)
                # same shapes, 2 UNet calls (a 1-step chain does not build: GaussianDiffusion needs >= 2 steps)
                warm = make_purifier(denoiser, args.t_star, min(2, steps), precision, model)
                row = {"preset": preset, "steps": steps, "unet_calls": purifier.chain.num_timesteps,
                       "batch": batch, "precision": precision, "compiled": is_compiled}
                try:
                    times = common.time_calls(lambda p=purifier, b=xb, pr=precision: purify(p, b, pr, args.seed),
                                              device, warmup=args.warmup, iters=args.iters,
                                              max_seconds=args.max_seconds,
                                              warmup_fn=lambda w=warm, b=xb, pr=precision: purify(w, b, pr, 0))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                    rows.append(row)
                    continue
                sec = common.median(times)
                ips = batch / sec
                tflops = ips * row["unet_calls"] * flops / 1e12
                row.update(s_per_batch=sec, timed_calls=len(times), images_per_s=ips, tflops=tflops,
                           frac_bf16_peak=tflops / peak)
                rows.append(row)
                print(common.table([row]).splitlines()[-1], flush=True)
    return rows


def baseline_rows(args, device, preset, denoiser, x):
    """The reference-style loop at batch ``--baseline-batch`` for each steps value."""
    rows = []
    xb = x[:args.baseline_batch]
    for steps in args.steps:
        chain, start = reference_chain(denoiser, args.t_star, steps)
        times = common.time_calls(lambda c=chain, s=start: reference_purify(denoiser.model, c, xb, s), device,
                                  warmup=args.warmup, iters=args.iters, max_seconds=args.max_seconds,
                                  warmup_fn=lambda c=chain: reference_purify(denoiser.model, c, xb, 0))
        sec = common.median(times)
        rows.append({"preset": preset, "steps": steps, "unet_calls": start + 1, "batch": len(xb),
                     "precision": "fp32 (torch default TF32 flags)", "s_per_batch": sec,
                     "timed_calls": len(times), "images_per_s": len(xb) / sec})
        print(common.table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def check_rows(args, preset, denoiser, x_float, compiled):
    """bf16 / tf32 / compiled outputs vs fp32 eager on the same images and noise."""
    rows = []
    variants = [(p, False) for p in args.precisions if p != "fp32"]
    variants += [(p, True) for p in args.precisions] if compiled is not None else []
    for steps in args.steps:
        for precision, is_compiled in variants:
            diff = precision_diff(denoiser, x_float, t_star=args.t_star, steps=steps, precision=precision,
                                  model=compiled if is_compiled else None, seed=args.seed)
            rows.append({"preset": preset, "steps": steps, "batch": len(x_float), "image_size": args.image_size,
                         "variant": precision + (" compiled" if is_compiled else ""), "vs": "fp32 eager",
                         "mean_abs_diff_255": diff, "max_allowed": MAX_DIFF, "pass": diff <= MAX_DIFF})
    return rows


def compile_model(model, mode: str):
    for name in ("recompile_limit", "cache_size_limit"):  # one compiled graph per batch size and dtype
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(model, mode=mode)


def targets(args, rows, baseline, checks, device):
    def best(pred, key):
        vals = [r[key] for r in rows if key in r and pred(r)]
        return max(vals) if vals else None

    at32 = args.image_size == 32

    def paper_bf16(r):
        return at32 and r["preset"] == "paper" and r["steps"] == 100 and r["precision"] == "bf16"

    ref = [b["images_per_s"] for b in baseline if b["preset"] == "paper" and b["steps"] == 100]
    # like for like: our rate at the baseline's batch size, so a bigger batch is not counted as a speed-up
    ours_same_batch = best(lambda r: paper_bf16(r) and r["batch"] == args.baseline_batch, "images_per_s")
    fast = best(lambda r: at32 and r["precision"] == "bf16" and r["preset"] in ("paper", "small")
                and (r["preset"] == "small" or r["steps"] < 100), "images_per_s")
    worst = max((c["mean_abs_diff_255"] for c in checks), default=None)
    return [
        common.target("paper, 100 steps, bf16, 32x32: fraction of measured bf16 matmul peak",
                      best(paper_bf16, "frac_bf16_peak"), 0.40, gpu_only=True, device=device),
        common.target("paper, 100 steps, bf16: speed-up over the reference-style loop at the same batch size",
                      ours_same_batch / ref[0] if ours_same_batch and ref else None, 8, unit="x", gpu_only=True,
                      device=device),
        common.target("fast settings (small preset and/or fewer steps, bf16, 32x32): images/s",
                      fast, 2000, gpu_only=True, device=device),
        common.target("reduced precision / compiled vs fp32 eager: worst mean |diff| (0..255)",
                      worst, MAX_DIFF, at_most=True, device=device),
    ]


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--presets", type=common.csv(), default=None)
    p.add_argument("--steps", type=common.csv(int), default=None, help="reverse steps (UNet calls) per image")
    p.add_argument("--batch-sizes", type=common.csv(int), default=None)
    p.add_argument("--precisions", type=common.csv(), default=None, help="fp32, tf32, bf16, fp16")
    p.add_argument("--image-size", type=int, default=None, help="CIFAR images are resized to this")
    p.add_argument("--t-star", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (fewer if --max-seconds is hit)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop timing a row after this long")
    p.add_argument("--peak-size", type=int, default=None, help="n of the n^3 bf16 matmul peak")
    p.add_argument("--check-batch", type=int, default=None, help="images in the precision check")
    p.add_argument("--baseline", action="store_true", help="also time the reference-style loop")
    p.add_argument("--baseline-batch", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time and check the UNet under torch.compile")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--denoiser", default=None, help="a trained checkpoint instead of untrained presets")
    p.add_argument("--cudnn-benchmark", action="store_true", help="experiment: torch.backends.cudnn.benchmark")
    p.add_argument("--channels-last", action="store_true", help="experiment: UNet weights in channels_last")
    args = common.resolve(p.parse_args(argv), FULL, QUICK)
    if args.denoiser:  # one trained checkpoint instead of the untrained presets
        args.presets = [common.checkpoint_preset(args.denoiser)]
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = common.environment(device)

    n = max(args.batch_sizes + [args.check_batch, args.baseline_batch])
    x = common.decode_uint8(common.read_cifar_jpegs(n, args.cifar), n, args.image_size).to(device)
    peak = bf16_matmul_peak(device, args.peak_size)
    print(f"bf16 matmul peak ({args.peak_size}^3 on {env['device_name']}): {peak:.2f} TFLOP/s", flush=True)

    flop_rows, rows, baseline, checks = [], [], [], []
    for preset in args.presets:
        denoiser = common.make_denoiser(preset, args.image_size, seed=args.seed, checkpoint=args.denoiser,
                                        device=device)
        if args.channels_last:
            denoiser.model.to(memory_format=torch.channels_last)
        flops = common.unet_forward_flops(denoiser.model.config, args.image_size)
        flop_rows.append({"preset": preset, "image_size": args.image_size,
                          "parameters": denoiser.model.num_parameters(), "gflops_per_forward": flops / 1e9})
        print(f"{preset} at {args.image_size}x{args.image_size}: {flops / 1e9:.3f} GFLOPs per UNet forward "
              f"per image (FlopCounterMode, 2 FLOPs per multiply-add)", flush=True)
        compiled = compile_model(denoiser.model, args.compile_mode) if args.compile else None
        rows += time_rows(args, device, preset, denoiser, x, flops, peak, compiled)
        if args.baseline:
            baseline += baseline_rows(args, device, preset, denoiser, x)
        checks += check_rows(args, preset, denoiser, x[:args.check_batch].float() / 255.0, compiled)
    for r in rows:
        ref = [b for b in baseline if b["preset"] == r["preset"] and b["steps"] == r["steps"]]
        if ref and "images_per_s" in r:
            r["speedup_vs_reference"] = r["images_per_s"] / ref[0]["images_per_s"]

    peak_row = [{"what": "bf16 torch.matmul", "n": args.peak_size, "tflops": peak}]
    sections = {"flops": flop_rows, "peak": peak_row, "results": rows, "baseline": baseline, "checks": checks}
    notes = ["tflops = images/s x UNet calls x FLOPs per forward (FlopCounterMode, meta device)",
             "fp32 rows have TF32 off; tf32 rows set torch.backends.cuda.matmul.allow_tf32 and "
             "torch.backends.cudnn.allow_tf32; the baseline keeps PyTorch's default flags"]
    if not args.denoiser:
        notes.append("untrained preset weights (speed does not depend on them; the precision check is "
                     "more telling with a trained --denoiser)")
    common.write_results("bench_purifier", args, env, sections, targets(args, rows, baseline, checks, device), notes)
    return rows


if __name__ == "__main__":
    main()
