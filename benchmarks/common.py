"""Shared benchmark helpers: command line, environment record, timing, FLOP counting, data, results.

Every benchmark script builds its parser with :func:`parser`, fills size defaults with
:func:`resolve`, records :func:`environment`, and ends with :func:`write_results`, which
prints the tables and writes ``<name>-<device-kind>-<timestamp>.json`` and ``.md``. Only
measured numbers are written: a target whose quantity was not measured says so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
# Searched in order when --cifar is not given: carried copy (device machine), then the shared data.
CIFAR_CANDIDATES = (ROOT / "carry" / "cifar10" / "train.tar.gz",
                    ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz")


# -- command line ---------------------------------------------------------------------------

def csv(kind=str):
    """argparse type for comma-separated lists: ``--steps 100,10``."""
    return lambda s: [kind(v) for v in s.split(",") if v]


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes; scripts add their own size flags with default None."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes that finish in seconds on a CPU (smoke run); explicit flags still win")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and markdown results")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 with --quick on CPU, else torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cifar", type=Path, default=None,
                   help="CIFAR-10 train.tar.gz; default: carry/cifar10/ or ../shared/data/cifar10/")
    return p


def resolve(args: argparse.Namespace, full: dict, quick: dict) -> argparse.Namespace:
    """Fill flags left at None from the quick or full defaults, then apply --threads."""
    defaults = {**full, **quick} if args.quick else full
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    threads = args.threads or (1 if args.quick and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    return args


# -- environment ----------------------------------------------------------------------------

def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict:
    """Commit and dirty flag of the checkout; BENCH_GIT_COMMIT / BENCH_GIT_DIRTY where git is absent."""
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain"])
    if commit is None or status is None:
        dirty = os.environ.get("BENCH_GIT_DIRTY")
        return {"git_commit": os.environ.get("BENCH_GIT_COMMIT", "unknown"),
                "git_dirty": None if dirty is None else dirty.lower() in ("1", "true", "yes"),
                "git_source": "environment (no git checkout)"}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"git_commit": commit.strip(), "git_dirty": bool(changed), "git_dirty_paths": changed[:50],
            "git_source": "git"}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def command_line() -> str:
    """How this run was started, as ``python -m benchmarks.<script> ...`` where possible."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = "python -m " + ".".join(script.relative_to(ROOT).with_suffix("").parts)
    return " ".join([str(script), *sys.argv[1:]])


def environment(device: str | torch.device) -> dict:
    device = torch.device(device)
    env = {
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": device_name(device),
        "device_kind": "cpu" if device.type == "cpu" else slug(device_name(device)),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": command_line(),
        **git_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count,
                   gpu_capability=f"{props.major}.{props.minor}")
    return env


# -- timing ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, *, warmup: int = 1, iters: int = 3, max_seconds: float = 10.0,
               warmup_fn=None) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on a GPU, perf_counter on a CPU.

    ``warmup_fn`` (default ``fn``) runs ``warmup`` times first; at least one timed call is made,
    then more until ``iters`` calls or ``max_seconds`` of timed calls.
    """
    for _ in range(warmup):
        (warmup_fn or fn)()
    sync(device)
    times: list[float] = []
    while len(times) < iters and (not times or sum(times) < max_seconds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(np.median(values))


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for matmuls and cuDNN convolutions (no effect on CPU); restores the previous flags."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# -- FLOPs ----------------------------------------------------------------------------------

def count_flops(fn) -> int:
    """FLOPs (2 per multiply-add) of everything ``fn`` runs, by torch.utils.flop_counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def unet_forward_flops(config, input_size: int | None = None) -> int:
    """FLOPs of one UNet forward for one image, counted on the meta device (no memory, no compute)."""
    from eclipse_stream.unet import UNet

    size = input_size or config.image_size
    with torch.device("meta"):
        model = UNet(config).eval()
        x, t = torch.zeros(1, config.in_channels, size, size), torch.zeros(1)
    with torch.no_grad():
        return count_flops(lambda: model(x, t))


# -- data -----------------------------------------------------------------------------------

def cifar_path(given: Path | None = None) -> Path:
    for p in ([given] if given else CIFAR_CANDIDATES):
        if p and p.is_file():
            return p
    where = given or " or ".join(map(str, CIFAR_CANDIDATES))
    raise SystemExit(f"CIFAR-10 train.tar.gz not found at {where}; pass --cifar PATH "
                     f"(the data lives in ../shared/data/cifar10/, or carry/cifar10/ on the device machine)")


def read_cifar_jpegs(n: int, path: Path | None = None) -> list[tuple[int, bytes]]:
    """The first ``min(n, 50000)`` (label, JPEG bytes) of CIFAR-10's train tar, read streaming."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    out: list[tuple[int, bytes]] = []
    with tarfile.open(cifar_path(path), "r|gz") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".jpg"):
                out.append((classes.index(m.name.split("/")[-2]), tf.extractfile(m).read()))
                if len(out) >= n:
                    break
    return out


def repeat(items: list, n: int) -> list:
    """``items`` cycled to length ``n`` (to reach sizes beyond the real data)."""
    return [items[i % len(items)] for i in range(n)]


def decode_uint8(jpegs: list[tuple[int, bytes]], n: int, image_size: int = 32) -> torch.Tensor:
    """``n`` images (cycled) as a uint8 (n, 3, S, S) tensor; other sizes than 32 are resized bicubically."""
    arrays = []
    for _, data in jpegs[:n]:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(np.asarray(img))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n].contiguous()


def write_shards(folder: Path, jpegs: list[tuple[int, bytes]], total: int, per_shard: int,
                 prefix: str = "part") -> list[Path]:
    """WebDataset shards (jpg + cls per sample, unique keys) with ``total`` images cycled from ``jpegs``."""
    from webdataset import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, total, per_shard)):
        path = folder / f"{prefix}-{s:05d}.tar"
        with TarWriter(str(path), encoder=False, mtime=0.0) as sink:
            for i in range(start, min(start + per_shard, total)):
                label, data = jpegs[i % len(jpegs)]
                sink.write({"__key__": f"{i:08d}", "jpg": data, "cls": str(label).encode()})
        paths.append(path)
    return paths


# -- denoisers ------------------------------------------------------------------------------

def make_denoiser(preset: str, image_size: int = 32, *, seed: int = 0, checkpoint: Path | None = None,
                  device: str | torch.device = "cpu"):
    """A loaded ``--denoiser`` checkpoint, or an untrained preset UNet with T = 4000.

    The UNet's zero-initialised output layers get small random weights (as the tests do) so
    that outputs depend on the network; speed does not depend on the weights.
    """
    from eclipse_stream.checkpoint import Denoiser, load_denoiser
    from eclipse_stream.diffusion import DiffusionConfig, GaussianDiffusion
    from eclipse_stream.unet import UNet, preset_config

    if checkpoint:
        return load_denoiser(checkpoint, device=device)
    torch.manual_seed(seed)
    model = UNet(preset_config(preset, image_size))
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    model.eval().requires_grad_(False).to(device)
    return Denoiser(model, GaussianDiffusion.from_config(DiffusionConfig()), {"untrained_preset": preset})


def checkpoint_preset(path) -> str:
    """The preset a checkpoint was trained with (its label in result rows), else "checkpoint"."""
    from eclipse_stream.checkpoint import load_denoiser

    return load_denoiser(path).metadata.get("train_args", {}).get("preset", "checkpoint")


# -- results --------------------------------------------------------------------------------

def target(name: str, measured: float | None, threshold: float, *, at_most: bool = False, unit: str = "",
           gpu_only: bool = False, device: str = "cpu") -> dict:
    """A target next to its measurement: PASS, FAIL or not-measured (never a made-up number).

    ``gpu_only`` targets (set for H100/H200) are reported as not-measured on a CPU run, with the
    CPU value shown for information.
    """
    op = "<=" if at_most else ">="
    t = {"target": name, "threshold": f"{op} {threshold:g}{unit}", "measured": measured}
    if measured is None:
        t["status"] = "not-measured"
    elif gpu_only and torch.device(device).type != "cuda":
        t["status"], t["note"] = "not-measured", "CPU run; the target is for an H100/H200"
    else:
        ok = measured <= threshold if at_most else measured >= threshold
        t["status"] = "PASS" if ok else "FAIL"
    return t


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:.3e}"
    return str(v).replace("|", "\\|")


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (columns: the given keys, else every key in first-seen order)."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, args: argparse.Namespace, env: dict, sections: dict[str, list[dict]],
                  targets: list[dict], notes: list[str] = ()) -> tuple[Path, Path]:
    """Print the tables; write ``<name>-<device-kind>-<timestamp>.json`` and ``.md`` under ``args.out``."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = env["timestamp"].replace("-", "").replace(":", "")
    stem = out / f"{name}-{env['device_kind']}-{stamp}"
    record = {"benchmark": name, "environment": env, "settings": settings, **sections,
              "targets": targets, "notes": list(notes)}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")

    kind = "CPU smoke run" if env["device"].startswith("cpu") else "GPU run"
    md = [f"# {name} ({kind})", "",
          f"- device: {env['device']} ({env['device_name']}), {env['cpu_count']} CPUs, "
          f"torch threads {env['torch_threads']}",
          f"- torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), Python {env['python']}",
          f"- commit {env['git_commit']}" + (" (dirty working tree)" if env.get("git_dirty") else ""),
          f"- when: {env['timestamp']}; command: `{env['command']}`", ""]
    md += ["## Settings", "", ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None), ""]
    for title, rows in sections.items():
        md += [f"## {title}", "", table(rows)]
    md += ["## Targets", "", table(targets, ["target", "threshold", "measured", "status", "note"])]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    stem.with_suffix(".md").write_text("\n".join(md))

    for title, rows in sections.items():
        print(f"\n== {title} ==\n" + table(rows))
    print("== targets ==\n" + table(targets, ["target", "threshold", "measured", "status", "note"]))
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {stem.with_suffix('.json')} and .md")
    return stem.with_suffix(".json"), stem.with_suffix(".md")
