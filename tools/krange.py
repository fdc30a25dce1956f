"""Train where you purify: denoisers trained on timesteps [0, K) against the full range, at equal compute.

For each K (``full`` is the paper's [0, T)), train the same preset from scratch on the same
sparse clean set for the same number of optimizer steps (same preset, batch and precision:
equal compute, and equal wall-clock up to machine load, which is recorded), then measure how
much of the t* noise each removes (``tools.denoiser_quality``: PSNR against the clean image on
held-out CIFAR-10 test images) at 1, 10 and t* reverse steps. Resumable: training resumes from
its state file, and finished measurements are kept in ``results.json``.

    python -m tools.krange --sparse runs/eval-cpu/clean/sparse --k full --k 1000 --k 400 --k 200 \\
        --iterations 500 --reference eclipse_stream/assets/default-denoiser.safetensors
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from eclipse_stream.devices import resolve_device
from eclipse_stream.train import TrainConfig, train

from .common import PROJECT_ROOT, decode_image, iter_cifar_tar, provenance, read_json, resolve_data_dir, write_json
from .denoiser_quality import measure


def _k_value(k: str) -> int | None:
    return None if k == "full" else int(k)


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"].values() if "psnr" in r]
    runs.sort(key=lambda r: r["max_timestep"])
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["max_timestep"] for r in runs]
    for steps in ("1", "10", str(results["t_star"])):
        ax.plot(xs, [r["psnr"][steps] for r in runs], "o-", label=f"{steps} step(s), K-range run")
    noised = runs[0]["psnr_noised_db"] if runs else None
    if noised is not None:
        ax.axhline(noised, color="gray", ls=":", label=f"noised input ({noised:.2f} dB)")
    ref = results.get("reference")
    if ref:
        ax.axhline(ref["psnr"]["1"], color="k", ls="--", lw=1,
                   label=f"reference {ref['sha256'][:8]}, 1 step ({ref['psnr']['1']:.2f} dB)")
    ax.set_xscale("log")
    ax.set_xlabel("K: training timesteps [0, K) of T = 4000 (log)")
    ax.set_ylabel(f"PSNR vs clean at t* = {results['t_star']} (dB)")
    ax.set_title(f"{results['preset']}, {results['iterations']} steps each, {results['images']} test images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(results: dict) -> str:
    t = results["t_star"]
    lines = [f"# Denoiser training range K at equal compute (t* = {t})", "",
             f"Preset `{results['preset']}`, {results['iterations']} AdamW steps each from scratch, batch "
             f"{results['batch_size']}, {results['precision']}, sparse set `{results['sparse']}`; PSNR (dB) "
             f"against the clean image on {results['images']} CIFAR-10 test images "
             f"({results['images'] // 10} per class, never trained on), noised input and purified output from "
             f"the same noise draw (`tools.denoiser_quality`, prefilter none).", "",
             f"| training range | train wall-clock | noised | 1 step | 10 steps | {t} steps |",
             "|---|---|---|---|---|---|"]
    for _name, r in sorted(results["runs"].items(), key=lambda kv: kv[1]["max_timestep"]):
        if "psnr" not in r:
            continue
        p = r["psnr"]
        lines.append(f"| [0, {r['max_timestep']}) | {r['train_seconds'] / 60:.1f} min | {r['psnr_noised_db']:.2f} | "
                     f"{p['1']:.2f} | {p['10']:.2f} | {p[str(t)]:.2f} |")
    ref = results.get("reference")
    if ref:
        p = ref["psnr"]
        lines.append(f"| reference `{ref['sha256'][:8]}` (full range, {ref['step']} steps) | - | "
                     f"{ref['psnr_noised_db']:.2f} | {p['1']:.2f} | {p['10']:.2f} | {p[str(t)]:.2f} |")
    prov = results.get("provenance", {})
    lines += ["", f"Machine: {prov.get('host', '?')}, {prov.get('device', '?')}, torch {prov.get('torch', '?')}, "
              f"commit {prov.get('git_commit', '?')}. Wall-clock includes load from other jobs on the "
              "machine (recorded per run in the JSON)."]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--sparse", required=True, type=click.Path(exists=True), help="The sparse clean set to train on.")
@click.option("--k", "ks", multiple=True, default=("full", "1000", "400", "200"), show_default=True,
              help="Training ranges: an integer K or 'full' (repeatable).")
@click.option("--iterations", type=int, default=500, show_default=True, help="Optimizer steps per run.")
@click.option("--preset", default="tiny", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--precision", default="bf16", show_default=True)
@click.option("--t-star", type=int, default=100, show_default=True)
@click.option("--per-class", type=int, default=20, show_default=True, help="Held-out test images per class.")
@click.option("--reference", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Also measure this denoiser (e.g. the shipped default) as a reference line.")
@click.option("--work", default=str(PROJECT_ROOT / "runs" / "krange"), show_default=True)
@click.option("--out", "out_prefix", default=None, help="Also write <out>.md/.json/.png (e.g. docs/results/krange).")
@click.option("--data-dir", default=None)
def main(sparse, ks, iterations, preset, batch_size, precision, t_star, per_class, reference, work, out_prefix,
         data_dir):
    """Train one denoiser per training range K and compare their PSNR at t*."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    results = read_json(res_path) if res_path.is_file() else {"runs": {}}
    settings = {"preset": preset, "iterations": iterations, "batch_size": batch_size, "precision": precision,
                "t_star": t_star, "sparse": str(sparse), "images": 10 * per_class}
    for key, value in settings.items():
        if key in results and results[key] != value:
            raise click.ClickException(f"{res_path}: made with {key}={results[key]!r}, now {value!r}; "
                                       "use another --work")
    results.update(settings)
    device = resolve_device("cpu")
    items = iter_cifar_tar(resolve_data_dir(data_dir) / "test.tar.gz", per_class)
    images = np.stack([decode_image(data) for _, _, data in items])

    def psnr_all(path: str) -> dict:
        out = {}
        for steps in (1, 10, None):
            m = measure(path, images, t_star, steps, 100, device)
            out[str(steps or t_star)] = m["psnr_purified_db"]
            click.echo(f"  {Path(path).name}: {steps or t_star} steps {m['psnr_purified_db']:.3f} dB", err=True)
        return {"psnr": out, "psnr_noised_db": m["psnr_noised_db"], "step": m["denoiser_step"],
                "sha256": m["denoiser_sha256"]}

    if reference and "reference" not in results:
        results["reference"] = {"path": reference, **psnr_all(reference)}
        write_json(res_path, results)
    for k in ks:
        k_value = _k_value(k)
        name = f"k{k}"
        run = results["runs"].get(name, {"max_timestep": k_value or 4000, "train_seconds": 0.0, "segments": []})
        if "psnr" not in run:
            out = work / f"{name}.safetensors"
            cfg = TrainConfig(source=str(sparse), out=str(out), preset=preset, iterations=iterations,
                              batch_size=batch_size, precision=precision, max_timestep=k_value, device="cpu",
                              checkpoint_every=50, resume=Path(f"{out}.state.safetensors").is_file())
            if not (cfg.resume and read_json_step(out) >= iterations):
                click.echo(f"training {name} ({'resumed' if cfg.resume else 'from scratch'})", err=True)
                t0 = time.time()
                summary = train(cfg, progress=False)
                run["train_seconds"] += time.time() - t0
                run["segments"].append({"from": summary["resumed_from"], "to": iterations,
                                        "seconds": round(time.time() - t0, 1), "final_loss": summary["final_loss"]})
            results["runs"][name] = run
            write_json(res_path, results)
            run.update(psnr_all(str(out)))
            run["out"] = str(out)
            results["runs"][name] = run
            write_json(res_path, results)
    results["provenance"] = provenance(device)
    write_json(res_path, results)
    if out_prefix:
        prefix = Path(out_prefix)
        write_json(prefix.with_suffix(".json"), results)
        prefix.with_suffix(".md").write_text(_markdown(results))
        _plot(results, prefix.with_suffix(".png"))
    click.echo(_markdown(results))


def read_json_step(out: Path) -> int:
    """The step of an exported denoiser (0 if none): a finished run is not trained again."""
    if not out.is_file():
        return 0
    from eclipse_stream.checkpoint import load_denoiser
    return int(load_denoiser(str(out), device="cpu").metadata.get("step") or 0)


if __name__ == "__main__":
    main()
