"""Fuzzing purify with odd and broken tars, and killing it again and again: nothing is lost or overwritten.

Both tests use fixed seeds, so a failure reproduces with the same inputs.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cifar_samples, cli_env, hidden_files, write_tar

from eclipse_stream.errors import EclipseError
from eclipse_stream.fsutil import file_sha256
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import PurifierConfig

IMAGE = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"}
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule: key, then every extension
ODD_KEYS = ["plain", "with space", "ünïcödé", "dir.v1/s", "./dotted", "L" * 120, "x", "tab\there"]


def _members(rng: np.random.Generator, pngs: list[bytes]) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Samples with odd keys and fields in random order, members WebDataset skips, sometimes interleaved."""
    out = []

    def reg(name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 1_700_000_000
        out.append((info, data))

    keys = rng.choice(ODD_KEYS, size=rng.integers(2, 6), replace=False)
    for i, key in enumerate(keys):
        fields = {"cls": str(i).encode(), "json": b'{"i": %d}' % i}
        fields[str(rng.choice(["png", "PNG", "left.png"]))] = pngs[i % len(pngs)]
        if rng.random() < 0.3:
            fields["jpg" if rng.random() < 0.5 else "png2.png"] = pngs[(i + 1) % len(pngs)]
        if rng.random() < 0.3:
            fields["_private"] = b"private"
        if rng.random() < 0.2:
            fields["__meta__"] = b"meta"
        if rng.random() < 0.15:
            fields["png" if "png" not in fields else "webp"] = b"not an image"
        names = list(fields)
        rng.shuffle(names)
        for name in names:
            reg(f"{key}.{name}", fields[name])
        extra = rng.random()
        if extra < 0.15:
            link = tarfile.TarInfo(f"{key}.link")
            link.type, link.linkname = tarfile.SYMTYPE, f"{key}.cls"
            out.append((link, None))
        elif extra < 0.3:
            reg(f"NOTES{i}", b"no extension")
    if rng.random() < 0.3:
        reg("__index__", b"index")
    if rng.random() < 0.3:  # one member moved elsewhere: its key then forms a sample of its own
        j, k = rng.integers(0, len(out), size=2)
        out.insert(int(k), out.pop(int(j)))
    return out


def _expected(members) -> tuple[list[tuple[str, dict]], list]:
    """The samples (key, {field: bytes}) and other members a WebDataset-style reader sees, in order."""
    samples, other = [], []
    for info, data in members:
        m = KEY_EXT.match(info.name)
        meta = "/" not in info.name and info.name.startswith("__") and info.name.endswith("__")
        if not info.isreg() or m is None or meta:
            other.append((info, data))
            continue
        if samples and samples[-1][0] == m.group(1):
            samples[-1][1][m.group(2)] = data
        else:
            samples.append((m.group(1), {m.group(2): data}))
    return samples, other


def _read(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]


@pytest.fixture(scope="module")
def pngs(cifar64):
    return [s["png"] for s in cifar_samples(cifar64[:6])]


@pytest.mark.parametrize("seed", range(24))
def test_fuzz_every_run_fails_cleanly_or_accounts_for_every_sample(pngs, tiny_ckpt, tmp_path, seed):
    rng = np.random.default_rng(seed)
    members = _members(rng, pngs)
    src = tmp_path / "in" / "fuzz.tar"
    src.parent.mkdir()
    with tarfile.open(src, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    full = src.read_bytes()
    with tarfile.open(src) as tf:
        tf.getmembers()
        end = tf.offset  # where the end-of-archive marker starts
    cut = int(rng.integers(0, end + 1024)) if rng.random() < 0.5 else None
    if cut is not None:
        src.write_bytes(full[:cut])
    on_error = "skip" if rng.random() < 0.7 else "fail"
    cfg = PurifyConfig(purifier=PurifierConfig(steps=2), batch_size=int(rng.integers(1, 4)), workers=0,
                       on_error=on_error)
    out = tmp_path / "out"
    try:
        res = purify_shards(src.parent, out, tiny_ckpt, cfg, progress=False)
    except EclipseError as e:  # a clean error: one line naming the shard, nothing under a final name
        assert str(src) in str(e) and "\n" not in str(e)
        assert not (out / "fuzz.tar").exists() and not hidden_files(out)
        return
    if cut is not None and res.failed:
        assert not (out / "fuzz.tar").exists() and res.manifest is None
        assert not hidden_files(out)
        return
    assert cut is None, f"a tar cut at byte {cut} of {len(full)} (end marker at {end}) was read as complete"
    samples, other = _expected(members)
    stats = res.processed[0]
    assert stats["samples_in"] == len(samples) == stats["written"] + stats["rejected"]
    assert stats["other_members_copied"] == len(other)
    rejected = {r["index"] for r in stats["rejects"]}
    written = _read(out / "fuzz.tar")
    got = {}
    for info, data in written:
        got.setdefault(info.name, []).append((info, data))
    expect_names = [i.name for i, _ in other]
    for n, (key, fields) in enumerate(samples):
        if n in rejected:
            continue
        for field, data in fields.items():
            expect_names.append(f"{key}.{field}")
            name = f"{key}.{field}"
            outs = [d for _, d in got[name]]
            if field.rsplit(".", 1)[-1].lower() not in IMAGE:
                assert data in outs, name  # every other field byte-identical
    assert sorted(i.name for i, _ in written) == sorted(expect_names)
    for info, data in other:
        assert any(i.type == info.type and i.linkname == info.linkname and d == data for i, d in got[info.name])


def test_fuzz_random_cuts_of_a_real_shard_never_pass_as_complete(shard_dir, tiny_ckpt, tmp_path):
    from eclipse_stream.errors import ShardError

    data = (shard_dir / "part-000.tar").read_bytes()  # 12 real CIFAR-10 samples: png, cls, json
    with tarfile.open(shard_dir / "part-000.tar") as tf:
        tf.getmembers()
        end = tf.offset
    rng = np.random.default_rng(7)
    (tmp_path / "in").mkdir()
    for i, cut in enumerate(sorted(rng.integers(1, end + 1024, size=10))):
        (tmp_path / "in" / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match=r"cut\.tar: .*tar \((after sample '[^']+'|before its first "
                                             r"complete sample)\)"):
            purify_shards(tmp_path / "in", tmp_path / f"o{i}", tiny_ckpt,
                          PurifyConfig(purifier=PurifierConfig(steps=2), workers=0), progress=False)
        assert not (tmp_path / f"o{i}").exists()  # nothing written: the OUT this run made is removed again


def _shards(cifar64, d: Path, n: int = 6) -> Path:
    d.mkdir()
    for i in range(n):
        write_tar(d / f"s-{i:03d}.tar", cifar_samples(cifar64[i * 5:(i + 1) * 5]))
    return d


def test_killed_again_and_again_then_resumed_gives_identical_output(cifar64, tiny_ckpt, tmp_path):
    rng = np.random.default_rng(1234)
    src = _shards(cifar64, tmp_path / "in")
    common = ["-d", str(tiny_ckpt), "--steps", "12", "--batch-size", "2", "--workers", "1", "-q"]

    def cmd(out):
        return [sys.executable, "-m", "eclipse_stream.cli", "purify", str(src), str(out), *common]

    subprocess.run(cmd(tmp_path / "ref"), check=True, env=cli_env(), capture_output=True)
    out = tmp_path / "killed"

    def stats_files():
        return list(out.glob("*.stats.json")) if out.exists() else []

    def wait_for(ready, proc, timeout=120.0):
        end = time.monotonic() + timeout
        while proc.poll() is None and not ready() and time.monotonic() < end:
            time.sleep(0.005)

    # Kill points chosen by what the run has done, not by wall time (a fast machine finishes a run inside
    # any fixed delay): during start-up (before OUT exists), while a shard is half written, and right after
    # a shard's stats file appears; each with a random extra delay.
    kills = 0
    for when, extra in zip(("start-up", "mid-shard", "after-stats", "mid-shard"), rng.uniform(0.0, 0.05, size=4)):
        done_before = len(stats_files())
        proc = subprocess.Popen(cmd(out), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if when == "start-up":
            time.sleep(0.3 + extra)
        elif when == "mid-shard":
            wait_for(lambda: out.exists() and any(out.glob(".*partial*")), proc)
            time.sleep(extra)
        else:
            wait_for(lambda n=done_before: len(stats_files()) > n, proc)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the main process and its reader worker
            kills += 1
        proc.wait()
        if out.exists():  # after any kill: a stats file always describes the output beside it
            for stats in stats_files():
                shard = out / stats.name[: -len(".stats.json")]
                assert json.loads(stats.read_text())["output_sha256"] == file_sha256(shard)
            if (out / "manifest.json").exists():  # only once every shard is done
                assert len(stats_files()) == 6
    assert kills >= 3, kills
    r = subprocess.run(cmd(out), env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.tar")}
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == ref
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 30 and manifest["totals"]["rejected"] == 0
