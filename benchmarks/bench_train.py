"""Denoiser training speed: iterations/s per preset and precision.

One timed call is one loss window of ``eclipse_stream.train.train``: ``--steps-per-call`` steps
(default its LOSS_WINDOW, 50), each the library's ``train_step`` on a batch of real CIFAR-10
images (uint8, on the device, indices from its ``ReplicatedSampler``): uniform timesteps, the
hybrid loss (under bf16 autocast for bf16), backward, AdamW step, EMA update; the losses are
summed on the device and read once (``.item()``) per call, as train does. Seconds per iteration
= call time / steps. Precisions: fp32 (TF32 off), tf32 (TF32 on), bf16.
FLOPs per iteration (forward + backward, 2 per multiply-add) are counted with FlopCounterMode
on the meta device; TFLOP/s = iterations/s x that count.

    python -m benchmarks.bench_train
    python -m benchmarks.bench_train --quick
"""

from __future__ import annotations

import contextlib
import copy

import torch

from eclipse_stream.diffusion import DiffusionConfig, GaussianDiffusion
from eclipse_stream.train import LOSS_WINDOW, ReplicatedSampler, ema_decay_at
from eclipse_stream.train import train_step as eclipse_train_step
from eclipse_stream.unet import UNet, preset_config

from . import common

FULL = {"presets": ["paper", "small", "tiny"], "precisions": ["fp32", "tf32", "bf16"], "batch_size": 128,
        "image_size": 32, "images": 2000, "steps_per_call": LOSS_WINDOW, "warmup": 1, "iters": 5,
        "max_seconds": 30.0}
QUICK = {"presets": ["tiny"], "precisions": ["fp32", "bf16"], "batch_size": 4, "images": 16, "steps_per_call": 2,
         "warmup": 1, "iters": 2}


def train_window(model, ema, opt, diffusion, data, batch_size: int, precision: str, steps: int):
    """A closure running ``steps`` training iterations with one host sync, as eclipse_stream.train does."""
    device = data.device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    sampler = ReplicatedSampler(len(data), 4, batch_size, 0, device)
    step = [0]

    def run():
        total = torch.zeros((), device=device)
        for _ in range(steps):
            batch = data[sampler.batch(step[0])]
            total += eclipse_train_step(model, ema, opt, diffusion, batch, autocast, ema_decay_at(step[0], 0.9999))
            step[0] += 1
        return (total / steps).item()

    return run


def step_flops(config, diffusion, batch_size: int, image_size: int) -> int:
    """FLOPs of one iteration's forward and backward, counted on the meta device."""
    with torch.device("meta"):
        model = UNet(config).train()
        x = torch.zeros(batch_size, config.in_channels, image_size, image_size)
        t = torch.zeros(batch_size, dtype=torch.long)
    return common.count_flops(lambda: diffusion.training_losses(model, x, t)["loss"].mean().backward())


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--presets", type=common.csv(), default=None)
    p.add_argument("--precisions", type=common.csv(), default=None, help="fp32, tf32, bf16")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="real CIFAR-10 images to sample batches from")
    p.add_argument("--steps-per-call", type=int, default=None, help="training steps per timed call (one sync)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None)
    args = common.resolve(p.parse_args(argv), FULL, QUICK)
    device = torch.device(args.device)
    env = common.environment(device)

    data = common.decode_uint8(common.read_cifar_jpegs(args.images, args.cifar), args.images,
                               args.image_size).to(device)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    rows = []
    for preset in args.presets:
        config = preset_config(preset, args.image_size)
        flops = step_flops(config, diffusion, args.batch_size, args.image_size)
        for precision in args.precisions:
            torch.manual_seed(args.seed)
            model = UNet(config).to(device).train()
            ema = copy.deepcopy(model).requires_grad_(False).eval()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            run = train_window(model, ema, opt, diffusion, data, args.batch_size, precision, args.steps_per_call)
            with common.tf32(precision == "tf32"):
                times = common.time_calls(run, device, warmup=args.warmup, iters=args.iters,
                                          max_seconds=args.max_seconds)
            sec = common.median(times) / args.steps_per_call
            rows.append({"preset": preset, "precision": precision, "batch": args.batch_size,
                         "parameters": model.num_parameters(), "s_per_iter": sec,
                         "timed_iters": len(times) * args.steps_per_call,
                         "iters_per_s": 1 / sec, "images_per_s": args.batch_size / sec,
                         "gflops_per_iter": flops / 1e9, "tflops": flops / sec / 1e12})
            print(common.table(rows[-1:]), flush=True)
            del model, ema, opt, run

    notes = ["untrained weights, lr 1e-4, no weight decay, EMA 0.9999 with warm-up, as eclipse-stream train",
             "tflops = iterations/s x FLOPs of forward + backward (FlopCounterMode); AdamW/EMA not counted"]
    common.write_results("bench_train", args, env, {"results": rows}, [], notes)
    return rows


if __name__ == "__main__":
    main()
