"""eclipse-stream train: end to end on real CIFAR-10 images, exact resume, clear errors."""

import json
from dataclasses import replace
import subprocess
import sys

import pytest
import torch

from helpers import cifar_samples, cli_env, read_cifar, write_tar
from eclipse_stream.checkpoint import load_denoiser, save_train_state
from eclipse_stream.errors import CheckpointError, InputError
from eclipse_stream.train import ReplicatedSampler, TrainConfig, ema_decay_at, train


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for name, _label, jpg in read_cifar(16):
        (d / f"{name}.jpg").write_bytes(jpg)
    return d


def tiny_cfg(src, out, **kw):
    base = {"source": str(src), "out": str(out), "preset": "tiny", "iterations": 4, "batch_size": 4,
            "checkpoint_every": 2, "diffusion_steps": 1000, "device": "cpu"}
    base.update(kw)
    return TrainConfig(**base)


def test_cli_train_end_to_end_on_real_images(image_folder, tmp_path):
    out = tmp_path / "den.safetensors"
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "train", str(image_folder), "--out", str(out),
                        "--preset", "tiny", "--iterations", "3", "--batch-size", "4", "--quiet"],
                       capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["images"] == 16 and summary["steps"] == 3
    den = load_denoiser(out)
    meta = den.metadata
    assert meta["step"] == 3 and meta["train_args"]["preset"] == "tiny" and meta["diffusion"]["steps"] == 4000
    assert len(meta["train_files_sha256"]) == 64 and meta["package_version"]
    assert (tmp_path / "den.safetensors.state.safetensors").is_file()
    assert den.class_spectra is None and "class_spectra" not in meta  # a folder of images has no labels


def test_resume_continues_exactly_where_uninterrupted_run_is(image_folder, tmp_path):
    train(tiny_cfg(image_folder, tmp_path / "a.safetensors", iterations=4), progress=False)
    train(tiny_cfg(image_folder, tmp_path / "b.safetensors", iterations=2), progress=False)
    summary = train(tiny_cfg(image_folder, tmp_path / "b.safetensors", iterations=4, resume=True), progress=False)
    assert summary["resumed_from"] == 2
    a = load_denoiser(tmp_path / "a.safetensors").model.state_dict()
    b = load_denoiser(tmp_path / "b.safetensors").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_denoiser(tmp_path / "b.safetensors").metadata["step"] == 4


def test_resume_refuses_changed_settings_and_missing_state(image_folder, tmp_path):
    train(tiny_cfg(image_folder, tmp_path / "a.safetensors", iterations=2), progress=False)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(tiny_cfg(image_folder, tmp_path / "a.safetensors", iterations=4, batch_size=8, resume=True),
              progress=False)
    with pytest.raises(CheckpointError, match="weight_decay was 0.0, now 0.1"):  # AdamW would restore 0.0
        train(tiny_cfg(image_folder, tmp_path / "a.safetensors", iterations=4, weight_decay=0.1, resume=True),
              progress=False)
    with pytest.raises(CheckpointError, match="no training state"):
        train(tiny_cfg(image_folder, tmp_path / "zz.safetensors", resume=True), progress=False)


def test_train_from_tar_shards(cifar64, tmp_path):
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "s-0.tar", cifar_samples(cifar64[:6]))
    write_tar(tmp_path / "shards" / "s-1.tar", cifar_samples(cifar64[6:10], "jpg"))
    summary = train(tiny_cfg(tmp_path / "shards", tmp_path / "d.safetensors", iterations=1), progress=False)
    assert summary["images"] == 10
    assert load_denoiser(tmp_path / "d.safetensors").class_spectra is None  # 7 + 3 images: too few to record
    summary = train(tiny_cfg(str(tmp_path / "shards" / "s-{0..1}.tar"), tmp_path / "e.safetensors", iterations=1),
                    progress=False)
    assert summary["images"] == 10


def test_train_records_its_clean_sets_class_spectra(tmp_path):
    """Labelled shards: the denoiser records each class's power spectrum (purify --deblur auto compares to it)."""
    from eclipse_stream.deblur import ClassSpectra
    items = [it for it in read_cifar(200) if it[1] in (0, 1)]
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "s-0.tar", cifar_samples(items))
    train(tiny_cfg(tmp_path / "shards", tmp_path / "d.safetensors", iterations=1), progress=False)
    recorded, expected = (load_denoiser(tmp_path / "d.safetensors").class_spectra,
                          ClassSpectra.from_shards(str(tmp_path / "shards")))
    assert recorded.images == expected.images and sum(recorded.images.values()) == len(items)
    assert sorted(recorded.images) == ["0", "1"]
    assert all(torch.allclose(recorded.spectra[c], expected.spectra[c]) for c in expected.spectra)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "eclipse_stream.cli", *map(str, args)], capture_output=True,
                          text=True, env=cli_env())


def test_bad_inputs_give_clear_errors(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    r = run_cli("train", tmp_path / "empty", "--out", tmp_path / "x.safetensors", "--preset", "tiny")
    assert r.returncode != 0 and "no images found" in r.stderr and "Traceback" not in r.stderr

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    (tmp_path / "text" / "data.csv").write_text("1,2")
    r = run_cli("train", tmp_path / "text", "--out", tmp_path / "x.safetensors", "--preset", "tiny")
    assert r.returncode != 0 and "no images found" in r.stderr and "notes.txt" in r.stderr

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "fake.jpg").write_bytes(b"not a jpeg")
    r = run_cli("train", tmp_path / "broken", "--out", tmp_path / "x.safetensors", "--preset", "tiny")
    assert r.returncode != 0 and "fake.jpg" in r.stderr and "undecodable" in r.stderr

    state = tmp_path / "x.safetensors.state.safetensors"
    state.write_bytes(b"\x00" * 100)
    r = run_cli("train", image_folder, "--out", tmp_path / "x.safetensors", "--preset", "tiny", "--resume")
    assert r.returncode != 0 and "x.safetensors.state.safetensors" in r.stderr and "Traceback" not in r.stderr

    r = run_cli("info", state)
    assert r.returncode != 0 and "safetensors" in r.stderr
    with pytest.raises(InputError):
        train(tiny_cfg(tmp_path / "nonexistent-dir", tmp_path / "y.safetensors"), progress=False)


def test_replicated_sampler_and_ema_warmup():
    s = ReplicatedSampler(n=5, replicate=4, batch_size=4, seed=0)
    seen = torch.cat([s.batch(i) for i in range(5)])  # exactly one epoch = 20 positions
    assert torch.bincount(seen, minlength=5).tolist() == [4] * 5
    assert not torch.equal(torch.cat([s.batch(i) for i in range(5, 10)]), seen)  # reshuffled next epoch
    # batches of 3 over epochs of 20 cross epoch boundaries: still position p of the run is epoch p // 20's
    # order at p % 20, as the one-index-at-a-time definition says
    s3 = ReplicatedSampler(n=5, replicate=4, batch_size=3, seed=1)
    run = torch.cat([s3.batch(i) for i in range(14)])
    assert run.tolist() == [s3._order(p // 20)[p % 20].item() for p in range(42)]
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(10**7, 0.9999) == 0.9999


def test_train_state_with_wrong_kind_is_refused(tmp_path, image_folder):
    from eclipse_stream.diffusion import DiffusionConfig
    from eclipse_stream.unet import UNet, preset_config

    m, ema = UNet(preset_config("small", 32)), UNet(preset_config("small", 32))
    save_train_state(tmp_path / "s.safetensors", model=m, ema=ema, optimizer=torch.optim.AdamW(m.parameters()),
                     diffusion_config=DiffusionConfig(), step=1, train_args={}, train_files_sha256="x")
    with pytest.raises(CheckpointError, match="different UNet config"):
        train(tiny_cfg(image_folder, tmp_path / "o.safetensors", state=str(tmp_path / "s.safetensors"),
                       resume=True), progress=False)


def test_bf16_training_keeps_fp32_weights(image_folder, tmp_path):
    summary = train(tiny_cfg(image_folder, tmp_path / "bf.safetensors", iterations=2, precision="bf16"),
                    progress=False)
    assert summary["final_loss"] is not None and 0 < summary["final_loss"] < 10
    den = load_denoiser(tmp_path / "bf.safetensors")
    assert all(p.dtype == torch.float32 for p in den.model.parameters())
    assert den.metadata["train_args"]["precision"] == "bf16"


def test_max_timestep_trains_only_that_range_and_purify_refuses_above_it(image_folder, tmp_path, monkeypatch):
    from eclipse_stream.diffusion import GaussianDiffusion
    from eclipse_stream.purifier import Purifier, PurifierConfig

    drawn = []
    real = GaussianDiffusion.sample_timesteps

    def spy(self, batch, device, generator=None, high=None):
        t = real(self, batch, device, generator, high)
        drawn.append(t)
        return t

    monkeypatch.setattr(GaussianDiffusion, "sample_timesteps", spy)
    out = tmp_path / "k200.safetensors"
    train(tiny_cfg(image_folder, out, max_timestep=200, iterations=6), progress=False)
    t = torch.cat(drawn)
    assert t.max() < 200 and len(t) == 6 * 4
    den = load_denoiser(out)
    assert den.metadata["trained_timesteps"] == [0, 200] and den.trained_max_timestep == 200
    assert den.diffusion.num_timesteps == 1000  # a normal full-schedule checkpoint
    Purifier(den, PurifierConfig(t_star=200))
    with pytest.raises(ValueError, match="trained on"):
        Purifier(den, PurifierConfig(t_star=201))
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "preview", str(out), "-o", str(tmp_path / "p.png"),
                        "-d", str(out), "--t-star", "300"], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 2 and "trained on" in r.stderr and "Traceback" not in r.stderr

    with pytest.raises(CheckpointError, match="max_timestep"):  # resuming with another range is refused
        train(tiny_cfg(image_folder, out, max_timestep=400, iterations=8, resume=True), progress=False)
    with pytest.raises(ValueError, match="max timestep"):
        tiny_cfg(image_folder, out, max_timestep=1001)


def test_old_checkpoints_read_as_full_range(image_folder, tmp_path):
    out = tmp_path / "full.safetensors"
    train(tiny_cfg(image_folder, out, iterations=2), progress=False)
    den = load_denoiser(out)
    assert den.trained_max_timestep == 1000
    den.metadata.pop("trained_timesteps")  # as written before --max-timestep existed
    assert den.trained_max_timestep == 1000


def test_init_from_starts_at_a_denoisers_weights_and_is_recorded(image_folder, tmp_path):
    """Fine-tuning: a run started --init-from a denoiser begins at its weights; the file's sha256 is
    recorded, a resume with another (or no) starting point is refused, and another UNet is refused."""
    base = tiny_cfg(image_folder, tmp_path / "a.safetensors", iterations=2)
    train(base, progress=False)
    start = load_denoiser(base.out)
    cfg = tiny_cfg(image_folder, tmp_path / "b.safetensors", iterations=1, lr=1e-12, init_from=base.out,
                   max_timestep=200)
    train(cfg, progress=False)
    tuned = load_denoiser(cfg.out)
    assert tuned.metadata["train_args"]["init_from_sha256"] == start.sha256
    assert "init_from" not in tuned.metadata["train_args"]  # a path is not portable; the hash is
    for (name, a), b in zip(start.model.state_dict().items(), tuned.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # lr ~0: the weights it started from
    other = tiny_cfg(image_folder, tmp_path / "c.safetensors", iterations=1, seed=5)
    train(other, progress=False)
    with pytest.raises(CheckpointError, match="init_from_sha256"):
        train(replace(cfg, iterations=2, resume=True, init_from=other.out), progress=False)
    with pytest.raises(CheckpointError, match="init_from_sha256"):
        train(replace(cfg, iterations=2, resume=True, init_from=None), progress=False)
    train(replace(cfg, iterations=2, resume=True), progress=False)  # the same start resumes
    with pytest.raises(CheckpointError, match="UNet"):
        train(tiny_cfg(image_folder, tmp_path / "d.safetensors", preset="small", init_from=base.out),
              progress=False)
    with pytest.raises(CheckpointError, match="schedule"):
        train(tiny_cfg(image_folder, tmp_path / "e.safetensors", diffusion_steps=4000, init_from=base.out),
              progress=False)
