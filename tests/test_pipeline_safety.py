"""Nothing lost, nothing overwritten (issue 10): every way purify could lose or damage data, one test each."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import cifar_samples, cli_env, tar_members, write_tar
from eclipse_stream.errors import EclipseError, InputError, ShardError
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import PurifierConfig

FAST = PurifierConfig(t_star=100, steps=2)


def cfg(**kw):
    base = {"purifier": FAST, "batch_size": 4, "workers": 0}
    base.update(kw)
    return PurifyConfig(**base)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "eclipse_stream.cli", *map(str, args)], capture_output=True,
                           text=True, env=cli_env(), **kw)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- 1. OUT must not be, contain or lie inside an input folder -------------------------------------------

@pytest.mark.parametrize("layout", ["same", "out-inside-in", "in-inside-out", "file-in-out"])
def test_out_overlapping_the_input_is_refused_before_anything_is_touched(shard_dir, tiny_ckpt, tmp_path, layout):
    data = tmp_path / "d"
    data.mkdir()
    for p in shard_dir.glob("*.tar"):
        (data / p.name).write_bytes(p.read_bytes())
    before = snapshot(tmp_path)
    inp, out = {"same": (data, data), "out-inside-in": (data, data / "purified"),
                "in-inside-out": (data, tmp_path), "file-in-out": (data / "part-000.tar", data)}[layout]
    r = cli("purify", inp, out, "-d", tiny_ckpt, "--steps", "2", "--workers", "0", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "overlap" in r.stderr and str(out.resolve()) in r.stderr
    assert snapshot(tmp_path) == before and not (data / "purified").exists()


# --- 5. a dangling symlink or unreadable file among the input shards ----------------------------------------

def test_a_dangling_symlink_among_the_shards_is_an_error_naming_it(shard_dir, tiny_ckpt, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.tar").write_bytes((shard_dir / "part-000.tar").read_bytes())
    (data / "b.tar").symlink_to(tmp_path / "gone.tar")
    with pytest.raises(InputError, match=r"b\.tar: .*(broken|dangling) symbolic link"):
        purify_shards(data, tmp_path / "out", tiny_ckpt, cfg(), progress=False)
    with pytest.raises(InputError, match=r"b\.tar: .*symbolic link"):
        purify_shards(data / "b.tar", tmp_path / "out", tiny_ckpt, cfg(), progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_shard_is_an_error_naming_it(shard_dir, tiny_ckpt, tmp_path, monkeypatch):
    from eclipse_stream import sources

    data = tmp_path / "d"
    data.mkdir()
    for name in ("a.tar", "b.tar"):
        (data / name).write_bytes((shard_dir / "part-000.tar").read_bytes())
    real_open = open

    def deny(path, *a, **k):  # root ignores chmod 000, so refuse the read the way EACCES would
        if str(path).endswith("b.tar"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(sources, "open", deny, raising=False)
    with pytest.raises(InputError, match=r"b\.tar: cannot read: Permission denied"):
        purify_shards(data, tmp_path / "out", tiny_ckpt, cfg(), progress=False)
    assert not (tmp_path / "out").exists()


# --- 12. small ones ----------------------------------------------------------------------------------------

def test_an_empty_denoiser_path_is_an_error_not_the_shipped_model(shard_dir, tmp_path):
    r = cli("purify", shard_dir, tmp_path / "out", "--denoiser", "", "-q")
    assert r.returncode == 2 and "--denoiser" in r.stderr and "empty" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("preview", shard_dir / "part-000.tar", "-o", tmp_path / "p.png", "-d", "")
    assert r.returncode == 2 and "empty" in r.stderr


def test_on_error_is_not_part_of_the_settings_fingerprint(shard_dir, tiny_ckpt, tmp_path):
    first = purify_shards(shard_dir / "part-000.tar", tmp_path / "out", tiny_ckpt, cfg(on_error="fail"),
                          progress=False)
    assert "on_error" not in first.processed[0]["config"]
    again = purify_shards(shard_dir / "part-000.tar", tmp_path / "out", tiny_ckpt, cfg(on_error="skip"),
                          progress=False)
    assert again.skipped == ["part-000.tar"] and not again.processed


def test_the_progress_bar_reaches_100_percent_when_samples_are_skipped(cifar64, tiny_ckpt, tmp_path, capsys):
    good = cifar_samples(cifar64[:6])
    bad = [{"__key__": f"bad{i}", "png": b"not an image", "cls": b"0"} for i in range(3)]
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", good[:3] + bad + good[3:])
    write_tar(tmp_path / "in" / "b.tar", bad[:1] + good[:2])
    purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, cfg(on_error="skip"), progress=True)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "12/12" in last and "100%" in last, last
