"""How much of each poison survives each purification stage: a table and a picture.

``python -m tools.stages --work-dir runs/eval-cpu`` reads the clean and poisoned training
sets the grid made, purifies the same images with and without the poison (the same noise
draw for both, so their difference is what is left of the perturbation), and writes:

* ``stages.json`` / ``stages.md``: per poison, the mean L2 and L-inf of the perturbation
  as stored, after the impulse prefilter alone, and after purification (1 step, with and
  without the prefilter), in [0, 1] pixel units; and how much of it the stage removed;
* ``stages.png``: for one image per poison, clean | poisoned | perturbation | what is left
  after purification (paper recipe) | left after impulse prefilter + purification, the
  differences amplified x8 around gray; with ``--kernels-dir`` (a ``<poison>.json`` from
  ``eclipse-stream fit-kernels`` per poison, as the grid writes to ``WORK_DIR/kernels``), also what is
  left after the class-wise deblurring alone and after deblurring + prefilter + purification.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click
import numpy as np
import torch

from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.deblur import ClassKernels, ClasswiseDeblur
from eclipse_stream.defaults import default_denoiser_path
from eclipse_stream.fsutil import file_sha256
from eclipse_stream.prefilter import impulse_filter
from eclipse_stream.purifier import Purifier, PurifierConfig

from .common import provenance, read_split, write_json
from .common import unit_nchw as _nchw
from .families import tuned_on

AMPLIFY = 8.0


def _norms(d: torch.Tensor) -> dict:
    flat = d.flatten(1)
    return {"l2_mean": float(flat.norm(dim=1).mean()), "linf_mean_255": float(flat.abs().amax(1).mean() * 255)}


def residuals(clean: np.ndarray, poisoned: np.ndarray, denoiser, steps: int = 1, seed: int = 0,
              deblur=None, t_star: int = 100) -> dict:
    """The perturbation (poisoned - clean) after each stage, both images given the same noise. ``deblur``:
    a callable on the poisoned batch (the class-wise deblurring with its labels), for the deblur stages."""
    x, xp = _nchw(clean), _nchw(poisoned)
    out = {"stored": xp - x, "impulse": impulse_filter(xp) - impulse_filter(x)}
    runs = [("purified", "none", xp), ("impulse+purified", "impulse", xp)]
    if deblur is not None:
        xd = deblur(xp)
        out["deblur"] = xd - x
        runs.append(("deblur+impulse+purified", "impulse", xd))
    for name, prefilter, poisoned_batch in runs:
        p = Purifier(denoiser, PurifierConfig(t_star=t_star, steps=steps, precision="bf16", prefilter=prefilter))
        a = p(x, torch.Generator().manual_seed(seed)).float()
        b = p(poisoned_batch, torch.Generator().manual_seed(seed)).float()
        out[name] = b - a
    return out


def _tile(img: torch.Tensor, diff: bool) -> np.ndarray:
    if diff:
        img = (0.5 + AMPLIFY * img).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def picture(rows: dict, path: Path, scale: int = 4) -> None:
    from PIL import Image, ImageDraw

    cols = ["clean", "poisoned", "perturbation x8", "left, purified x8", "left, imp.+pur. x8"]
    if any(len(tiles) > len(cols) for tiles in rows.values()):
        cols += ["left, deblur x8", "left, deblur+imp.+pur. x8"]
    size, pad, label_w, head = 32 * scale, 4, 48, 14
    size = max(size, 8 * max(len(c) for c in cols) - pad)  # room for the longest heading
    canvas = Image.new("RGB", (label_w + len(cols) * (size + pad), head + len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        draw.text((label_w + j * (size + pad), 1), c, fill="black")
    for i, (name, tiles) in enumerate(rows.items()):
        y = head + i * (size + pad)
        draw.text((2, y + size // 2), name.upper(), fill="black")
        for j, tile in enumerate(tiles):
            im = Image.fromarray(tile).resize((size, size), Image.NEAREST)
            canvas.paste(im, (label_w + j * (size + pad), y))
    canvas.save(path)


@click.command()
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/eval-cpu"), show_default=True)
@click.option("--poisons", default="urp,lsp,ar,ops", show_default=True)
@click.option("--images", type=int, default=200, show_default=True, help="Images per poison (the first N).")
@click.option("--denoiser", type=click.Path(path_type=Path), default=None, help="[default: the shipped one]")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: WORK_DIR/stages]")
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Reverse steps of the purification (100: the paper's full chain at t* = 100).")
@click.option("--t-star", type=click.IntRange(min=1), default=100, show_default=True,
              help="t* of the purification (the paper's 100; the robust recipe's default: 300 since the evening of "
                   "2026-12-07, 200 earlier that day).")
@click.option("--kernels-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of <poison>.json class kernels (fit-kernels): adds the deblur stages for those poisons.")
def main(work_dir, poisons, images, denoiser, out, steps, t_star, kernels_dir):
    """Measure and draw what is left of each poison after each purification stage."""
    torch.manual_seed(0)
    den = load_denoiser(denoiser or default_denoiser_path())
    out = out or work_dir / "stages"
    out.mkdir(parents=True, exist_ok=True)
    _, clean_all, labels = read_split(work_dir / "clean" / "train")
    # one image per class, spread over the set, so the picture and the means see every class
    idx = np.concatenate([np.flatnonzero(labels == c)[: max(1, images // 10)] for c in np.unique(labels)])
    table, rows = {}, {}
    for poison in [p.strip() for p in poisons.split(",") if p.strip()]:
        _, poisoned_all, _ = read_split(work_dir / "poisoned" / poison)
        deblur = None
        if kernels_dir is not None and (Path(kernels_dir) / f"{poison}.json").is_file():
            module = ClasswiseDeblur(ClassKernels.load(Path(kernels_dir) / f"{poison}.json"))
            deblur = functools.partial(module, labels=labels[idx].tolist())
        res = residuals(clean_all[idx], poisoned_all[idx], den, steps=steps, deblur=deblur, t_star=t_star)
        stored = _norms(res["stored"])
        table[poison] = {stage: {**_norms(d), "l2_left_fraction": _norms(d)["l2_mean"] / stored["l2_mean"]}
                         for stage, d in res.items()}
        k = 3  # one image to show
        rows[poison] = [_tile(_nchw(clean_all[idx[k:k + 1]])[0], False),
                        _tile(_nchw(poisoned_all[idx[k:k + 1]])[0], False),
                        *[_tile(res[s][k], True) for s in ("stored", "purified", "impulse+purified", "deblur",
                                                           "deblur+impulse+purified") if s in res]]
        click.echo(f"{poison}: " + ", ".join(f"{s} L2 {v['l2_mean']:.3f} ({100 * v['l2_left_fraction']:.0f}%)"
                                            for s, v in table[poison].items()))
    den_path = Path(denoiser or default_denoiser_path())
    record = {"images_per_poison": int(len(idx)), "steps": steps, "t_star": t_star, "precision": "bf16", "table": table,
              "tuned_on": {p: tuned_on(p) for p in table}, "denoiser_sha256": file_sha256(den_path),
              **provenance("cpu")}
    write_json(out / "stages.json", record)
    lines = [f"| poison | defaults tuned on it? | stored L2 | impulse only | purified (t* {t_star}, {steps} "
             f"step{'s' if steps > 1 else ''}) | impulse + purified | deblur only | deblur + impulse + purified |",
             "|---|---|---|---|---|---|---|---|"]
    for poison, t in table.items():
        cells = [f"{t[s]['l2_mean']:.3f} ({100 * t[s]['l2_left_fraction']:.0f}%)" if s in t else "—"
                 for s in ("stored", "impulse", "purified", "impulse+purified", "deblur", "deblur+impulse+purified")]
        tuned = {True: "yes", False: "**no** (held out)", None: "—"}[tuned_on(poison)]
        lines.append(f"| {poison.upper()} | {tuned} | " + " | ".join(cells) + " |")
    lines += ["", f"{len(idx)} images per poison (the first of each class), denoiser "
              f"`{record['denoiser_sha256'][:12]}`, bf16; {record.get('host', '?')}, {record.get('device', '?')}, "
              f"torch {record.get('torch', '?')}, commit {str(record.get('git_commit', '?'))[:7]}."]
    (out / "stages.md").write_text("\n".join(lines) + "\n")
    picture(rows, out / "stages.png")
    click.echo(str(out))


if __name__ == "__main__":
    main()
