"""Class-wise deblurring throughput (purify --class-kernels): ClasswiseDeblur beside the default 1-step purifier.

    python benchmarks/deblur_speed.py [--device cpu] [--sizes 32,224] [--batch 256] [--repeats 3]

Every image is given a deblurred class (the worst case: on clean data the gate leaves every class alone and the
stage costs nothing). Prints images per second for the deblurring alone, the shipped denoiser's default
purification alone (recipe robust, PurifierConfig defaults: fp32), and both, with the machine, torch version and
commit; figures are what this machine did, not a target."""
from __future__ import annotations

import argparse
import platform

import torch

from benchmarks.common import git_state, median, time_calls
from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.deblur import ClassKernels, ClasswiseDeblur
from eclipse_stream.defaults import default_denoiser_path
from eclipse_stream.purifier import Purifier, PurifierConfig

KERNEL = [[0.45, 0.1, 0.05], [0.1, 0.1, 0.05], [0.05, 0.05, 0.05]]  # a CUDA-like blur, sum 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="32,224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    device = torch.device(a.device)
    git = git_state()
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {a.device}, commit {git['git_commit'][:7]}{'+dirty' if git['git_dirty'] else ''}")
    deblur = ClasswiseDeblur(ClassKernels(kernels={"0": KERNEL}))
    purifier = Purifier(load_denoiser(default_denoiser_path(), device=device), PurifierConfig.from_recipe(None))
    gen = torch.Generator(device=device).manual_seed(0)
    for size in (int(s) for s in a.sizes.split(",")):
        n = a.batch if size <= 64 else max(1, a.batch // 32)
        x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
        labels = [0] * n
        with torch.inference_mode():
            for name, fn in (("deblur alone", lambda ls=labels, b=x: deblur(b, ls)),
                             ("purify (default recipe) alone", lambda b=x: purifier(b, generator=gen)),
                             ("deblur + purify", lambda ls=labels, b=x: purifier(deblur(b, ls), generator=gen))):
                seconds = median(time_calls(fn, device, iters=a.repeats, max_seconds=120.0))
                print(f"{size}px batch {n}: {name}: {n / seconds:,.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
