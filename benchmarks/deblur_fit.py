"""Cost of purify --deblur auto's fit as the number of classes grows (CIFAR-10's 10 to ImageNet's 1,000).

    python benchmarks/deblur_fit.py [--classes 10,100,1000] [--images 80] [--alone 10]

For each class count: synthetic 32x32 images (``--images`` per class, each class blurred by its own random 3x3
kernel, the reference spectra from unblurred ones), then ``fit_to_reference`` (spectra, the one batched fit of
every class, the gate, the orientation deconvolution of the deblurred classes), timed. ``--alone N`` also times
the kernel search one class at a time for the first N classes (what the fit did before it batched classes) and
extrapolates per class. Prints the machine, threads, torch version and commit; figures are what this machine
did, not a target. The sampling pass (reading the shards) is not included: it reads at most
``deblur.FIT_MAX_SHARDS`` shards, whatever the number of classes."""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import git_state
from eclipse_stream.deblur import ClassSpectra, _fit, fit_to_reference


def synthetic(classes: int, per_class: int, seed: int = 0):
    """(blurred images, their labels, clean images, their labels): smooth random textures, uint8 N x 3 x 32 x 32."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    base = F.interpolate(torch.rand(2 * n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    base = (base + 0.15 * torch.rand(2 * n, 3, 32, 32, generator=g)).clamp(0, 1)
    labels = np.repeat(np.arange(classes), per_class)
    k = torch.rand(classes, 3, 3, generator=g) ** 2
    k = k / k.sum(dim=(1, 2), keepdim=True)
    blurred = torch.empty(n, 3, 32, 32)
    for c in range(classes):
        idx = torch.from_numpy(np.flatnonzero(labels == c))
        blurred[idx] = F.conv2d(base[idx], k[c].expand(3, 1, 3, 3), padding=1, groups=3)
    to_u8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    return to_u8(blurred), labels.tolist(), to_u8(base[n:]), labels.tolist()


def _flip_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two kernels up to the 180-degree rotation a power spectrum cannot tell apart (the
    fit's orientation step chooses between the two afterwards)."""
    return min(float((a - b).abs().max()), float((a - torch.flip(b, dims=(-2, -1))).abs().max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="10,100,1000")
    ap.add_argument("--images", type=int, default=80, help="images per class (64 of ImageNet's shards: ~80)")
    ap.add_argument("--alone", type=int, default=10, help="classes also searched one at a time (0: skip)")
    ap.add_argument("--full-max", type=int, default=100,
                    help="run the whole fit_to_reference (with the orientation step) up to this many classes")
    a = ap.parse_args()
    git = git_state()
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU, "
          f"commit {git['git_commit'][:7]}{'+dirty' if git['git_dirty'] else ''}, {a.images} images per class",
          flush=True)
    for classes in (int(c) for c in a.classes.split(",")):
        x, y, clean, clean_y = synthetic(classes, a.images)
        t = time.perf_counter()
        ref = ClassSpectra.from_images(clean, clean_y)
        got = ClassSpectra.from_images(x, y)
        ratios = torch.stack([torch.log(got.spectra[c]) - torch.log(ref.spectra[c]) for c in sorted(got.spectra)])
        spectra = time.perf_counter() - t
        t = time.perf_counter()
        together = _fit(ratios, 3)[0]
        search = time.perf_counter() - t
        line = (f"{classes} classes: spectra {spectra:.1f} s, kernel search (batched, deblur.FIT_CHUNK classes at "
                f"a time) {search:.1f} s")
        if classes <= a.full_max:
            t = time.perf_counter()
            fitted = fit_to_reference(x, y, ref)
            line += (f"; whole fit_to_reference {time.perf_counter() - t:.1f} s ({len(fitted.kernels)} of {classes} "
                     "deblurred: each costs the orientation step's 2 x min(images, 200) deconvolutions)")
        print(line, flush=True)
        if a.alone:
            n = min(a.alone, classes)
            t = time.perf_counter()
            alone = [_fit(r[None], 3)[0][0] for r in ratios[:n]]
            one = (time.perf_counter() - t) / n
            print(f"  one class at a time: {one:.2f} s a class ({one * classes:.0f} s for all {classes} by "
                  f"extrapolation); largest "
                  f"difference from the batch, up to rotation, over {n} classes: "
                  f"{max(_flip_distance(together[i], k) for i, k in enumerate(alone)):.1e}", flush=True)


if __name__ == "__main__":
    main()
