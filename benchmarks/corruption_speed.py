"""Training-time corruption throughput: RandomCorruption with and without the JPEG term, images per second.

    python benchmarks/corruption_speed.py [--device cpu] [--sizes 32,224] [--batch 256] [--repeats 5]

Prints one line per (size, setting) with the machine, torch version and commit; figures are what this machine
did, not a target."""
from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from eclipse_stream.corruption import RandomCorruption


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="32,224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {a.device}, commit {commit}")
    for size in (int(s) for s in a.sizes.split(",")):
        n = a.batch if size <= 64 else max(1, a.batch // 16)
        x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=a.device)
        settings = (("paper (no JPEG, no smooth noise)", RandomCorruption(lowfreq_sigma=0.0, jpeg_quality=None)),
                    ("smooth noise, no JPEG (the default until 2026-12-06)", RandomCorruption(jpeg_quality=None)),
                    ("JPEG term (10, 50)", RandomCorruption(jpeg_quality=(10, 50))),
                    ("default (smooth noise + JPEG term (20, 60))", RandomCorruption()))
        for name, module in settings:
            module(x)  # warm-up
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                module(x)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            rate = n * a.repeats / (time.perf_counter() - t0)
            print(f"{size}px batch {n}: {name}: {rate:,.0f} img/s")


if __name__ == "__main__":
    main()
