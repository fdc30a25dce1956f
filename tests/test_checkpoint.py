import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import make_denoiser
from eclipse_stream.checkpoint import load_denoiser, load_train_state, save_denoiser, save_train_state
from eclipse_stream.diffusion import DiffusionConfig
from eclipse_stream.errors import CheckpointError
from eclipse_stream.unet import UNet, preset_config


def test_round_trip_is_bit_exact(tmp_path):
    path = make_denoiser(tmp_path / "d.safetensors", seed=3)
    torch.manual_seed(3)
    den = load_denoiser(path)
    ref = UNet(preset_config("tiny", 32)).state_dict()
    saved = den.model.state_dict()
    assert set(saved) == set(ref)
    save_denoiser(tmp_path / "again.safetensors", den.model, DiffusionConfig(steps=4000))
    again = load_denoiser(tmp_path / "again.safetensors").model.state_dict()
    for k in saved:
        assert torch.equal(saved[k], again[k]), k
    assert den.metadata["unet"]["model_channels"] == 32 and den.metadata["diffusion"]["steps"] == 4000
    assert den.diffusion.num_timesteps == 4000 and len(den.sha256) == 64


def test_truncated_file(tmp_path):
    path = make_denoiser(tmp_path / "d.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="d.safetensors"):
        load_denoiser(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04\x95" + b"\x00" * 64])
def test_garbage_files(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_denoiser(path)


def test_foreign_safetensors_and_missing(tmp_path):
    save_file({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not an eclipse-stream checkpoint"):
        load_denoiser(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_denoiser(tmp_path / "nope.safetensors")


def test_weights_not_matching_config(tmp_path):
    model = UNet(preset_config("tiny", 32))
    meta = {"kind": "denoiser", "format_version": 1, "unet": preset_config("small", 32).to_dict(),
            "diffusion": DiffusionConfig().to_dict()}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "x.safetensors",
              metadata={"eclipse_stream": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not match"):
        load_denoiser(tmp_path / "x.safetensors")


def test_train_state_round_trip_and_kind_check(tmp_path):
    torch.manual_seed(0)
    model, ema = UNet(preset_config("tiny", 32)), UNet(preset_config("tiny", 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 3, 32, 32), torch.tensor([1.0])).sum().backward()
    opt.step()
    path = tmp_path / "state.safetensors"
    save_train_state(path, model=model, ema=ema, optimizer=opt, diffusion_config=DiffusionConfig(),
                     step=7, train_args={"seed": 0}, train_files_sha256="abc")
    m2, e2 = UNet(preset_config("tiny", 32)), UNet(preset_config("tiny", 32))
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-4)
    meta = load_train_state(path, model=m2, ema=e2, optimizer=o2)
    assert meta["step"] == 7
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], o2.state_dict()["state"]
    assert torch.equal(s1[0]["exp_avg_sq"], s2[0]["exp_avg_sq"]) and float(s1[0]["step"]) == float(s2[0]["step"])
    with pytest.raises(CheckpointError, match="training state"):
        load_denoiser(path)


def test_a_file_replaced_during_every_read_is_refused(tiny_ckpt, monkeypatch):
    import itertools

    import eclipse_stream.checkpoint as ckpt

    counter = itertools.count()
    monkeypatch.setattr(ckpt, "_identity", lambda path: next(counter))  # a new file under the name each time
    with pytest.raises(CheckpointError, match="replaced three times while being read"):
        load_denoiser(tiny_ckpt)
