"""`eclipse-stream convert`: improved-diffusion checkpoints (the ECLIPSE authors') to eclipse-stream denoisers.

The fixtures in tests/fixtures/ were produced by the reference code (openai/improved-diffusion) itself; see
tests/fixtures/README.md.
"""

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT, cli_env
from PIL import Image
from safetensors.torch import save_file

from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.cli import main
from eclipse_stream.convert import (
    ConvertConfig,
    build_unet,
    convert_state_dict,
    infer_config,
    read_reference,
    reference_name,
    unet_name,
)
from eclipse_stream.errors import CheckpointError
from eclipse_stream.purifier import Purifier
from eclipse_stream.unet import UNet, preset_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REF_PT = FIXTURES / "improved-diffusion-tiny.pt"
REF_IO = FIXTURES / "improved-diffusion-tiny-io.npz"
SHAPES = FIXTURES / "improved-diffusion-shapes.json"
TINY = ["--image-size", "32"]  # the fixture's multipliers (1, 1) are not in improved-diffusion's size table


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "tiny.safetensors"
    r = run("convert", REF_PT, out, *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def ref_io():
    with np.load(REF_IO) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def test_converted_unet_computes_the_reference_function(converted, ref_io):
    den = load_denoiser(converted)
    assert den.model.config == dataclasses.replace(
        den.model.config, model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(16,),
        num_heads=4, use_scale_shift_norm=True, learn_sigma=True, image_size=32)
    with torch.no_grad():
        out = den.model(ref_io["x"], ref_io["t"])
    assert out.abs().max() > 0.5  # a non-trivial function
    assert (out - ref_io["out"]).abs().max() <= 1e-5


def test_converted_chain_step_matches_the_reference_diffusion(converted, ref_io):
    """Our schedule + the converted weights = improved-diffusion's p_mean_variance (cosine, T 4000,
    learned sigma, rescaled timesteps): the timestep scale the model sees is the reference's."""
    den = load_denoiser(converted)
    with torch.no_grad():
        got = den.diffusion.p_mean_variance(den.model, ref_io["x_t"], ref_io["t_index"])
    for key in ("mean", "log_variance", "pred_xstart"):
        assert (got[key] - ref_io[key]).abs().max() <= 1e-5, key


def test_qkv_permutation_and_head_count_matter(converted, ref_io):
    """The test above can fail: without the per-head permutation, or with another head count, the
    function differs."""
    state, _ = read_reference(REF_PT)
    cfg = load_denoiser(converted).model.config
    mapped = convert_state_dict(state, cfg)
    unpermuted = dict(mapped)
    for name, value in state.items():
        if ".qkv." in name:
            ours = name.replace("input_blocks", "down").replace("middle_block", "middle").replace(
                "output_blocks", "up")
            unpermuted[ours] = value.reshape(mapped[ours].shape)
    for config, weights in [(cfg, unpermuted), (dataclasses.replace(cfg, num_heads=2),
                                                 convert_state_dict(state, dataclasses.replace(cfg, num_heads=2)))]:
        model = UNet(config).eval()
        model.load_state_dict(weights)
        with torch.no_grad():
            assert (model(ref_io["x"], ref_io["t"]) - ref_io["out"]).abs().max() > 1e-2


def test_metadata_and_info_show_the_source(converted):
    sha = hashlib.sha256(REF_PT.read_bytes()).hexdigest()
    r = run("info", converted)
    assert r.exit_code == 0, r.output
    meta = json.loads(r.output)
    assert meta["converted_from"] == "improved-diffusion" and meta["source_sha256"] == sha
    assert meta["source_file"] == REF_PT.name and meta["kind"] == "denoiser"
    assert meta["diffusion"]["schedule"] == "cosine" and meta["diffusion"]["steps"] == 4000
    assert meta["trained_timesteps"] == [0, 4000]
    assert meta["convert_args"]["num_heads"] == 4 and meta["convert_args"]["image_size_inferred"] is False


def test_converted_checkpoint_purifies(converted, cifar64):
    den = load_denoiser(converted)
    x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                     for _, _, b in cifar64[:3]])
    for steps in (1, 3):
        p = Purifier(den, steps=steps)
        y = p(x, generator=torch.Generator().manual_seed(0))
        assert y.dtype == torch.uint8 and y.shape == x.shape and not torch.equal(x, y)
        assert torch.equal(y, p(x, generator=torch.Generator().manual_seed(0)))


def test_eclipse_architectures_are_inferred_from_shapes():
    """ECLIPSE's CIFAR-10 and ImageNet-64 UNets (shapes from the reference code): the paper preset, every
    tensor mapped onto a UNet tensor of the same shape."""
    shapes = json.loads(SHAPES.read_text())
    for name, size in (("cifar10", 32), ("imagenet64", 64)):
        state = {k: torch.empty(s, device="meta") for k, s in shapes[name]["state_dict"].items()}
        cfg = infer_config(state)
        assert cfg == preset_config("paper", size), name  # dropout too: train --init-from accepts it
        with torch.device("meta"):
            ours = UNet(cfg).state_dict()
        mapped = convert_state_dict(state, cfg)
        assert all(reference_name(unet_name(k)) == k for k in state)  # error messages name the source's tensors
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
        assert sum(v.numel() for v in mapped.values()) == shapes[name]["parameters"]


def test_wrapped_and_prefixed_state_dicts_convert_alike(tmp_path, converted):
    sd = torch.load(REF_PT, map_location="cpu", weights_only=True)
    reference = load_denoiser(converted).model.state_dict()
    for i, obj in enumerate([{"model": sd}, {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
                             {k: v.half() for k, v in sd.items()}, sd]):
        src, out = tmp_path / f"wrapped{i}.pt", tmp_path / f"wrapped{i}.safetensors"
        torch.save(obj, src, _use_new_zipfile_serialization=i != 3)  # 3: torch's legacy (pre-1.6) format
        assert src.read_bytes()[:2] == (b"\x80\x02" if i == 3 else b"PK")
        r = run("convert", src, out, *TINY)
        assert r.exit_code == 0, r.output
        got = load_denoiser(out).model.state_dict()
        atol = 1e-3 if i == 2 else 0.0  # fp16 weights are converted to float32
        assert all(torch.allclose(got[k], reference[k], atol=atol, rtol=0) for k in reference)


# --- bad input: a named error, exit != 0, no traceback, no output file ---------------------------------------

class _RunsCode:
    """Unpickling this calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_inputs(tmp_path):
    data = REF_PT.read_bytes()
    (tmp_path / "text.pt").write_text("model weights: see the Google Drive link\n")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut-end.pt").write_bytes(data[:-64])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"time_embed.0.weight": _RunsCode(tmp_path / "MARKER")}, tmp_path / "runs-code.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.bias": torch.zeros(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(10, 512)}
    torch.save(resnet, tmp_path / "resnet.pt")
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(REF_PT, weights_only=True)
    torch.save({**sd, "label_emb.weight": torch.zeros(10, 128)}, tmp_path / "class-cond.pt")
    torch.save({**sd, "out.2.weight": sd["out.2.weight"][:3], "out.2.bias": sd["out.2.bias"][:3]},
               tmp_path / "fixed-sigma.pt")
    nan = dict(sd)
    nan["middle_block.1.qkv.weight"] = sd["middle_block.1.qkv.weight"].clone()
    nan["middle_block.1.qkv.weight"][0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    torch.save({**sd, "input_blocks.1.0.emb_layers.1.bias": torch.zeros(64, dtype=torch.int64)},
               tmp_path / "int.pt")
    torch.save({k: v for k, v in sd.items() if not k.startswith("output_blocks.3.")}, tmp_path / "missing.pt")
    torch.save({**sd, "extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    torch.save({**sd, "output_blocks.1.0.skip_connection.weight": torch.zeros(32, 48, 1, 1)},
               tmp_path / "misshapen.pt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "denoiser.pt"))


BAD = {  # file -> what the one-line error must say
    "text.pt": "not a PyTorch checkpoint",
    "truncated.pt": "not a readable PyTorch checkpoint (truncated or corrupt?)",
    "cut-end.pt": "not a readable PyTorch checkpoint (truncated or corrupt?)",
    "empty.pt": "not a PyTorch checkpoint",
    "runs-code.pt": "refused: loading it would run code from the file (it would import and call",
    "module.pt": "would import and call torch.nn.modules.linear.Linear",
    "resnet.pt": "unknown key layout: not an improved-diffusion UNet state dict",
    "opt.pt": "an optimizer state",
    "class-cond.pt": "class-conditional",
    "fixed-sigma.pt": "a fixed-variance model is not supported",
    "nan.pt": "'middle_block.1.qkv.weight' has 1 non-finite value(s)",
    "int.pt": "has dtype torch.int64",
    "missing.pt": "with the inferred architecture (model channels 32, channel_mult (1, 1), 1 res blocks, attention "
                  "at (16,) px): missing 12 tensor(s), e.g. ['output_blocks.3.0.emb_layers.1.bias'",
    "misshapen.pt": "output_blocks.1.0.skip_connection.weight has shape (32, 48, 1, 1), expected (32, 64, 1, 1)",
    "denoiser.pt": "another safetensors file: it needs no conversion",
    "extra.pt": "no counterpart in the UNet",
    "no-such.pt": "checkpoint not found",
}


def test_bad_inputs_are_named_errors_with_no_output(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _bad_inputs(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, message in BAD.items():
        r = run("convert", src / name, out_dir / f"{name}.safetensors", *TINY)
        assert r.exit_code == 3, (name, r.output)
        assert isinstance(r.exception, SystemExit), (name, r.exception)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {src / name}: ") and message in lines[0], \
            (name, r.output)
        assert "Traceback" not in r.output
    assert list(out_dir.iterdir()) == []  # no output, no temporary file left
    assert not (src / "MARKER").exists()


def test_every_misshapen_or_missing_tensor_is_a_named_error():
    """Hostile shapes: each tensor of the fixture in turn made a scalar, one row longer, or removed: always a
    CheckpointError naming the file (never an IndexError or a half-loaded model)."""
    state, _ = read_reference(REF_PT)
    cases = 0
    for key, value in state.items():
        for bad in (torch.zeros(()), torch.zeros(value.shape[0] + 1, *value.shape[1:]), None):
            mutated = {k: v for k, v in state.items() if k != key}
            if bad is not None:
                mutated[key] = bad
            with pytest.raises(CheckpointError, match=r"^ref\.pt: "):
                build_unet(mutated, image_size=32, path="ref.pt")
            cases += 1
    assert cases == 3 * len(state) > 300


def test_a_pickle_that_runs_code_is_never_run(tmp_path):
    """In a real process: the error is one line on stderr, exit 3, and the code in the file never ran."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "ema_0.9999_250000.pt"
    torch.save({"time_embed.0.weight": _RunsCode(marker)}, evil)
    out = tmp_path / "out.safetensors"
    p = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "convert", str(evil), str(out)],
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert p.returncode == 3 and p.stdout == ""
    assert p.stderr.startswith(f"error: {evil}: refused: loading it would run code") and "Traceback" not in p.stderr
    assert "builtins.open" in p.stderr or "io.open" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists() and sorted(os.listdir(tmp_path)) == [evil.name]
    # the control: the file really does run code when unpickled without weights_only
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_output_rules(tmp_path, converted):
    src = tmp_path / "ref.pt"
    src.write_bytes(REF_PT.read_bytes())
    before = src.read_bytes()
    r = run("convert", src, src, *TINY)
    assert r.exit_code == 2 and "is the input checkpoint" in r.output
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    r = run("convert", src, link, *TINY, "--overwrite")
    assert r.exit_code == 2 and "is the input checkpoint" in r.output
    hard = tmp_path / "hard.safetensors"
    os.link(src, hard)
    r = run("convert", src, hard, *TINY, "--overwrite")
    assert r.exit_code == 2 and "is the input checkpoint" in r.output
    hard.unlink()
    assert src.read_bytes() == before and link.is_symlink()
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    r = run("convert", src, out, *TINY)
    assert r.exit_code == 2 and "already exists" in r.output and out.read_bytes() == b"keep me"
    r = run("convert", src, out, *TINY, "--overwrite")
    assert r.exit_code == 0 and load_denoiser(out).sha256 != hashlib.sha256(b"keep me").hexdigest()
    r = run("convert", src, tmp_path, *TINY)
    assert r.exit_code == 2 and "is a folder" in r.output
    r = run("convert", src, tmp_path / "ref.pt" / "out.safetensors", *TINY)  # a file where a folder must be
    assert r.exit_code == 1 and "cannot write the converted checkpoint" in r.output
    assert "Traceback" not in r.output and src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["link.safetensors", "out.safetensors", "ref.pt"]


def test_options_not_in_the_file(tmp_path):
    out = tmp_path / "o.safetensors"
    r = run("convert", REF_PT, out)  # multipliers (1, 1): no size to infer
    assert r.exit_code == 3 and "cannot infer the image size from channel multipliers (1, 1)" in r.output
    assert "--image-size" in r.output and not out.exists()
    r = run("convert", REF_PT, out, *TINY, "--num-heads", "3")
    assert r.exit_code == 3 and "3 attention heads do not divide the attention width(s) [32]" in r.output
    r = run("convert", REF_PT, out, *TINY, "--max-timestep", "5000")
    assert r.exit_code == 2 and "max timestep must be between 1 and diffusion steps=4000" in r.output
    r = run("convert", REF_PT, out, *TINY, "--diffusion-steps", "1")
    assert r.exit_code == 2 and "diffusion steps must be an integer >= 2" in r.output
    assert not out.exists()
    r = run("convert", REF_PT, out, *TINY, "--max-timestep", "200", "--diffusion-steps", "1000",
            "--noise-schedule", "linear", "--num-heads", "2")
    assert r.exit_code == 0, r.output
    den = load_denoiser(out)
    assert den.trained_max_timestep == 200 and den.diffusion.num_timesteps == 1000
    assert den.model.config.num_heads == 2 and den.metadata["diffusion"]["schedule"] == "linear"


def test_cli_defaults_are_the_config_defaults():
    r = run("convert", "--help")
    assert r.exit_code == 0 and "--num-heads INTEGER" in r.output and "[default: 4]" in r.output
    params = {p.name: p for p in main.commands["convert"].params}
    for f in dataclasses.fields(ConvertConfig):
        option = params[f.name]
        assert (False if option.is_flag else option.default) == f.default, f.name
