"""The ``eclipse-stream`` command line: train, purify, preview, scan, info, convert."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import signal
import sys
import typing

import click

from . import __version__
from .config import PurifierConfig, PurifyConfig
from .convert import SCHEDULES, ConvertConfig
from .defaults import (
    CORRUPTIONS,
    DEBLUR,
    DEFAULT_RECIPE,
    IMAGE_EXTENSIONS,
    IMAGE_SIZES,
    LARGE_IMAGES,
    ON_ERROR,
    PRECISIONS,
    PREFILTERS,
    PRESETS,
    RECIPE_DEBLUR,
    RECIPES,
    RESOLUTIONS,
    TRAIN_PRECISIONS,
)
from .deblur import fit_kernels_from_shards
from .errors import EclipseError, Interrupted
from .preview import preview as make_preview
from .scan.config import GROUP_MODES, ScanConfig
from .train import TrainConfig

_IMAGE_EXTS = "/".join(IMAGE_EXTENSIONS)


def _option(source, name: str, *decls: str, **kwargs):
    """A click option whose default, and type unless given, come from ``source``: field ``name`` of a config
    dataclass or keyword ``name`` of a function, so that every default is written once, there (``--help``
    shows it; tests/test_cli.py checks every option against its source).

    ``decls`` default to ``--name-with-dashes``; a bool is a flag; ``int | None`` is an int; a field's default
    factory is called when the command runs; a Choice of strings gets its default as a string.
    """
    if dataclasses.is_dataclass(source):
        field = {f.name: f for f in dataclasses.fields(source)}[name]
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory
    else:
        default = inspect.signature(source).parameters[name].default
    if default is dataclasses.MISSING or default is inspect.Parameter.empty:
        raise TypeError(f"{source.__name__}.{name} has no default to give --{name.replace('_', '-')}")
    hint = typing.get_type_hints(source)[name]
    hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # X | None: X
    if hint is bool:
        kwargs["is_flag"] = True
    elif "type" not in kwargs and hint in (int, float, str):
        kwargs["type"] = hint
    if isinstance(kwargs.get("type"), click.Choice) and default is not None:
        default = str(default)  # e.g. --image-size 32 among "32", "64", ... (click 8.1 compares strings)
    return click.option(*(decls or [f"--{name.replace('_', '-')}"]), default=default, **kwargs)


_train = functools.partial(_option, TrainConfig)
_purify = functools.partial(_option, PurifyConfig)
_purifier = functools.partial(_option, PurifierConfig)
_preview = functools.partial(_option, make_preview)
_scan = functools.partial(_option, ScanConfig)
_convert = functools.partial(_option, ConvertConfig)
_fit_kernels = functools.partial(_option, fit_kernels_from_shards)


def _friendly_errors(fn):
    """Show library errors as one line on stderr and exit non-zero, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EclipseError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except ValueError as e:  # config validation
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (Interrupted, KeyboardInterrupt) as e:
            what = e if isinstance(e, Interrupted) else "interrupted by SIGINT"
            click.echo(f"error: {what}; finished shards are kept, rerun the same command to resume", err=True)
            sys.exit(getattr(e, "exit_code", 128 + signal.SIGINT))

    return wrapper


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM (a scheduler, ``kill``, torchrun) raises :class:`Interrupted` in the main thread, so the run
    unwinds like on Ctrl-C: reader workers stopped, partial files removed, exit status 143."""

    def handler(signum, frame):
        # the workers' SIGCHLD alarm must not replace this exception while the run unwinds
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="eclipse-stream")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """ECLIPSE purification of poisoned image datasets, as a WebDataset/FFCV pipeline stage."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _set_storage_options(ctx, param, value):
    from .storage import set_options

    if value is None:
        return
    try:
        options = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"endpoint_url\": \"http://host:9000\"}'")
    set_options(options)


def _storage_option(fn):
    return click.option("--storage-options", expose_value=False, callback=_set_storage_options,
                        help="JSON object of fsspec options for s3://, gs://, ... inputs and outputs, e.g. "
                             "'{\"endpoint_url\": \"http://localhost:9000\"}' or '{\"anon\": true}'; "
                             "credentials come from the usual environment and config files.")(fn)


def _device_option(fn):
    # None: every config's default device (cuda when present, else cpu); tests/test_cli.py checks they agree
    return click.option("--device", help="torch device; default cuda when present, else cpu.")(fn)


@main.command()
@click.argument("sparse")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the exported (EMA) denoiser, a .safetensors file.")
@_train("preset", type=click.Choice(PRESETS), help="UNet size: paper (52.5M params), small (7.3M), tiny (tests/CPU).")
@_train("image_size", type=click.Choice([str(n) for n in IMAGE_SIZES]),
        help="Training resolution; other image sizes are resized (shorter side) and centre-cropped.")
@_train("iterations", help="Optimizer steps (paper: 250K).")
@_train("batch_size")
@_train("lr", help="AdamW learning rate.")
@_train("ema_decay", help="EMA decay (with warm-up (1+s)/(10+s)).")
@_train("replicate",
        help="Replication M of the sparse set (Algorithm 1): the epoch is M copies, reshuffled per epoch.")
@_train("diffusion_steps", help="T of the cosine schedule.")
@_train("max_timestep", help="Train on timesteps [0, K) of the T-step schedule only (purification uses t* <= K); "
                             "default: all of T, as the paper.")
@_train("init_from", type=click.Path(exists=True, dir_okay=False),
        help="Start from this exported denoiser's weights (fine-tuning, e.g. onto a --max-timestep range); its "
             "sha256 is recorded. Default: random initialisation.")
@_train("precision", type=click.Choice(TRAIN_PRECISIONS))
@_train("seed")
@_device_option
@_train("checkpoint_every", help="Steps between training-state saves.")
@_train("state", help="Training-state file; default <out>.state.safetensors.")
@_train("resume", help="Continue from the training state at its saved step.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_storage_option
@_friendly_errors
def train(sparse, out, image_size, quiet, **kwargs):
    """Train the purification denoiser on a sparse clean set.

    SPARSE is an image folder, a folder or brace pattern of WebDataset .tar shards, or an FFCV .beton;
    shards may be URLs as for purify.
    """
    from .train import train as run_train

    cfg = TrainConfig(source=sparse, out=out, image_size=int(image_size), **kwargs)
    summary = run_train(cfg, progress=not quiet)
    click.echo(json.dumps(summary, indent=2))


def _purifier_options(seed_source):
    """Options shared by purify and preview (whose --seed defaults come from ``seed_source``)."""
    opts = [
        click.option("--denoiser", "-d",
                     help="Denoiser checkpoint; default: the one shipped in the package (see README)."),
        # --t-star, --steps and --prefilter: None is "the recipe's" (PurifierConfig.from_recipe)
        click.option("--t-star", "t_star", type=int, default=None,
                     help="Forward noise level t* on the checkpoint's T [default: the recipe's: "
                          + ", ".join(f"{name} {RECIPES[name]['t_star']}" for name in sorted(RECIPES)) + "]."),
        click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=DEFAULT_RECIPE,
                     help="Named settings: paper (ECLIPSE as published: full chain, no prefilter) or robust "
                          "(impulse prefilter + the 1-step x0 estimate); --steps/--prefilter override it."),
        # --steps and --prefilter: None is "the recipe's" (PurifierConfig.from_recipe), not the field's default
        click.option("--steps", type=int, default=None,
                     help="Reverse steps [default: the recipe's; paper: t*, the full chain]. Fewer use the "
                          "respaced chain; 1 is the x0 estimate at t*."),
        _purifier("precision", type=click.Choice(PRECISIONS)),
        _option(seed_source, "seed"),
        _purifier("gray_p", help="Corruption: grayscale probability p."),
        _purifier("noise_sigma", help="Corruption: noise std in [0,1] units."),
        click.option("--prefilter", type=click.Choice(PREFILTERS), default=None,
                     help="Before the noise [default: the recipe's]: none (the paper), or impulse (replace "
                          "isolated extreme pixels, e.g. one-pixel shortcuts, by their neighbours' median)."),
        _device_option,
    ]

    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def _resolve_denoiser(path):
    from .defaults import default_denoiser_path

    if path is not None and not path.strip():  # an unset shell variable must not mean "the shipped model"
        raise click.BadParameter("empty path; leave the option out to use the shipped denoiser",
                                 param_hint="'--denoiser'")
    return path if path is not None else str(default_denoiser_path())


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.argument("out")
@_purifier_options(PurifyConfig)
@_purify("batch_size", help="Images per device batch.")
@_purifier("corruption", type=click.Choice(CORRUPTIONS),
           help="baked: store one fixed corruption draw; none: leave it to training time.")
@_purify("jpeg_quality", help="Quality for re-encoded JPEG/WebP fields.")
@_purify("image_key", help="Field(s) to purify, comma-separated; other image fields are then left unchanged. "
                           f"Default: every field whose extension is {_IMAGE_EXTS} (every RGBImageField of a "
                           ".beton).")
@_purify("max_pixels",
         help="Reject images with more pixels (decompression bombs); the default is Pillow's error limit.")
@_purify("resolution", type=click.Choice(RESOLUTIONS),
         help="native: purify and store at each image's size; model: shorter side to the denoiser's size (aspect "
              "kept), stored at that size.")
@_purify("bucket_multiple", help="Batch images padded to multiples of this.")
@_purifier("large_images", type=click.Choice(LARGE_IMAGES),
           help="Images with a side over twice the denoiser's training size: tiled (overlapping tiles of that "
                "size, blended; cost per pixel as for small images) or native (the UNet over the whole image: "
                "cost grows with the square of its pixels).")
@_purifier("tile_batch_pixels",
           help="Tiled images: tile pixels per UNet call (the memory of one call); more is faster on a GPU.")
@_purify("on_error", type=click.Choice(ON_ERROR),
         help="fail: stop at the first bad sample; skip: record it in the shard's rejects and go on.")
@_purify("workers", show_default="one per core, at most 8",
         help="Decode worker processes, each reading whole shards.")
@_purify("encode_threads", help="Threads encoding and writing outputs.")
@_purify("read_ahead_mib",
         help="Remote inputs: MiB each reader worker holds ahead of its decoder per stream (the shard being "
              "read, and the next one, started early); 0 reads on demand.")
@_purify("compile", "--compile", "compile_",
         help="torch.compile the denoiser: 2-3x faster on CPU after a compilation of a minute or so per batch "
              "shape; may differ from an eager run in the last bit, so it is recorded.")
@_purify("class_kernels", type=click.Path(dir_okay=False),
         help="Deconvolve every image with its class's kernel before purifying (a file from `eclipse-stream "
              "fit-kernels`; against class-wise convolution poisons such as CUDA). Needs a label per sample.")
@click.option("--deblur", type=click.Choice(DEBLUR), default=None,
              help="auto: fit each class's blur against the denoiser's record of its sparse clean set (class "
                   "spectra, written by `train` from labelled shards) and deconvolve the classes with a real blur "
                   "(CUDA-style poisons); with no record, no labels or no blur found, nothing changes. off: never. "
                   "--class-kernels takes precedence. [default: the recipe's: " +
                   ", ".join(f"{v} for {k}" for k, v in RECIPE_DEBLUR.items()) + "]")
@_purify("label_key", help="With --class-kernels or --deblur auto: the label field; default the first of cls, class, "
                           "label, target.")
@_purify("overwrite", help="Redo shards that are already done.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_storage_option
@_friendly_errors
def purify(inputs, out, denoiser, recipe, t_star, steps, precision, seed, gray_p, noise_sigma, prefilter, corruption,
           max_pixels, quiet, compile_, large_images, tile_batch_pixels, **kwargs):
    """Purify shards: INPUTS... (folders of .tar/.beton, brace patterns or files) into folder OUT.

    INPUTS may be URLs: http(s):// and pipe:CMD (streamed, as WebDataset opens them, brace patterns too)
    and fsspec URLs (s3://bucket/prefix/, gs://..., globs); OUT may be an fsspec URL (s3://bucket/out).

    One output shard per input shard, same file name. Each finished shard gets a
    <name>.stats.json; a rerun skips finished shards. manifest.json is written last.
    Run under torchrun to split shards over GPUs and nodes.
    """
    pcfg = PurifierConfig.from_recipe(recipe, t_star=t_star, steps=steps, precision=precision,
                                      corruption=corruption, gray_p=gray_p, noise_sigma=noise_sigma,
                                      prefilter=prefilter, large_images=large_images,
                                      tile_batch_pixels=tile_batch_pixels)
    kwargs["deblur"] = kwargs["deblur"] or RECIPE_DEBLUR[recipe]
    cfg = PurifyConfig(purifier=pcfg, seed=seed, max_pixels=max_pixels, compile=compile_, **kwargs)
    with _stop_on_sigterm():
        status = run_purify(list(inputs), out, cfg, denoiser=_resolve_denoiser(denoiser), progress=not quiet)
    if status:
        sys.exit(status)


def run_purify(inputs, out, cfg: PurifyConfig | None = None, *, denoiser=None, purifier=None,
               progress: bool = True) -> int:
    """``eclipse-stream purify`` from Python: run, print the JSON summary (and the failed shards to stderr),
    return the exit status (0, or 1 when shards could not be read). ``denoiser`` None is the shipped one;
    ``purifier`` replaces the ECLIPSE purifier, as in :func:`~eclipse_stream.pipeline.purify_shards`."""
    from .pipeline import purify_shards

    result = purify_shards(inputs, out, denoiser, cfg, purifier=purifier, progress=progress)
    summary = {
        "processed": len(result.processed), "already_done": len(result.skipped),
        "written": sum(s["written"] for s in result.processed),
        "rejected": sum(s["rejected"] for s in result.processed),
        "failed_shards": result.failed, "manifest": result.manifest,
    }
    click.echo(json.dumps(summary, indent=2))
    if result.failed:
        names = ", ".join(f["shard"] for f in result.failed)
        click.echo(f"error: {len(result.failed)} shard(s) could not be read: {names}; "
                   f"no output was written for them", err=True)
        return 1
    return 0


@main.command()
@click.argument("shard", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Image file to write, in the format its suffix names (.png, .jpg, .webp, ...).")
@_preview("n", "--num", "-n", "n", help="How many samples (rows), 1..256.")
@_preview("image_key", help=f"Field to show; default the first of {_IMAGE_EXTS}.")
@_purifier_options(make_preview)
@_friendly_errors
def preview(shard, output, n, image_key, denoiser, recipe, t_star, steps, precision, seed, gray_p, noise_sigma,
            prefilter, device):
    """Write a grid of a few samples of SHARD: input / noised at t* / purified / corrupted."""
    cfg = PurifierConfig.from_recipe(recipe, t_star=t_star, steps=steps, precision=precision, gray_p=gray_p,
                                     noise_sigma=noise_sigma, prefilter=prefilter)
    path = make_preview(shard, _resolve_denoiser(denoiser), output, n=n, config=cfg, seed=seed,
                       image_key=image_key, device=device)
    click.echo(str(path))


@main.command("fit-kernels")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--clean", "clean", multiple=True, required=True,
              help="The sparse clean set's shards (same classes); repeatable.")
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False),
              help="Write the kernels (JSON) here; purify --class-kernels reads it.")
@_fit_kernels("per_class", type=click.IntRange(20, 100_000),
              help="Images sampled per class from INPUTS (and at most this many from --clean).")
@_fit_kernels("label_key", help="Label field (tar extension or .beton field); default first of cls, class, label, "
                                "target.")
@_fit_kernels("image_key", help=f"Image field; default the first of {_IMAGE_EXTS}.")
@_fit_kernels("seed", help="Which images are sampled.")
@_fit_kernels("max_shards", type=click.IntRange(1, 10_000_000),
              help="Sample at most this many of INPUTS' shards, evenly spread (purify --deblur auto does the same); "
                   "a number at least their count reads all.")
@_fit_kernels("kernel_size", type=click.IntRange(1, 15),
              help="Side of the fitted kernels (odd). 3 fits CUDA's 3x3 blurs; 5 fits its 5x5 variant for every "
                   "class but is less safe: it deblurred one SEP class by mistake (docs/purify.md).")
@_fit_kernels("wide_kernel_size", type=click.IntRange(0, 15),
              help="A class the --kernel-size fit explains poorly is fitted again this wide (odd; 0: never), and "
                   "takes that kernel only if it explains at least 90% of the class's spectral difference and 15 "
                   "points more (CUDA's 5x5 variant; purify --deblur auto does the same).")
@_storage_option
@_friendly_errors
def fit_kernels(inputs, clean, out, **kwargs):
    """Fit a deblurring kernel per class of INPUTS against the clean set (class-wise convolution poisons).

    Per class, the power spectrum of INPUTS' images over the clean images' estimates a blur; classes whose
    fitted blur is small or mostly sampling noise are left alone. Prints one line per class and writes
    --out for `purify --class-kernels`. docs/purify.md, "Class-wise deblurring".
    """
    from .outputs import check_output_files

    out = check_output_files({"--out": out}, [*inputs, *clean], "fit-kernels")["--out"]
    kernels = fit_kernels_from_shards(list(inputs), list(clean), log=click.echo, **kwargs)
    kernels.save(out)
    click.echo(f"{len(kernels.kernels)} of {len(kernels.classes)} classes deblurred; wrote {out}")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_scan("label_key", help="Label field (tar extension or .beton field); default first of cls, class, label, "
                          "target (a .beton: else its first IntField).")
@_scan("image_key", help=f"Image field; default the first of {_IMAGE_EXTS}.")
@_scan("per_class", help="Images sampled per class (uniformly over all INPUTS, seeded); the bounds are calibrated "
                         "for 25 to 200.")
@_scan("thorough",
       help="Also run the slower probes (a small CNN's learning dynamics; tens of seconds on a CPU).")
@_scan("by", type=click.Choice(GROUP_MODES),
       help="Also judge each shard (or each INPUTS argument) on a sample of its own, to find a poisoned minority "
            "of sources; none: the whole input only.")
@_scan("group_per_class", help="Images sampled per class from each shard or input (--by).")
@_scan("max_groups",
       help="With more shards than this, consecutive shards are judged together in this many groups.")
@_scan("probe_size", help="The probes see a window of this many pixels square of each image.")
@_scan("view", type=click.Choice(["crop", "resize"]),
       help="crop: central window at native resolution; resize: whole image resized.")
@_scan("folds", help="Cross-validation folds (2..4).")
@_scan("seed", help="Sampling, folds and the shuffled-label control.")
@_device_option
@click.option("--reference", multiple=True,
              help="Clean shards of the same classes (e.g. the sparse clean set); repeatable. The verdict then "
                   "compares against them at the same per-class count.")
@_scan("threshold", help="Score (with --reference: excess over the reference's) from which the verdict is "
                          "'likely poisoned', for every probe; default: each probe's calibrated bound at the "
                          "sample's size.")
@_scan("clean_below", help="Score (or excess) under which a probe sees no sign; default: calibrated.")
@_scan("max_pixels", help="Reject images with more pixels (decompression bombs); as purify.")
@_scan("on_error", type=click.Choice(ON_ERROR),
       help="fail: stop at the first bad sampled image; skip: record it in the report and go on.")
@_scan("null", "--null/--no-null", help="Also probe the same images with shuffled labels (plot).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the PNG plot here.")
@_storage_option
@_friendly_errors
def scan(inputs, reference, threshold, clean_below, max_pixels, report, plot, **kwargs):
    """Does a labelled dataset look poisoned (availability poisons / shortcuts)? INPUTS as for purify.

    Samples --per-class images of every class (and --group-per-class of every shard), asks quick probes
    (closed-form, seconds on a CPU) how well held-out labels can be predicted, and compares each probe with
    its bounds calibrated on clean photos. Prints the verdict and the evidence; docs/scan.md says what was
    tested.

    Exit status: 0 no sign of the poison types tested, 10 likely poisoned, 11 inconclusive;
    1 or 2 on errors (2: bad input, as purify).
    """
    from .outputs import check_output_files
    from .scan import scan_shards

    hi, lo = ("relative_threshold", "relative_clean_below") if reference else ("threshold", "clean_below")
    bounds = {hi: threshold, lo: clean_below}  # None: each probe's calibrated bound
    if max_pixels < 1:
        raise click.BadParameter("must be positive", param_hint="--max-pixels")
    cfg = ScanConfig(max_pixels=max_pixels, **bounds, **kwargs)
    check_output_files({"--report": report, "--plot": plot}, [*inputs, *reference], "scan")  # before reading
    result = scan_shards(list(inputs), cfg, reference=list(reference) if reference else None)
    click.echo(result.summary())
    if report:
        click.echo(f"report: {result.write_json(report)}")
    if plot:
        click.echo(f"plot: {result.plot(plot)}")
    sys.exit(result.exit_code)


@main.command()
@click.argument("checkpoint", type=click.Path())
@_friendly_errors
def info(checkpoint):
    """Print a denoiser checkpoint's metadata (preset, schedule, training arguments)."""
    from .checkpoint import load_denoiser

    if not checkpoint.strip():  # as --denoiser '': an unset shell variable is a usage error, not "not found"
        raise click.BadParameter("empty path", param_hint="'CHECKPOINT'")
    den = load_denoiser(checkpoint)
    click.echo(json.dumps({"path": checkpoint, "sha256": den.sha256, **den.metadata}, indent=2))


@main.command()
@click.argument("reference", type=click.Path())
@click.argument("out", type=click.Path())
@_convert("num_heads", help="Attention heads the model was trained with: a .pt does not record it "
                             "(improved-diffusion's and ECLIPSE's default is 4).")
@_convert("image_size", help="Training resolution [default: inferred from the channel multipliers, "
                             "improved-diffusion's table: (1,2,2,2) 32, (1,2,3,4) 64, (1,1,2,3,4) 128, "
                             "(1,1,2,2,4,4) 256].")
@_convert("diffusion_steps", help="T of the schedule the model was trained with (not in a .pt; ECLIPSE: 4000).")
@_convert("noise_schedule", type=click.Choice(SCHEDULES),
          help="Schedule the model was trained with (not in a .pt; ECLIPSE: cosine).")
@_convert("max_timestep", help="The model was trained on timesteps [0, K) only (purify then refuses a larger "
                               "--t-star); default: all of T, as improved-diffusion trains.")
@_convert("overwrite", help="Replace OUT if it exists (never the input).")
@_friendly_errors
def convert(reference, out, **kwargs):
    """Convert an improved-diffusion checkpoint (REFERENCE, e.g. ECLIPSE's ema_0.9999_250000.pt) to OUT.

    The architecture is read from the weights' names and shapes; the file is loaded without running any code
    from it (torch.load weights_only=True). OUT is an eclipse-stream denoiser (.safetensors) for purify,
    preview and EclipseTransform; its metadata records the source file's sha256.
    """
    from .convert import convert_checkpoint

    summary = convert_checkpoint(reference, out, ConvertConfig(**kwargs))
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
