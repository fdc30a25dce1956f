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


# --- 6. a rerun invalidates the manifest it will rewrite; a redone shard never sits beside old stats -------

def _many(cifar64, d: Path, n: int = 6, per: int = 6) -> Path:
    d.mkdir()
    for i in range(n):
        write_tar(d / f"s-{i:03d}.tar", cifar_samples(cifar64[i * per:(i + 1) * per]))
    return d


def _wait_for(pred, timeout=120):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_an_interrupted_overwrite_leaves_no_stale_manifest(cifar64, tiny_ckpt, tmp_path):
    import signal
    src, out = _many(cifar64, tmp_path / "in"), tmp_path / "out"
    args = ["purify", src, out, "-d", tiny_ckpt, "--steps", "12", "--batch-size", "2", "--workers", "1", "-q"]
    assert cli(*args).returncode == 0 and (out / "manifest.json").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.stats.json")}
    proc = subprocess.Popen([sys.executable, "-m", "eclipse_stream.cli", *map(str, args), "--overwrite",
                             "--seed", "3"], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    changed = lambda: any(p.stat().st_mtime_ns != mtimes.get(p.name) for p in out.glob("*.stats.json"))  # noqa: E731
    assert _wait_for(changed)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()


def test_a_failed_overwrite_never_leaves_new_bytes_under_old_stats(shard_dir, tiny_ckpt, tmp_path, monkeypatch):
    from eclipse_stream import pipeline

    src, out = shard_dir / "part-000.tar", tmp_path / "out"
    purify_shards(src, out, tiny_ckpt, cfg(), progress=False)
    original = (out / "part-000.tar").read_bytes()
    real = pipeline.write_json

    def crash_on_stats(path, obj, **kw):
        if str(path).endswith(".stats.json"):
            raise KeyboardInterrupt  # as a kill between the rename of the output and its stats file
        return real(path, obj, **kw)

    monkeypatch.setattr(pipeline, "write_json", crash_on_stats)
    with pytest.raises(KeyboardInterrupt):
        purify_shards(src, out, tiny_ckpt, cfg(seed=7, overwrite=True), progress=False)
    monkeypatch.setattr(pipeline, "write_json", real)
    again = purify_shards(src, out, tiny_ckpt, cfg(), progress=False)  # the old settings: must not trust it
    assert [s["shard"] for s in again.processed] == ["part-000.tar"]
    assert (out / "part-000.tar").read_bytes() == original


# --- 8. one purify per OUT; the ranks of one torchrun job share it ------------------------------------------

def test_a_second_purify_into_the_same_out_is_refused_and_the_first_finishes(cifar64, tiny_ckpt, tmp_path):
    src, out = _many(cifar64, tmp_path / "in"), tmp_path / "out"
    args = ["purify", src, out, "-d", tiny_ckpt, "--steps", "12", "--batch-size", "2", "--workers", "1", "-q"]
    first = subprocess.Popen([sys.executable, "-m", "eclipse_stream.cli", *map(str, args)], env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: list(out.glob(".*.partial-*")))
    second = cli(*args)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert f"in use by PID {first.pid}" in second.stderr and str(out) in second.stderr, second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (out / "manifest.json").is_file() and len(list(out.glob("*.stats.json"))) == 6
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the lock file is gone too


def test_a_torchrun_job_into_a_locked_out_fails_cleanly_on_every_rank(shard_dir, tiny_ckpt, tmp_path):
    from eclipse_stream.fsutil import DirLock

    out = tmp_path / "out"
    out.mkdir()
    with DirLock(out):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "eclipse_stream.cli", "purify", str(shard_dir), str(out), "-d", str(tiny_ckpt),
                            "--steps", "2", "--workers", "0", "-q", "--device", "cpu"],
                           env=cli_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        assert r.stderr.count(f"in use by PID {os.getpid()}") == 2, r.stderr[-3000:]  # rank 0 and rank 1
        assert [p.name for p in out.iterdir()] == [".eclipse-stream.lock"]


# --- 9. unwritable OUT, full disk: one clean line, nothing partial under a final name -----------------------

def test_an_unwritable_out_is_a_clean_error(shard_dir, tiny_ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from eclipse_stream import fsutil
    from eclipse_stream.cli import main

    real_open = os.open

    def eacces(path, *a, **k):
        if str(path).startswith(str(tmp_path / "out")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(fsutil.os, "open", eacces)
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "out"), "-d", str(tiny_ckpt),
                                  "--steps", "2", "--workers", "0", "-q"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert f"error: {tmp_path / 'out'}" in r.output and "Permission denied" in r.output


@pytest.mark.parametrize("where", ["shard", "stats", "manifest"])
def test_a_full_disk_is_a_clean_error_and_a_rerun_completes(shard_dir, tiny_ckpt, tmp_path, monkeypatch, where):
    import errno

    from click.testing import CliRunner

    from eclipse_stream import fsutil
    from eclipse_stream.cli import main

    purify_shards(shard_dir, tmp_path / "ref", tiny_ckpt, cfg(), progress=False)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if where == "shard":
        real_addfile = tarfile.TarFile.addfile
        calls = []

        def addfile(self, *a, **k):
            calls.append(1)
            if len(calls) == 20:
                raise enospc
            return real_addfile(self, *a, **k)
        monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    else:
        real_write_text = Path.write_text
        name = {"stats": "part-001.tar.stats.json", "manifest": "manifest.json"}[where]

        def write_text(self, *a, **k):
            if self.name.startswith(f".{name}."):
                raise enospc
            return real_write_text(self, *a, **k)
        monkeypatch.setattr(fsutil.Path, "write_text", write_text)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(out), "-d", str(tiny_ckpt), "--steps", "2",
                                  "--workers", "0", "--batch-size", "4", "-q"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "No space left on device" in r.output and f"error: {out}" in r.output, r.output
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file, no lock left
    for p in out.glob("*.tar"):  # whatever is under a final name is complete and recorded
        assert (out / (p.name + ".stats.json")).is_file() or where == "stats"
    monkeypatch.undo()
    purify_shards(shard_dir, out, tiny_ckpt, cfg(), progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == \
        {p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.tar")}


# --- 10. a rerun removes every temporary file a killed run could have left ----------------------------------

def test_a_rerun_removes_every_kind_of_leftover_temporary_file(shard_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    purify_shards(shard_dir, out, tiny_ckpt, cfg(), progress=False)
    leftovers = [".part-000.tar.stats.json.4242.deadbeef.tmp", ".manifest.json.4242.0badcafe.tmp",
                 ".part-001.tar.partial-4242", ".gone.tar.partial-77", ".gone.tar.stats.json.77.12345678.tmp"]
    for name in leftovers:
        (out / name).write_bytes(b"half")
    spool = out / ".x.beton.partial-1.spool-abc123"
    spool.mkdir()
    (spool / "records").write_bytes(b"\0" * 10)
    (out / ".eclipse-stream.lock").write_text("4242 elsewhere\n")  # a SIGKILLed run's lock file (not held)
    (out / ".my-own-notes").write_text("the user's")  # not ours: kept
    (out / "notes.txt").write_text("the user's")
    again = purify_shards(shard_dir, out, tiny_ckpt, cfg(), progress=False)
    assert len(again.skipped) == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".my-own-notes"]
    assert (out / "notes.txt").is_file()
