"""Every command as safe as purify (issue 24, and issue 21 section 5), tried as a hostile user would.

One test (or one parametrized test) per item of the issues, in their order; each checks the exit status, the
message and that no file was written or changed. The commands run in-process through click's CliRunner (an
uncaught exception there is a traceback: ``_no_traceback`` fails on it); CUDA is switched off with a
monkeypatch where a test is about devices, so the results are the same on a machine with a GPU.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import cifar_samples, rgb_array, tar_members, to_png, write_tar
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from eclipse_stream import errors
from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.cli import main
from eclipse_stream.fsutil import file_sha256
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import PurifierConfig

FAST = ["--steps", "2", "--workers", "0", "-q"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _no_traceback(r):
    assert r.exception is None or isinstance(r.exception, SystemExit), f"traceback: {r.exception!r}\n{r.output}"


def refused(r, code: int, *words: str):
    """The command failed with ``code``, one clear line naming ``words``, no traceback."""
    _no_traceback(r)
    assert r.exit_code == code, r.output
    for w in words:
        assert w in r.output, f"{w!r} not in {r.output!r}"


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cfg(**kw):
    return PurifyConfig(**{"purifier": PurifierConfig(steps=2), "batch_size": 4, "workers": 0, **kw})


@pytest.fixture
def data(tmp_path, shard_dir):
    """A writable copy of the three small shards (the session fixture must stay as it is)."""
    d = tmp_path / "data"
    d.mkdir()
    for p in sorted(shard_dir.glob("*.tar")):
        (d / p.name).write_bytes(p.read_bytes())
    return d


@pytest.fixture(scope="module")
def scannable(tmp_path_factory, cifar64):
    """A folder a scan runs to the end on (four images of each of ten classes), so that a report would be
    written if nothing refused it."""
    d = tmp_path_factory.mktemp("scannable")
    write_tar(d / "s.tar", cifar_samples(cifar64[:40]))
    return d


@pytest.fixture
def image_folder(tmp_path, cifar64):
    """A training image folder, as `train imgs/` reads it."""
    d = tmp_path / "imgs"
    (d / "cat").mkdir(parents=True)
    for i, (_, _, jpg) in enumerate(cifar64[:6]):
        (d / "cat" / f"{i:04d}.png").write_bytes(to_png(jpg))
    return d


# ================================================================================= Data destroyed =====

# --- outputs never land on or inside an input: scan --report/--plot, preview -o, train -o/--state ------------

@pytest.mark.parametrize("option", ["--report", "--plot"])
@pytest.mark.parametrize("where", ["the-shard", "in-the-folder", "link-to-the-shard", "folder-link"])
def test_scan_never_writes_its_report_or_plot_over_or_into_its_input(scannable, tmp_path, option, where):
    data = tmp_path / "d"
    data.mkdir()
    (data / "s.tar").write_bytes((scannable / "s.tar").read_bytes())
    (tmp_path / "link.json").symlink_to(data / "s.tar")
    (tmp_path / "dlink").symlink_to(data)
    target = {"the-shard": data / "s.tar", "in-the-folder": data / "report.json",
              "link-to-the-shard": tmp_path / "link.json", "folder-link": tmp_path / "dlink" / "r.json"}[where]
    before = snapshot(data)
    r = cli("scan", data, "--per-class", 4, "--device", "cpu", option, target)
    refused(r, 2, f"error: {option} {target} overlaps the input", "scan never writes on or inside its input")
    assert snapshot(data) == before


def test_scan_report_and_plot_on_the_same_file_are_refused(scannable, tmp_path):
    r = cli("scan", scannable, "--per-class", 4, "--report", tmp_path / "x", "--plot", tmp_path / "x")
    refused(r, 2, "is the same file as --report")
    assert not (tmp_path / "x").exists()


def test_scan_report_beside_the_input_is_written(scannable, tmp_path):
    """The check refuses only what lands on or inside an input: a report elsewhere is written."""
    r = cli("scan", scannable / "s.tar", "--per-class", 4, "--device", "cpu", "--report", tmp_path / "r.json")
    _no_traceback(r)
    assert r.exit_code in (0, 10, 11) and json.loads((tmp_path / "r.json").read_text())["verdict"]


def test_scan_api_refuses_to_write_its_report_over_a_shard_it_read(scannable, tmp_path):
    from eclipse_stream.scan import ScanConfig, scan_shards

    (tmp_path / "s.tar").write_bytes((scannable / "s.tar").read_bytes())
    result = scan_shards(tmp_path / "s.tar", ScanConfig(per_class=4, null=False, device="cpu"))
    before = (tmp_path / "s.tar").read_bytes()
    for write in (result.write_json, result.plot):
        with pytest.raises(errors.InputError, match="overlaps the input"):
            write(tmp_path / "s.tar")
    assert (tmp_path / "s.tar").read_bytes() == before


@pytest.mark.parametrize("target", ["shard", "denoiser"])
def test_preview_never_writes_over_its_shard_or_denoiser(data, tiny_ckpt, tmp_path, target):
    ckpt = tmp_path / "d.safetensors"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    out = data / "part-000.tar" if target == "shard" else ckpt
    before = out.read_bytes()
    r = cli("preview", data / "part-000.tar", "-d", ckpt, "-o", out, "-n", 2, "--steps", 2)
    refused(r, 2, "overlaps the input", "preview never writes on or inside its input")
    assert out.read_bytes() == before


@pytest.mark.parametrize("case", ["out-is-an-image", "out-in-the-folder", "state-in-the-folder",
                                  "out-is-init-from", "state-is-init-from", "out-is-state"])
def test_train_never_writes_its_checkpoint_or_state_onto_its_inputs(image_folder, tiny_ckpt, tmp_path, case):
    init = tmp_path / "init.safetensors"
    init.write_bytes(tiny_ckpt.read_bytes())
    elsewhere = tmp_path / "m.safetensors"
    out, state, what = {
        "out-is-an-image": (image_folder / "cat" / "0001.png", None, "--out"),
        "out-in-the-folder": (image_folder / "m.safetensors", None, "--out"),
        "state-in-the-folder": (elsewhere, image_folder / "cat" / "s.safetensors", "--state"),
        "out-is-init-from": (init, None, "--out"),
        "state-is-init-from": (elsewhere, init, "--state"),
        "out-is-state": (elsewhere, elsewhere, "--state"),
    }[case]
    before = snapshot(tmp_path)
    args = ["train", image_folder, "-o", out, "--preset", "tiny", "--iterations", 1, "--batch-size", 2,
            "--diffusion-steps", 4000, "--init-from", init, "-q"]
    r = cli(*args, *(["--state", state] if state else []))
    refused(r, 2, what, "is the same file as" if case == "out-is-state" else "train never writes on or inside")
    assert snapshot(tmp_path) == before  # no checkpoint, no state, no image changed


# --- a checkpoint whose weights are NaN or int32 is refused on load, naming file and tensor -------------------

def _edited(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = sorted(tensors)[3]
    tensors[name] = edit(tensors[name])
    save_file(tensors, str(dst), metadata=meta)
    return dst


BROKEN_WEIGHTS = {
    "nan": (lambda t: t.clone().fill_(float("nan")), "NaN or infinite"),
    "inf": (lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf")), "NaN or infinite"),
    "int32": (lambda t: t.to(torch.int32), "torch.int32, not floating point"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_WEIGHTS))
def test_broken_weights_are_refused_by_info_and_purify(data, tiny_ckpt, tmp_path, broken):
    edit, says = BROKEN_WEIGHTS[broken]
    bad = _edited(tiny_ckpt, tmp_path / "bad.safetensors", edit)
    refused(cli("info", bad), 3, str(bad), "tensor '", says)
    refused(cli("purify", data, tmp_path / "out", "-d", bad, *FAST), 3, str(bad), says)
    assert not (tmp_path / "out").exists()


def test_broken_weights_passed_in_memory_are_refused_too(data, tiny_ckpt, tmp_path):
    den = load_denoiser(tiny_ckpt)
    with torch.no_grad():
        next(den.model.parameters()).fill_(float("nan"))
    with pytest.raises(errors.CheckpointError, match="NaN or infinite"):
        purify_shards(data, tmp_path / "out", den, cfg(), progress=False)
    assert not (tmp_path / "out").exists()


class _Constant:
    """A purifier that returns one constant image, as NaN weights do once cast to uint8."""

    fingerprint = "test:constant"

    def __call__(self, x, generator=None):
        return torch.zeros_like(x)


class _Flat:
    """Returns the input's mean colour: constant only where the input was flat."""

    fingerprint = "test:flat"

    def __call__(self, x, generator=None):
        flat = x.float().mean(dim=(1, 2, 3), keepdim=True).round().to(torch.uint8)
        return flat.expand_as(x).contiguous()


def test_a_purified_image_that_comes_out_constant_fails_the_shard(data, tmp_path):
    with pytest.raises(errors.NumericalError, match=r"part-000\.tar: sample '.+': the purifier returned one "
                                                    r"constant value \(0\)"):
        purify_shards(data, tmp_path / "out", purifier=_Constant(), cfg=cfg(), progress=False)
    assert not (tmp_path / "out").exists()  # no shard, no stats, no manifest: the OUT it made is removed again


def test_a_flat_input_may_come_out_constant(tmp_path):
    """The check does not fire on images that are flat to begin with (a black frame stays black)."""
    (tmp_path / "in").mkdir()
    flat = io.BytesIO()
    Image.new("RGB", (32, 32), (7, 7, 7)).save(flat, format="PNG")
    write_tar(tmp_path / "in" / "flat.tar", [{"__key__": "k", "png": flat.getvalue(), "cls": b"1"}])
    res = purify_shards(tmp_path / "in", tmp_path / "out", purifier=_Flat(), cfg=cfg(), progress=False)
    assert res.processed[0]["written"] == 1


# --- resume checks the output before it trusts the stats file -------------------------------------------------

def test_a_cut_output_is_redone_on_resume_and_the_manifest_has_its_new_hash(data, tiny_ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    purify_shards(data, out, tiny_ckpt, cfg(), progress=False)
    good = (out / "part-001.tar").read_bytes()
    stats = json.loads((out / "part-001.tar.stats.json").read_text())
    assert stats["output_size"] == len(good) and stats["output_sha256"] == file_sha256(out / "part-001.tar")
    with open(out / "part-001.tar", "r+b") as f:  # cut short after the run finished
        f.truncate(len(good) // 2)
    with caplog.at_level(logging.WARNING):
        res = purify_shards(data, out, tiny_ckpt, cfg(), progress=False)
    assert [s["shard"] for s in res.processed] == ["part-001.tar"] and len(res.skipped) == 2
    assert (out / "part-001.tar").read_bytes() == good
    assert "cut short or changed" in caplog.text and "part-001.tar" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    sha = {e["shard"]: e["output_sha256"] for e in manifest["shards"]}
    assert sha["part-001.tar"] == file_sha256(out / "part-001.tar")


def test_an_output_changed_in_place_is_redone_and_a_copy_is_trusted(data, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    purify_shards(data, out, tiny_ckpt, cfg(), progress=False)
    good = (out / "part-000.tar").read_bytes()
    bad = bytearray(good)
    bad[600] ^= 0xFF  # same size, other bytes, a new mtime
    (out / "part-000.tar").write_bytes(bytes(bad))
    (out / "part-002.tar").write_bytes((out / "part-002.tar").read_bytes())  # a copy: same bytes, new mtime
    res = purify_shards(data, out, tiny_ckpt, cfg(), progress=False)
    assert [s["shard"] for s in res.processed] == ["part-000.tar"]  # the sha256 told them apart
    assert (out / "part-000.tar").read_bytes() == good


@pytest.mark.parametrize("content", ["[]", '"done"', "{}", '{"config": []}'])
def test_a_stats_file_that_is_not_an_object_is_a_named_error(data, tiny_ckpt, tmp_path, content):
    out = tmp_path / "out"
    purify_shards(data, out, tiny_ckpt, cfg(), progress=False)
    (out / "part-000.tar.stats.json").write_text(content)
    r = cli("purify", data, out, "-d", tiny_ckpt, *FAST)
    refused(r, 2, "part-000.tar.stats.json: not a stats file of eclipse-stream", "use --overwrite")


# ========================================================================== Tracebacks and hangs =====

DEVICES = {"cuda": "CUDA is not available here", "cuda:0": "CUDA is not available here",
           "cuda:7": "CUDA is not available here", "meta": "holds no data", "tpu": "is not a device PyTorch knows",
           "nonsense": "is not a device PyTorch knows"}


@pytest.mark.parametrize("device", sorted(DEVICES))
@pytest.mark.parametrize("command", ["purify", "scan", "preview", "train"])
def test_a_device_that_cannot_compute_here_is_a_named_error(command, device, data, image_folder, tiny_ckpt,
                                                             tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    args = {"purify": ["purify", data, tmp_path / "out", "-d", tiny_ckpt, *FAST],
            "scan": ["scan", data, "--per-class", 4],
            "preview": ["preview", data / "part-000.tar", "-d", tiny_ckpt, "-o", tmp_path / "p.png"],
            "train": ["train", image_folder, "-o", tmp_path / "m.safetensors", "--preset", "tiny",
                      "--iterations", 1]}[command]
    before = snapshot(tmp_path)
    r = cli(*args, "--device", device)
    refused(r, 2, f"device '{device}'", DEVICES[device], "devices available here: cpu")
    assert snapshot(tmp_path) == before


META_EDITS = {
    "num_heads 0": (lambda m: m["unet"].update(num_heads=0), "num_heads must be an integer in 1..256"),
    "negative channels": (lambda m: m["unet"].update(model_channels=-32), "model_channels must be"),
    "huge channels": (lambda m: m["unet"].update(model_channels=10**9), "model_channels must be"),
    "steps 1e12": (lambda m: m["diffusion"].update(steps=10**12), "diffusion steps must be an integer in 2..100000"),
    "steps 1e12 float": (lambda m: m["diffusion"].update(steps=1e12), "diffusion steps must be"),
    "metadata a list": (lambda m: [m], "metadata is a JSON list, not an object"),
    "trained_timesteps abc": (lambda m: m.update(trained_timesteps="abc"), "trained_timesteps is 'abc'"),
    "trained_timesteps reversed": (lambda m: m.update(trained_timesteps=[200, 0]), "trained_timesteps is [200, 0]"),
    "trained_timesteps past T": (lambda m: m.update(trained_timesteps=[0, 5000]), "0 <= a < b <= 4000"),
    "unet a string": (lambda m: m.update(unet="tiny"), "no valid UNet/diffusion config"),
    "channels of another model": (lambda m: m["unet"].update(model_channels=64), "do not match the stored config"),
}


@pytest.mark.parametrize("edit", sorted(META_EDITS))
def test_crafted_checkpoint_metadata_is_refused_naming_the_file(tiny_ckpt, tmp_path, edit):
    change, says = META_EDITS[edit]
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["eclipse_stream"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = change(meta) or meta
    bad = tmp_path / "crafted.safetensors"
    save_file(tensors, str(bad), metadata={"eclipse_stream": json.dumps(meta)})
    refused(cli("info", bad), 3, f"error: {bad}: ", says)


@pytest.mark.parametrize("argv, says", [
    (["purify", "{data}", "{out}", "-d", "{ckpt}", "--bucket-multiple", "100000"], "bucket multiple must be in 1..256"),
    (["purify", "{data}", "{out}", "-d", "{ckpt}", "--batch-size", "10000000"], "batch size must be in 1..16384"),
    (["scan", "{data}", "--probe-size", "100000"], "probe_size must be in 8..128"),
    (["train", "{data}", "-o", "{out}/m.safetensors", "--replicate", "10000000000"], "replicate must be in 1..10000"),
    (["train", "{data}", "-o", "{out}/m.safetensors", "--batch-size", "10000000"], "batch size must be in 1..16384"),
])
def test_settings_that_would_allocate_tens_of_gb_are_refused(data, tiny_ckpt, tmp_path, argv, says):
    args = [a.format(data=data, out=tmp_path / "out", ckpt=tiny_ckpt) for a in argv]
    refused(cli(*args), 2, says)
    assert not (tmp_path / "out").exists()


def test_a_diverging_training_run_is_a_named_error_and_writes_nothing(image_folder, tmp_path):
    out = tmp_path / "m.safetensors"
    r = cli("train", image_folder, "-o", out, "--preset", "tiny", "--iterations", 10, "--checkpoint-every", 5,
            "--batch-size", 2, "--lr", "1e6", "--diffusion-steps", 100, "--device", "cpu", "-q")
    refused(r, 1, "training diverged: the loss became nan", "lower --lr")
    assert not out.exists() and not Path(f"{out}.state.safetensors").exists()


def test_init_from_a_nan_checkpoint_is_refused_before_training(image_folder, tiny_ckpt, tmp_path):
    bad = _edited(tiny_ckpt, tmp_path / "nan.safetensors", BROKEN_WEIGHTS["nan"][0])
    out = tmp_path / "m.safetensors"
    r = cli("train", image_folder, "-o", out, "--preset", "tiny", "--iterations", 1, "--init-from", bad, "-q")
    refused(r, 3, str(bad), "NaN or infinite")
    assert not out.exists()


# ============================================================================= Nonsense accepted =====

PURIFIER_VALUES = [("--gray-p", "1.5", "gray p"), ("--gray-p", "-0.1", "gray p"), ("--gray-p", "nan", "gray p"),
                   ("--noise-sigma", "-1", "noise sigma"), ("--noise-sigma", "nan", "noise sigma"),
                   ("--noise-sigma", "inf", "noise sigma")]


@pytest.mark.parametrize("option, value, name", PURIFIER_VALUES)
def test_purify_refuses_bad_corruption_settings_as_the_api_does(data, tiny_ckpt, tmp_path, option, value, name):
    field = option[2:].replace("-", "_")
    with pytest.raises(ValueError, match=name) as api:
        PurifierConfig(**{field: float(value)})
    r = cli("purify", data, tmp_path / "out", "-d", tiny_ckpt, "--corruption", "baked", option, value, *FAST)
    refused(r, 2, f"error: {api.value}")  # the same message, word for word
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--threshold", "2"), ("--threshold", "nan"), ("--clean-below", "-1"),
                                           ("--clean-below", "inf")])
def test_scan_refuses_thresholds_outside_0_1_as_the_api_does(scannable, option, value):
    from eclipse_stream.scan import ScanConfig

    field = option[2:].replace("-", "_")
    with pytest.raises(ValueError, match=rf"^{field} must be a number in \[0, 1\], not {value}"):
        ScanConfig(**{field: float(value), **({"threshold": 1.0} if field == "clean_below" else {})})
    r = cli("scan", scannable, "--per-class", 4, option, value)
    refused(r, 2, "must be a number in [0, 1], not ")  # (the CLI derives the other bound from the one given)


@pytest.mark.parametrize("n", ["-1", "0"])
def test_preview_refuses_a_number_of_rows_below_one(data, tiny_ckpt, tmp_path, n):
    r = cli("preview", data / "part-000.tar", "-d", tiny_ckpt, "-o", tmp_path / "p.png", "-n", n)
    refused(r, 2, "number of samples must be in 1..256")
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("name, fmt", [("p.jpg", "JPEG"), ("p.png", "PNG"), ("p.webp", "WEBP")])
def test_preview_writes_the_format_its_suffix_names(data, tiny_ckpt, tmp_path, name, fmt):
    r = cli("preview", data / "part-000.tar", "-d", tiny_ckpt, "-o", tmp_path / name, "-n", 1, "--steps", 1)
    _no_traceback(r)
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / name).format == fmt


def test_preview_refuses_a_suffix_that_names_no_image_format(data, tiny_ckpt, tmp_path):
    r = cli("preview", data / "part-000.tar", "-d", tiny_ckpt, "-o", tmp_path / "p.txt", "-n", 1)
    refused(r, 2, "name the preview with an image suffix")
    assert not (tmp_path / "p.txt").exists()


def test_a_label_that_is_not_utf8_is_named_as_the_bytes_it_holds(tmp_path, cifar64):
    samples = cifar_samples(cifar64[:12])
    samples[5]["cls"] = b"\xff\xfe\x00"
    write_tar(tmp_path / "s.tar", samples)
    r = cli("scan", tmp_path / "s.tar", "--per-class", 4)
    refused(r, 2, "s.tar: sample '", "label field 'cls' holds bytes b'\\xff\\xfe\\x00' (not UTF-8 text)")
    assert "NoneType" not in r.output


def test_a_changed_input_is_reported_once(data, tiny_ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    purify_shards(data, out, tiny_ckpt, cfg(), progress=False)
    os.utime(data / "part-002.tar", ns=(1, 1))
    with caplog.at_level(logging.WARNING):
        purify_shards(data, out, tiny_ckpt, cfg(), progress=False)
    assert caplog.text.count("changed since its output was made") == 1


@pytest.mark.parametrize("argv", [["purify", "{data}", "{out}", "--denoiser", ""],
                                  ["preview", "{data}/part-000.tar", "-o", "{out}/p.png", "--denoiser", ""],
                                  ["info", ""]])
def test_an_empty_checkpoint_path_is_a_usage_error(data, tmp_path, argv):
    r = cli(*[a.format(data=data, out=tmp_path / "out") for a in argv])
    refused(r, 2, "empty path")
    assert not (tmp_path / "out").exists()


def test_a_beton_without_ffcv_is_refused_before_any_shard_runs(data, tiny_ckpt, tmp_path, monkeypatch, cifar64):
    from test_pipeline_beton import make_beton

    make_beton(data / "z.beton", [rgb_array(s["png"]) for s in cifar_samples(cifar64[:4])])
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now raises ImportError
    r = cli("purify", data, tmp_path / "out", "-d", tiny_ckpt, *FAST)
    refused(r, 2, "z.beton: .beton files need FFCV")
    assert not (tmp_path / "out").exists()  # no empty OUT, no tar shard purified first


# ===================================================================== Issue 21, section 5: 16-bit PNG =====

def test_purify_reads_16bit_pngs_as_8bit_and_records_it_per_shard(cifar64, tiny_ckpt, tmp_path):
    rgb = rgb_array(to_png(cifar64[0][2])).astype(np.uint16) * 257
    buf16 = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(buf16, format="PNG")  # 16-bit gray (I;16)
    gray16 = buf16.getvalue()
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", [{"__key__": "plain", "png": to_png(cifar64[1][2]), "cls": b"1"},
                                          {"__key__": "deep", "png": gray16, "cls": b"2"}])
    res = purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, cfg(), progress=False)
    stats = json.loads((tmp_path / "out" / "a.tar.stats.json").read_text())
    assert stats["written"] == 2 and stats["rejects"] == [] and res.processed[0]["converted"] == stats["converted"]
    assert stats["converted"] == [{"index": 1, "key": "deep", "field": "png", "how": "16-bit PNG (gray) read as 8-bit"}]
    out = Image.open(io.BytesIO(dict(tar_members(tmp_path / "out" / "a.tar"))["deep.png"]))
    assert out.mode == "L"  # 8-bit gray, as the value >> 8 the denoiser saw

