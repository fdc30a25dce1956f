"""Large images (issue 22): how much of the t* noise each way of running the denoiser removes, and seams.

Real photos (scikit-image's bundled images, the ``bench`` extra; centre crops of ``--sizes``), noised to
t* = 100 with a fixed seed per image (the impulse prefilter first, as the default recipe does) and denoised
in one step from the very same noised image by:

* ``native``: the UNet over the whole image (``--large-images native``);
* ``windows only``: the UNet over the whole image with attention limited to S-px windows, no tiles;
* ``independent S tiles``: S x S tiles side by side, no overlap, no blending;
* ``tiled, S tiles``: the tiled path with tiles of S px only (``tile_size`` = S);
* ``tiled`` (the default): tiles of S..2S px, at least S/8 px overlap, outputs blended.

PSNR of the purified image (uint8, as purify stores it) against the clean one, and seams: the mean squared
error along the middle of the tiles' overlaps (2 px wide; for independent tiles the 2 px either side of each
tile boundary) and along the tiles' edges, over the mean squared error elsewhere (4-px image border left out),
pooled over the images. A seam shows as a ratio above 1; the same masks applied to the native output show the
ratio's natural spread. Two sets of images: ``tuning`` (the photos the tile sizes and overlap were chosen on,
docs/large-images.md) and ``held-out`` (grayscale photos and textures first used after the choice).

    python -m benchmarks.bench_tiles_quality --plot docs/results/large-images-seams.png
    python -m benchmarks.bench_tiles_quality --quick          # 2 images at 96 px: seconds
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import common

SETS = {
    224: {"tuning": ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle"],
          "held-out": ["moon", "brick", "grass", "gravel", "cell"]},
    512: {"tuning": ["astronaut", "immunohistochemistry", "hubble_deep_field", "retina", "camera"],
          "held-out": ["moon", "brick", "grass", "gravel", "cell"]},
}
FULL = {"sizes": [224, 512], "t_star": 100, "max_images": 5}
QUICK = {"sizes": [96], "max_images": 2}


def photo(name: str, size: int) -> np.ndarray | None:
    """The centre ``size`` x ``size`` crop of a scikit-image photo as uint8 RGB, or None if it is smaller."""
    import skimage.data

    a = getattr(skimage.data, name)()
    a = a[0] if isinstance(a, tuple) else a
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    h, w = a.shape[:2]
    if min(h, w) < size:
        return None
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(a[y:y + size, x:x + size]).astype(np.uint8)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> 0..255, as Purifier.forward rounds."""
    return ((x.clamp(-1, 1) + 1) / 2 * 255).round().clamp(0, 255)


def variants(den, size: int, t_star: int):
    """name -> (function of x_t returning the purified float image, the tile grid for the seam masks)."""
    from eclipse_stream.purifier import Purifier
    from eclipse_stream.tiling import blended_output, plan_tiles

    s, f = den.image_size, den.model.config.downsample_factor
    native = Purifier(den, t_star=t_star, large_images="native")
    tiled, small = Purifier(den, t_star=t_star), Purifier(den, t_star=t_star, tile_size=s)
    chain, model = native.chain, den.model
    t = torch.zeros(1, dtype=torch.long)

    def one_step(net):
        return lambda x_t: chain.p_sample(net, x_t, t, noise=torch.zeros(())).clamp(-1, 1)

    independent = plan_tiles(size, size, s, s, 0, f)

    def independent_net(x_t, t_model):
        out = torch.empty(1, 6, size, size)
        for r0, r1, band in blended_output(model, x_t, t_model, independent, 64 * s * s):
            out[..., r0:r1, :] = band
        return out

    return {
        "native": (native.denoise, None),
        "windows only": (one_step(lambda x, tm: model(x, tm, attention_window=s)), None),
        f"independent {s} tiles": (one_step(independent_net), independent),
        f"tiled, {s} tiles": (small.denoise, small.plan(size, size) if small.tiles(size, size) else None),
        "tiled": (tiled.denoise, tiled.plan(size, size) if tiled.tiles(size, size) else None),
    }, native


def seam_masks(plan, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(overlap middles, tile edges) as boolean size x size masks of a square image's tiles, 4-px image border
    excluded."""
    mid, edge = np.zeros(size, bool), np.zeros(size, bool)
    starts, tile = plan.rows, plan.tile_h  # square crops: the columns' tiles are the rows'
    for a, b in zip(starts, starts[1:]):
        if a + tile > b:  # overlapping: the middle of the overlap
            m = (b + a + tile) // 2
            mid[m - 1:m + 1] = True
        else:  # side by side: either side of the boundary
            mid[b - 2:b + 2] = True
    for a in starts[1:]:
        edge[a:a + 2] = True
    for a in starts[:-1]:
        edge[a + tile - 2:a + tile] = True
    inner = np.zeros(size, bool)
    inner[4:-4] = True
    grid = lambda m: (m[:, None] | m[None, :]) & inner[:, None] & inner[None, :]  # noqa: E731
    return grid(mid), grid(edge & ~mid)


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=common.csv(int), default=None)
    p.add_argument("--t-star", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None, help="images per set and size")
    p.add_argument("--denoiser", default=None, help="checkpoint; default the shipped one")
    p.add_argument("--plot", type=Path, default=None, help="write the seam figure (PNG) here")
    args = common.resolve(p.parse_args(argv), FULL, QUICK)
    env = common.environment("cpu")
    from eclipse_stream.checkpoint import load_denoiser
    from eclipse_stream.defaults import default_denoiser_path
    from eclipse_stream.seeding import stream_seed

    den = load_denoiser(args.denoiser or default_denoiser_path())
    rows, seams, figure = [], [], {}
    for size in args.sizes:
        sets = SETS.get(size, SETS[224])
        fns, native = variants(den, size, args.t_star)
        ref_plan = fns["tiled"][1]
        for set_name, names in sets.items():
            errors = {name: [] for name in fns}
            psnr = {name: [] for name in fns}
            noised, used, first = [], [], {}
            for name in names:
                img = photo(name, size)
                if img is None or len(used) >= args.max_images:
                    continue
                used.append(name)
                x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
                g = torch.Generator().manual_seed(stream_seed(args.seed, name, size))
                with torch.no_grad():
                    x_t = native.noise_to_tstar(x, g)
                    clean = to_uint8(x)
                    noised.append(10 * math.log10(255 ** 2 / ((to_uint8(x_t) - clean) ** 2).mean().item()))
                    for v, (fn, _) in fns.items():
                        out = to_uint8(fn(x_t))
                        if len(used) == 1:
                            first[v] = out[0].permute(1, 2, 0).numpy().astype(np.uint8)
                        err = ((out - clean) ** 2).mean(dim=(0, 1)).numpy()
                        errors[v].append(err)
                        psnr[v].append(10 * math.log10(255 ** 2 / err.mean()))
            if not used:
                continue
            for v, (_, plan) in fns.items():
                e = np.mean(errors[v], axis=0)
                row = {"size": size, "set": set_name, "images": ", ".join(used), "method": v,
                       "psnr": f"{np.mean(psnr[v]):.2f}", "psnr_per_image": [round(q, 2) for q in psnr[v]],
                       "noised_psnr": f"{np.mean(noised):.2f}", "psnr_db": float(np.mean(psnr[v])),
                       "noised_psnr_db": float(np.mean(noised))}
                rows.append(row)
                masks_plan = plan or ref_plan
                if masks_plan is not None:
                    mid, edge = seam_masks(masks_plan, size)
                    rest = ~(mid | edge)
                    rest[:4], rest[-4:], rest[:, :4], rest[:, -4:] = False, False, False, False
                    seams.append({"size": size, "set": set_name, "method": v,
                                  "masks_of": "own tiles" if plan is not None else "the default tiles",
                                  "seam_mse_over_rest": float(e[mid].mean() / e[rest].mean()),
                                  "tile_edge_mse_over_rest": float(e[edge].mean() / e[rest].mean())
                                  if edge.any() else None})
                if set_name == "tuning":
                    figure.setdefault(size, {})[v] = (e, masks_plan, first[v], used[0])
            print(common.table([r for r in rows if r["size"] == size and r["set"] == set_name],
                               ["size", "set", "method", "psnr", "psnr_per_image", "noised_psnr"]), flush=True)

    targets = []
    for size in args.sizes:
        for set_name in ("tuning", "held-out"):
            by = {r["method"]: r for r in rows if r["size"] == size and r["set"] == set_name}
            if "tiled" in by:
                targets.append(common.target(f"{size} px, {set_name}: PSNR tiled - native (dB)",
                                             by["tiled"]["psnr_db"] - by["native"]["psnr_db"], 0.0))
        for set_name in ("tuning", "held-out"):
            by = {r["method"]: r for r in seams if r["size"] == size and r["set"] == set_name}
            if "tiled" in by and "native" in by:  # the same masks on the native output: no seams there
                targets.append(common.target(f"{size} px, {set_name}: seam ratio, tiled / native on the same masks",
                                             by["tiled"]["seam_mse_over_rest"] / by["native"]["seam_mse_over_rest"],
                                             1.10, at_most=True))
    notes = [f"denoiser {args.denoiser or 'shipped default'} (image size {den.image_size}); t* = {args.t_star}, one "
             "step, impulse prefilter, fp32; every method denoises the same noised image",
             "images: scikit-image centre crops, grayscale ones stacked to RGB; 'tuning' = the photos the defaults "
             "were chosen on, 'held-out' = first used after",
             "seam ratios: squared error pooled over the set's images, on the overlap middles (or either side of "
             "independent tiles' boundaries) and on tile edges, over the rest; the native/windows rows use the "
             "default tiles' masks (no seams there: the ratio's natural spread)",
             "seam target: the tiled seam ratio at most 1.10 x the native output's ratio on the same masks (this "
             "benchmark's own bar for 'no visible seam'); few images make the ratios noisy"]
    common.write_results("bench_tiles_quality", args, env, {"psnr": rows, "seams": seams}, targets, notes)
    if args.plot:
        plot(figure, args.plot, den.image_size)


def plot(figure: dict, path: Path, s: int) -> None:
    """Per size: the squared error by column relative to native's (mean over rows and images) of independent
    tiles and of the tiled default, where a seam is a spike at the tiles' boundaries; and the first photo's
    purified pixels around tile boundaries (a 96 px crop, enlarged 2x) by both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(figure)
    fig, axes = plt.subplots(len(sizes), 3, figsize=(12, 3.0 * len(sizes)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.4, 1, 1]})
    independent = f"independent {s} tiles"
    for row, size in zip(axes, sizes):
        ax = row[0]
        native = figure[size]["native"][0][4:-4].mean(axis=0)
        for v, colour in ((independent, "r"), ("tiled", "b")):
            ax.plot(figure[size][v][0][4:-4].mean(axis=0) / native, colour, lw=0.8, label=v)
        plan = figure[size]["tiled"][1]
        for a, b in zip(plan.cols, plan.cols[1:]):  # the tiled default's overlaps, where its tiles are blended
            ax.axvspan(b, a + plan.tile_w, color="b", alpha=0.15, lw=0)
        for c in range(s, size, s):  # independent tiles' boundaries
            ax.axvline(c - 0.5, color="r", alpha=0.3, lw=0.6, ls=":")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xlim(0, size - 1)
        ax.set_title(f"{size} px: squared error by column / native's (blue bands: tiled overlaps; "
                     f"red dots: independent tile edges)", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        y0 = x0 = max(0, min(size - 96, plan.cols[1] - 48 if len(plan.cols) > 1 else 0))
        for a, v in zip(row[1:], (independent, "tiled")):
            crop = figure[size][v][2][y0:y0 + 96, x0:x0 + 96]
            a.imshow(np.kron(crop, np.ones((2, 2, 1), dtype=np.uint8)), interpolation="nearest")
            a.set_title(f"{v}: {figure[size][v][3]}, px {y0}..{y0 + 95}", fontsize=8)
            a.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
