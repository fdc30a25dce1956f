"""The defenses of the paper's Tables 1 and 3, as pieces the victim trainer composes.

A defense can act at three places: once on the training images (ISS grayscale, ISS
JPEG-10, ECLIPSE's diffusion purification, which runs beforehand on the shards via the
package's CLI), at every training step (the corruption compensation of ECLIPSE, fresh
random per image per epoch, after crop and flip), and on the test images (ISS grayscale
only: a model trained on gray images is tested on gray images).

Names: ``none``, ``iss-gray``, ``iss-jpeg10``, ``corruption`` (training-time corruption
alone), ``eclipse`` (purified shards + corruption) and ``eclipse-steps<K>`` (purified with
K reverse steps instead of the default); ``-t<T>`` after the steps sets purify's t* (``--t-star``; without it,
the paper recipe's t* = 100). Suffixes: ``+impulse`` (purify's impulse prefilter),
``-grayP`` (the corruption's grayscale probability) and ``-lfS`` (the corruption's low-frequency
noise std, 0 unless given: every row without it is the paper's corruption) and ``-jqLO-HI`` (the
corruption's JPEG quantization at a quality drawn per image from [LO, HI]; off unless given; ``-jyLO-HI``: the same
on luma only, the colour kept exact);
``corruption[-grayP][-wnS]-lfS[-jqLO-HI|-jyLO-HI]`` is that corruption alone (``-wnS``: its white noise std, the
paper's 0.05 unless given); ``purify-steps<K>[+impulse]`` is the purified data without any training-time corruption
(for ablations). A ``deblur+`` prefix on an ``eclipse...``/``purify...``
defense deconvolves each class first (``eclipse-stream fit-kernels`` on the set against the sparse clean set,
then ``purify --class-kernels``).
The package's default (``tools.grid.RECOMMENDED``) is ``deblur+eclipse-steps1-t300+impulse-lf0.05-jy10-50`` since
2026-12-08 (the JPEG term on luma only); ``JQ2060``, ``deblur+eclipse-steps1-t300+impulse-lf0.05-jq20-60``, from
2026-12-07 evening (t* 200 for part of that day, ``T200``; t* 100 before:
``deblur+eclipse-steps1+impulse-lf0.05-jq20-60``); the stronger JPEG range, the default for
part of 2026-12-06, is ``...-jq10-50`` (``PREVIOUS``); the default until 2026-12-06, without the JPEG term,
``eclipse-steps1+impulse-lf0.05`` (``NO_JPEG``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .common import PROJECT_ROOT, ToolError, is_complete

# The paper's corruption settings (Sec. 4.1): grayscale with p = 0.4, Gaussian sigma = 0.05 in [0, 1].
CORRUPTION_P = 0.4
CORRUPTION_SIGMA = 0.05
ISS_JPEG_QUALITY = 10
DEFENSES = ("none", "iss-gray", "iss-jpeg10", "corruption", "eclipse")


@dataclass(frozen=True)
class Defense:
    """Where a defense acts; see the module docstring."""

    name: str
    train_once: str | None = None      # "gray" | "jpeg10" | None
    test_once: str | None = None       # "gray" | None
    train_corruption: bool = False
    purify: bool = False
    purify_steps: int | None = None    # None: the paper recipe's (t* reverse steps)
    t_star: int | None = None          # purify --t-star; None: the paper recipe's (100)
    prefilter: str = "none"            # purify --prefilter, always passed: "none" is the paper's recipe
    gray_p: float = 0.4                # training-time corruption: grayscale probability (the paper's 0.4)
    lowfreq_sigma: float = 0.0         # training-time corruption: low-frequency noise std (0: the paper's)
    jpeg_quality: tuple[int, int] | None = None  # training-time corruption: JPEG quality range (None: the paper's)
    jpeg_chroma: bool = True           # the JPEG term quantizes chroma too (-jq); False: luma only (-jy)
    noise_sigma: float = CORRUPTION_SIGMA  # training-time corruption: white noise std (the paper's 0.05)
    deblur: bool = False               # purify --class-kernels (fitted by `eclipse-stream fit-kernels` per set)

    def to_dict(self) -> dict:
        return {"name": self.name, "train_once": self.train_once, "test_once": self.test_once,
                "train_corruption": self.train_corruption, "purify": self.purify,
                "purify_steps": self.purify_steps, **({"t_star": self.t_star} if self.t_star else {}),
                "prefilter": self.prefilter, "gray_p": self.gray_p,
                **({"lowfreq_sigma": self.lowfreq_sigma} if self.lowfreq_sigma else {}),
                **({"jpeg_quality": list(self.jpeg_quality)} if self.jpeg_quality else {}),
                **({"jpeg_chroma": False} if self.jpeg_quality and not self.jpeg_chroma else {}),
                **({"noise_sigma": self.noise_sigma} if self.noise_sigma != CORRUPTION_SIGMA else {}),
                **({"deblur": True} if self.deblur else {})}

    @property
    def purify_tag(self) -> str:
        """Folder suffix of this defense's purified sets: one purification per distinct setting."""
        return (f"-steps{self.purify_steps}" if self.purify_steps else "") + (
            f"-t{self.t_star}" if self.t_star else "") + (
            f"-{self.prefilter}" if self.prefilter != "none" else "") + ("-deblur" if self.deblur else "")

    def purify_args(self) -> tuple[str, ...]:
        """Pinned to the paper's recipe, with this defense's prefilter, and deblurring only where the name says
        (``--deblur off``; a ``deblur+`` defense passes ``--class-kernels``): the CLI's defaults never leak in."""
        if not self.purify:
            return ()
        return ("--recipe", "paper", "--prefilter", self.prefilter) + (
            ("--t-star", str(self.t_star)) if self.t_star else ()) + (() if self.deblur else ("--deblur", "off"))


# the corruption's JPEG quality range: -jq10-50 (a JPEG: luma and chroma), -jy10-50 (luma only, colour exact)
_JQ = r"(?:-j([qy])(\d+)-(\d+))?"


def _jpeg(match: re.Match, group: int) -> dict:
    """``jpeg_quality`` and ``jpeg_chroma`` of a name's JPEG suffix, whose letter is group ``group``."""
    if match.group(group) is None:
        return {}
    lo, hi = int(match.group(group + 1)), int(match.group(group + 2))
    if not 1 <= lo <= hi <= 100:
        raise ToolError(f"defense {match.group(0)!r}: JPEG quality range must have 1 <= LO <= HI <= 100")
    return {"jpeg_quality": (lo, hi), "jpeg_chroma": match.group(group) == "q"}


def _positive(digits: str | None) -> bool:
    return digits is None or int(digits) > 0


def get_defense(name: str) -> Defense:
    """Parse a defense name; ``eclipse-steps20`` is ECLIPSE with 20 reverse steps, ``eclipse-steps1+impulse``
    adds purify's impulse prefilter (``+none`` pins the paper's no-prefilter explicitly), and a ``-gray0.8``
    suffix sets the training-time corruption's grayscale probability (default: the paper's 0.4)."""
    table = {
        "none": Defense("none"),
        "iss-gray": Defense("iss-gray", train_once="gray", test_once="gray"),
        "iss-jpeg10": Defense("iss-jpeg10", train_once="jpeg10"),
        "corruption": Defense("corruption", train_corruption=True),
        "eclipse": Defense("eclipse", train_corruption=True, purify=True),
    }
    if name in table:
        return table[name]
    if name.startswith("deblur+"):  # class-wise deblurring before purification (purify --class-kernels)
        inner = get_defense(name[len("deblur+"):])
        if not inner.purify or inner.deblur:
            raise ToolError(f"defense {name!r}: deblur+ goes before an eclipse-... or purify-... defense")
        return replace(inner, name=name, deblur=True)
    match = re.fullmatch(r"eclipse(?:-steps(\d+))?(?:-t(\d+))?(?:\+(none|impulse))?"
                         r"(?:-gray(0(?:\.\d+)?|1(?:\.0+)?))?(?:-lf(0(?:\.\d+)?))?" + _JQ, name)
    if match and _positive(match.group(1)) and _positive(match.group(2)):
        steps = int(match.group(1)) if match.group(1) else None
        gray = float(match.group(4)) if match.group(4) else CORRUPTION_P
        return Defense(name, train_corruption=True, purify=True, purify_steps=steps,
                       t_star=int(match.group(2)) if match.group(2) else None,
                       prefilter=match.group(3) or "none", gray_p=gray,
                       lowfreq_sigma=float(match.group(5)) if match.group(5) else 0.0, **_jpeg(match, 6))
    match = re.fullmatch(r"purify(?:-steps(\d+))?(?:-t(\d+))?(?:\+(none|impulse))?", name)
    if match and _positive(match.group(1)) and _positive(match.group(2)):  # the data stage alone, no corruption
        return Defense(name, purify=True, purify_steps=int(match.group(1)) if match.group(1) else None,
                       t_star=int(match.group(2)) if match.group(2) else None, prefilter=match.group(3) or "none")
    match = re.fullmatch(r"corruption(?:-gray(0(?:\.\d+)?|1(?:\.0+)?))?(?:-wn(0(?:\.\d+)?))?-lf(0(?:\.\d+)?)" + _JQ,
                         name)
    if match:
        return Defense(name, train_corruption=True, lowfreq_sigma=float(match.group(3)),
                       gray_p=float(match.group(1)) if match.group(1) else CORRUPTION_P,
                       noise_sigma=float(match.group(2)) if match.group(2) else CORRUPTION_SIGMA, **_jpeg(match, 4))
    raise ToolError(f"unknown defense {name!r}; choose one of {', '.join(DEFENSES)} or "
                    "eclipse-steps<K>[-t<T>][+impulse][-grayP][-lfS][-jqLO-HI|-jyLO-HI], "
                    "purify-steps<K>[-t<T>][+impulse] (purified, no training-time corruption), "
                    "corruption[-grayP][-wnS]-lfS[-jqLO-HI|-jyLO-HI]; eclipse/purify ones take a deblur+ prefix")


def grayscale(images: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma replicated to 3 channels (torchvision's rgb_to_grayscale), uint8 NHWC in and out."""
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return TF.rgb_to_grayscale(t, num_output_channels=3).permute(0, 2, 3, 1).contiguous().numpy()


def jpeg(images: np.ndarray, quality: int = ISS_JPEG_QUALITY) -> np.ndarray:
    """JPEG round trip with PIL, as ISS does, once per training image."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


ONCE = {"gray": grayscale, "jpeg10": jpeg}


def apply_once(kind: str | None, images: np.ndarray) -> np.ndarray:
    return images if kind is None else ONCE[kind](images)


def training_corruption(defense: Defense, generator: torch.Generator | None = None):
    """The package's RandomCorruption (p=0.4, sigma=0.05), or None when the defense has none.

    It must be the package's own module: the harness measures what users will run.
    """
    if not defense.train_corruption:
        return None
    try:
        from eclipse_stream.corruption import RandomCorruption
    except ImportError as exc:
        raise ToolError(f"defense {defense.name!r} needs eclipse_stream.corruption.RandomCorruption, "
                        f"which cannot be imported: {exc}") from exc
    return RandomCorruption(p=defense.gray_p, sigma=defense.noise_sigma, generator=generator,
                            lowfreq_sigma=defense.lowfreq_sigma, jpeg_quality=defense.jpeg_quality,
                            jpeg_chroma=defense.jpeg_chroma)


def eclipse_stream_command() -> list[str]:
    """The installed ``eclipse-stream`` script, else ``python -m eclipse_stream.cli`` from this tree."""
    exe = shutil.which("eclipse-stream", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                               os.environ.get("PATH", "")]))
    return [exe] if exe else [sys.executable, "-m", "eclipse_stream.cli"]


def purify(in_dir: Path, out_dir: Path, denoiser: Path, steps: int | None = None, device: str | None = None,
           batch_size: int | None = None, timeout: float | None = None, extra_args: tuple[str, ...] = ()) -> Path:
    """Run ``eclipse-stream purify IN OUT --denoiser CKPT`` as a user would.

    A subprocess keeps the harness honest (it measures the shipped CLI) and lets a
    time limit stop a long purification, which the CLI can then resume. A finished OUT is
    not skipped here: the CLI skips its done shards itself, after checking they were made
    with this denoiser and these settings.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not Path(denoiser).is_file():
        raise ToolError(f"denoiser checkpoint not found: {denoiser} (train one with `eclipse-stream train`)")
    cmd = [*eclipse_stream_command(), "purify", str(in_dir), str(out_dir), "--denoiser", str(denoiser)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    if device:
        cmd += ["--device", str(device)]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    cmd += list(extra_args)
    # Own process group, so a timeout also stops the CLI's decode workers.
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise PurifyTimeout(f"purification of {in_dir} stopped after {timeout:.0f}s; rerun to resume") from exc
    if proc.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise ToolError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}")
    if not is_complete(out_dir):  # the CLI writes manifest.json whenever it exits 0
        raise ToolError(f"`{' '.join(cmd)}` exited 0 but wrote no {out_dir}/manifest.json")
    return out_dir


def fit_kernels(in_dir: Path, clean_dir: Path, out: Path) -> Path:
    """``eclipse-stream fit-kernels IN --clean CLEAN -o OUT`` as a user would run it."""
    cmd = [*eclipse_stream_command(), "fit-kernels", str(in_dir), "--clean", str(clean_dir), "-o", str(out)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not Path(out).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ToolError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}")
    return Path(out)


class PurifyTimeout(ToolError):
    """Purification ran past this call's time budget; its partial output stays for a resumed run."""

