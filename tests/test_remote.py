"""Shards where users keep them (issue 23): URLs and object storage in, object storage out.

Every test talks to a real server it starts on a free local port: Python's http.server for http:// inputs,
``pipe:`` commands run by the shell, and moto's S3 server reached through s3fs with an endpoint URL.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cifar_samples, cli_env, hidden_files, rgb_array
from servers import FAKE_AWS, FreezingProxy, free_port, http_server, moto_s3

from eclipse_stream import storage
from eclipse_stream.errors import InputError, OutputError, ShardError
from eclipse_stream.formats.tar import read_tar
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import PurifierConfig

s3fs = pytest.importorskip("s3fs", reason="the cloud extra (fsspec + s3fs) is installed by scripts/setup.sh")
pytest.importorskip("moto.server", reason="moto[server] is installed by scripts/setup.sh")

FAST = PurifierConfig(t_star=100, steps=2)
BUCKET = "eclipse-test"


def cfg(**kw):
    return PurifyConfig(**{"purifier": FAST, "batch_size": 4, "workers": 0, **kw})


def tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


@pytest.fixture(scope="module")
def reference(shard_dir, tiny_ckpt, tmp_path_factory):
    """The outputs of a plain local run: every remote run must give these bytes."""
    out = tmp_path_factory.mktemp("reference")
    purify_shards(shard_dir, out, tiny_ckpt, cfg(), progress=False)
    return tars(out)


@pytest.fixture(scope="module")
def http_base(shard_dir):
    with http_server(shard_dir) as base:
        yield base


@pytest.fixture(scope="module")
def s3(shard_dir):
    """moto's S3 server with the test shards under s3://eclipse-test/in/; yields (endpoint, s3fs filesystem).
    Storage options point every fsspec filesystem of the test process at it."""
    saved = {k: os.environ.get(k) for k in FAKE_AWS}
    os.environ.update(FAKE_AWS)
    with moto_s3() as endpoint:
        storage.set_options({"endpoint_url": endpoint})
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        for p in sorted(shard_dir.glob("*.tar")):
            fs.put_file(str(p), f"{BUCKET}/in/{p.name}")
        try:
            yield endpoint, fs
        finally:
            storage.set_options(None)
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def s3_objects(fs, prefix: str, bucket: str = BUCKET) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in sorted(fs.find(f"{bucket}/{prefix}"))}


# --- the tar reader's stream entry -------------------------------------------------------------------------

class OneWay(io.RawIOBase):
    """A file object that can only be read front to back, as a pipe or an HTTP body."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, b):
        n = min(len(b), len(self._data) - self._pos, 7919)  # odd chunk sizes, as a socket gives them
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize("compress", ["", "gz"])
def test_a_tar_read_from_a_stream_gives_what_the_file_gives(shard_dir, tmp_path, compress):
    src = shard_dir / "part-000.tar"
    data = src.read_bytes()
    if compress:
        import gzip
        data = gzip.compress(data)
    path = tmp_path / f"x.tar{'.gz' if compress else ''}"
    path.write_bytes(data)
    from_file = list(read_tar(path))
    from_stream = list(read_tar("a stream", fileobj=io.BufferedReader(OneWay(data))))
    assert from_stream == from_file and len(from_file) == 12


def test_a_cut_stream_is_still_an_incomplete_tar(shard_dir):
    data = (shard_dir / "part-000.tar").read_bytes()
    for cut in (len(data.rstrip(b"\0")) + 1, len(data) // 2, 1000):  # no end-of-archive blocks; mid-member
        with pytest.raises(ShardError, match="incomplete tar|corrupt or truncated tar"):
            list(read_tar("a stream", fileobj=OneWay(data[:cut])))


# --- http(s):// and pipe: inputs ---------------------------------------------------------------------------

def test_http_brace_pattern_input_gives_the_local_outputs_and_resumes(http_base, tiny_ckpt, tmp_path, reference):
    url = f"{http_base}/part-{{000..002}}.tar"
    out = tmp_path / "out"
    result = purify_shards(url, out, tiny_ckpt, cfg(workers=1), progress=False)
    assert not result.failed and len(result.processed) == 3
    assert tars(out) == reference
    stats = json.loads((out / "part-001.tar.stats.json").read_text())
    assert stats["input"] == f"{http_base}/part-001.tar" and stats["input_size"] > 0 and stats["input_mtime"]
    again = purify_shards(url, out, tiny_ckpt, cfg(), progress=False)
    assert sorted(again.skipped) == ["part-000.tar", "part-001.tar", "part-002.tar"] and not again.processed


def test_a_missing_url_is_an_input_error_naming_it_and_leaves_nothing(http_base, tiny_ckpt, tmp_path, shard_dir):
    out = tmp_path / "out"
    with pytest.raises(ShardError) as e:
        purify_shards([f"{http_base}/part-000.tar", f"{http_base}/nope.tar"], out, tiny_ckpt, cfg(),
                      progress=False)
    assert f"{http_base}/nope.tar" in str(e.value) and "not found (HTTP 404)" in str(e.value)
    assert isinstance(e.value, InputError) and e.value.exit_code == 2
    # nothing partial, no lock; OUT itself is gone when part-000 was not finished before the error
    assert not hidden_files(out) and not (out / "nope.tar").exists()


def test_an_unreachable_host_is_a_clear_error(tiny_ckpt, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/part-000.tar"
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "purify", url, str(tmp_path / "out"),
                        "-d", str(tiny_ckpt), "--steps", "2", "--workers", "0", "-q"],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {url}: cannot read: cannot connect") and "Traceback" not in r.stderr


def test_credentials_in_a_url_are_never_printed(http_base, tiny_ckpt, tmp_path):
    url = http_base.replace("http://", "http://user:s3cr3t@") + "/nope.tar?X-Amz-Signature=t0ps3cr3t"
    with pytest.raises(ShardError) as e:
        purify_shards(url, tmp_path / "out", tiny_ckpt, cfg(), progress=False)
    assert "s3cr3t" not in str(e.value) and "***@127.0.0.1" in str(e.value) and "nope.tar?..." in str(e.value)


def test_pipe_input_gives_the_local_outputs(shard_dir, tiny_ckpt, tmp_path, reference):
    inputs = [f"pipe:cat {shard_dir}/part-{{000..002}}.tar"]
    out = tmp_path / "out"
    result = purify_shards(inputs, out, tiny_ckpt, cfg(workers=2), progress=False)
    assert not result.failed and tars(out) == reference
    stats = json.loads((out / "part-000.tar.stats.json").read_text())
    assert stats["input"] == f"pipe:cat {shard_dir}/part-000.tar"


def test_a_failing_pipe_command_is_a_shard_error(tiny_ckpt, tmp_path):
    with pytest.raises(ShardError, match=r"pipe:cat /nonexistent/a\.tar: cannot read: the command exited with "
                                         r"status 1"):
        purify_shards("pipe:cat /nonexistent/a.tar", tmp_path / "out", tiny_ckpt, cfg(), progress=False)
    with pytest.raises(InputError, match="must end in .tar or .beton"):
        purify_shards("pipe:cat /x/shard", tmp_path / "out", tiny_ckpt, cfg(), progress=False)


def test_scan_and_train_read_urls(http_base, shard_dir):
    from eclipse_stream.scan import ScanConfig, sample_shards
    from eclipse_stream.sources import load_training_images

    sc = ScanConfig(per_class=4, probe_size=8)
    local, remote = sample_shards(shard_dir, sc).whole, sample_shards(f"{http_base}/part-{{000..002}}.tar", sc).whole
    assert (local.images == remote.images).all() and (local.labels == remote.labels).all()
    images, _ = load_training_images(f"pipe:cat {shard_dir}/part-{{000..002}}.tar", 32)
    assert (images == load_training_images(str(shard_dir), 32)[0]).all() and len(images) == 30


# --- s3:// in and out (moto's S3 server) ----------------------------------------------------------------------

def test_s3_in_and_out_match_the_local_run_and_resume_checks_the_objects(s3, tiny_ckpt, reference):
    endpoint, fs = s3
    out = f"s3://{BUCKET}/out-a"
    result = purify_shards(f"s3://{BUCKET}/in/", out, tiny_ckpt, cfg(workers=1), progress=False)
    assert not result.failed and len(result.processed) == 3
    objects = s3_objects(fs, "out-a")
    assert {k: v for k, v in objects.items() if k.endswith(".tar")} == reference
    assert sorted(objects) == sorted([*reference, *(f"{n}.stats.json" for n in reference), "manifest.json"])
    stats = json.loads(objects["part-000.tar.stats.json"])
    assert stats["output"] == f"{out}/part-000.tar" and stats["output_size"] == len(reference["part-000.tar"])
    assert stats["output_etag"] and stats["input_etag"] and stats["input"] == f"s3://{BUCKET}/in/part-000.tar"
    manifest = json.loads(objects["manifest.json"])
    assert [e["output_sha256"] for e in manifest["shards"]] == [
        json.loads(objects[f"{n}.stats.json"])["output_sha256"] for n in reference]

    # a glob of the same objects: all done. An output replaced by other bytes, or deleted, is redone.
    fs.pipe_file(f"{BUCKET}/out-a/part-001.tar", b"not the purified shard")
    fs.rm_file(f"{BUCKET}/out-a/part-002.tar")
    again = purify_shards(f"s3://{BUCKET}/in/part-*.tar", out, tiny_ckpt, cfg(), progress=False)
    assert again.skipped == ["part-000.tar"] and sorted(s["shard"] for s in again.processed) == \
        ["part-001.tar", "part-002.tar"]
    objects = s3_objects(fs, "out-a")
    assert {k: v for k, v in objects.items() if k.endswith(".tar")} == reference


def test_readers_ask_no_head_and_get_each_small_shard_in_one_request(s3, shard_dir, tiny_ckpt, tmp_path, reference):
    """The listing gives each object's size and ETag: a reader sends one GET per shard (< 8 MiB) and no HEAD;
    the next shard is fetched while one is decoded. Only the finisher asks afresh (one HEAD per shard) before
    it marks a shard done."""
    from eclipse_stream.events import Batch, ShardEnded
    from eclipse_stream.outdir import Task
    from eclipse_stream.reading import ReadSettings, ShardEvents
    from eclipse_stream.sources import expand_shards

    endpoint, _ = s3
    host, port = endpoint.rsplit("/", 1)[1].split(":")
    proxy = FreezingProxy((host, int(port)))
    storage.set_options({"endpoint_url": proxy.url})
    try:
        urls = expand_shards(f"s3://{BUCKET}/in/")
        listed = len(proxy.requests)
        settings = ReadSettings.from_config(cfg(), None)
        events = list(ShardEvents([Task(i, u, storage.shard_name(u)) for i, u in enumerate(urls)], settings))
        reads = proxy.requests[listed:]
        result = purify_shards(f"s3://{BUCKET}/in/", tmp_path / "out", tiny_ckpt, cfg(workers=1), progress=False)
        run = proxy.requests[listed + len(reads):]
    finally:
        storage.set_options({"endpoint_url": endpoint})
        proxy.close()
    assert sorted(reads) == [("GET", f"/{BUCKET}/in/part-{i:03d}.tar") for i in range(3)]
    assert sum(isinstance(e, ShardEnded) for e in events) == 3
    assert sum(len(e.items) for e in events if isinstance(e, Batch)) == 30
    assert not result.failed and tars(tmp_path / "out") == reference
    shards = [f"/{BUCKET}/in/part-{i:03d}.tar" for i in range(3)]
    assert sorted(p for m, p in run if m == "HEAD" and p in shards) == shards  # the finisher's fresh look, once each
    assert sorted(p for m, p in run if m == "GET" and p in shards) == shards  # read once each


@pytest.mark.parametrize("replacement", ["another size", "same size"])
def test_an_object_replaced_after_the_listing_is_never_marked_done(s3, shard_dir, tiny_ckpt, tmp_path, monkeypatch,
                                                                   replacement):
    """Readers trust the listing's size and ETag. An input replaced after the listing by one of another size
    fails its read ("changed since it was listed"); by one of the same size (a label edited), the finisher,
    which asks the store afresh, refuses it before the shard is marked done."""
    from eclipse_stream import sources

    _, fs = s3
    prefix = f"swap-{replacement.replace(' ', '-')}"
    original = (shard_dir / "part-001.tar").read_bytes()
    if replacement == "same size":
        at = original.index(b".cls\0")  # the first label member's header; its data follows the 512-byte block
        data = bytearray(original)
        start = at - at % 512 + 512
        data[start] = ord("7") if data[start] != ord("7") else ord("8")
        new = bytes(data)
    else:
        new = (shard_dir / "part-002.tar").read_bytes()
    assert (len(new) == len(original)) == (replacement == "same size") and new != original
    fs.pipe_file(f"{BUCKET}/{prefix}/part-001.tar", original)
    real = sources.list_shards

    def list_then_replace(url, suffixes):
        found = real(url, suffixes)
        fs.pipe_file(f"{BUCKET}/{prefix}/part-001.tar", new)
        return found

    monkeypatch.setattr(sources, "list_shards", list_then_replace)
    why = "cannot read: the object changed since it was listed" if replacement == "another size" else \
        "the input shard changed while it was read"
    with pytest.raises(InputError, match=rf"s3://{BUCKET}/{prefix}/part-001.tar: {why}"):
        purify_shards(f"s3://{BUCKET}/{prefix}/", tmp_path / "out", tiny_ckpt, cfg(), progress=False)
    assert not list((tmp_path / "out").glob("part-001.tar*"))


def test_s3_errors_name_the_url(s3, tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match=rf"s3://{BUCKET}/in/nope.tar: no such shard"):
        purify_shards(f"s3://{BUCKET}/in/nope.tar", tmp_path / "o", tiny_ckpt, cfg(), progress=False)
    with pytest.raises(InputError, match=rf"s3://{BUCKET}/empty/: no .tar or .beton shards|no such shard"):
        purify_shards(f"s3://{BUCKET}/empty/", tmp_path / "o", tiny_ckpt, cfg(), progress=False)
    with pytest.raises(InputError, match="overlaps the input"):
        purify_shards(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/in/sub", tiny_ckpt, cfg(), progress=False)
    with pytest.raises(OutputError, match=r"s3://no-such-bucket/out/\.eclipse-stream\.lock: cannot write: "
                                          r"no such bucket"):
        purify_shards(f"s3://{BUCKET}/in/part-000.tar", "s3://no-such-bucket/out", tiny_ckpt, cfg(), progress=False)
    _, fs = s3
    assert not fs.exists("no-such-bucket")  # never created behind the user's back
    with pytest.raises(OutputError, match="cannot write to a pipe"):
        purify_shards(f"s3://{BUCKET}/in/part-000.tar", "pipe:cat > x.tar", tiny_ckpt, cfg(), progress=False)


def test_missing_credentials_are_a_clear_error(s3, tiny_ckpt, tmp_path):
    endpoint, _ = s3
    env = {k: v for k, v in cli_env().items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "scan", f"s3://{BUCKET}/in/",
                        "--storage-options", json.dumps({"endpoint_url": endpoint})],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: s3://{BUCKET}/in/: cannot list: no credentials found"), r.stderr
    assert "Traceback" not in r.stderr


# What s3fs raises for an AccessDenied answer (moto enforces no IAM, so the store's call is replaced): a
# PermissionError whose text carries a signed URL, as botocore and aiohttp messages can.
DENIED = ("Access Denied (https://127.0.0.1/eclipse-test/x?X-Amz-Credential=AKIAFAKEKEY%2F20261205"
          "&X-Amz-Signature=t0ps3cr3t)")
SECRETS = ("t0ps3cr3t", "AKIAFAKEKEY", FAKE_AWS["AWS_SECRET_ACCESS_KEY"])


def _deny(fs, monkeypatch, method: str, when=lambda *a, **kw: True):
    real = getattr(fs, method)

    def denied(*args, **kwargs):
        if when(*args, **kwargs):
            raise PermissionError(DENIED)  # as s3fs.errors.translate_boto_error builds it
        return real(*args, **kwargs)

    monkeypatch.setattr(fs, method, denied)  # the filesystem storage.py opens: fsspec keeps one per options


def _purify_cli(*args) -> tuple[int, str]:
    from click.testing import CliRunner

    from eclipse_stream.cli import main

    r = CliRunner().invoke(main, ["purify", *args, "--steps", "2", "--batch-size", "4", "--workers", "0", "-q"])
    return r.exit_code, r.output


@pytest.mark.parametrize("where", ["listing", "reading"])
def test_a_permission_error_on_an_input_is_named_and_leaves_nothing_partial(s3, tiny_ckpt, tmp_path, monkeypatch,
                                                                            where):
    endpoint, _ = s3
    fs, _ = storage.filesystem(f"s3://{BUCKET}/in/")
    if where == "listing":
        _deny(fs, monkeypatch, "ls")
        _deny(fs, monkeypatch, "info")
        url = f"s3://{BUCKET}/in/"
    else:  # the object's GET: the listing works, reading part-001 is refused
        _deny(fs, monkeypatch, "cat_file", lambda path, *a, **kw: path.endswith("part-001.tar"))
        url = f"s3://{BUCKET}/in/part-001.tar"
    out = tmp_path / "out"
    code, text = _purify_cli(f"s3://{BUCKET}/in/", str(out), "-d", str(tiny_ckpt))
    assert code == 2, text
    assert text.startswith(f"error: {url}: cannot {'list' if where == 'listing' else 'read'}: permission denied "
                           "(Access Denied (https://127.0.0.1/eclipse-test/x?...)"), text
    assert "check your credentials" in text and "Traceback" not in text
    assert not any(secret in text for secret in SECRETS)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if n.startswith(".") or n.startswith("part-001")], left  # nothing partial
    for name in left:  # what a run that stopped there did finish is complete: its stats file says so
        if name.endswith(".tar"):
            assert json.loads((out / f"{name}.stats.json").read_text())["output_size"] == (out / name).stat().st_size


@pytest.mark.parametrize("what", ["lock", "upload"])
def test_a_permission_error_on_the_output_is_named_and_leaves_no_object(s3, shard_dir, tiny_ckpt, monkeypatch, what):
    endpoint, fs_test = s3
    out = f"s3://{BUCKET}/out-denied-{what}"
    fs, _ = storage.filesystem(out)
    if what == "lock":  # no write permission at all under OUT
        _deny(fs, monkeypatch, "put_file")
        name, verb = ".eclipse-stream.lock", "write"
    else:  # the lock may be written, shard objects may not (a policy on *.tar)
        _deny(fs, monkeypatch, "put_file", lambda local, remote, **kw: remote.endswith(".tar"))
        name, verb = "part-000.tar", "upload"
    code, text = _purify_cli(str(shard_dir / "part-000.tar"), out, "-d", str(tiny_ckpt))
    assert code == 1, text
    assert text.startswith(f"error: {out}/{name}: cannot {verb}: permission denied (Access Denied "), text
    assert not any(secret in text for secret in SECRETS) and "Traceback" not in text
    fs_test.invalidate_cache()
    assert fs_test.find(f"{BUCKET}/out-denied-{what}") == []  # no shard, no stats, no manifest; the lock released
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"eclipse-stream-out-{os.getpid()}-*"))


def test_a_remote_out_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(s3, tiny_ckpt):
    _, fs = s3
    lock = f"{BUCKET}/out-lock/.eclipse-stream.lock"
    fs.pipe_file(lock, json.dumps({"pid": os.getpid(), "host": "elsewhere", "token": "x"}).encode())
    with pytest.raises(OutputError, match="output in use by PID .* on elsewhere"):
        purify_shards(f"s3://{BUCKET}/in/part-002.tar", f"s3://{BUCKET}/out-lock", tiny_ckpt, cfg(),
                      progress=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket
    fs.pipe_file(lock, json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}).encode())
    result = purify_shards(f"s3://{BUCKET}/in/part-002.tar", f"s3://{BUCKET}/out-lock", tiny_ckpt, cfg(),
                           progress=False)
    assert len(result.processed) == 1
    fs.invalidate_cache()
    assert not fs.exists(lock)  # released at the end


def test_sigkill_during_an_upload_then_a_rerun_gives_the_clean_outputs(s3, shard_dir, tiny_ckpt, reference):
    endpoint, fs = s3
    host, port = endpoint.rsplit("/", 1)[1].split(":")
    proxy = FreezingProxy((host, int(port)), trigger=f"PUT /{BUCKET}/out-kill/part-001.tar".encode(), after=2048)
    args = [sys.executable, "-m", "eclipse_stream.cli", "purify", f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out-kill",
            "-d", str(tiny_ckpt), "--t-star", "100", "--steps", "2", "--batch-size", "4", "--workers", "1", "-q"]
    env = {**cli_env(), **FAKE_AWS}
    proc = subprocess.Popen([*args, "--storage-options", json.dumps({"endpoint_url": proxy.url})], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proxy.frozen.wait(240), "the upload of part-001.tar never started"
        os.killpg(proc.pid, signal.SIGKILL)  # mid-upload: part of the body sent, the request never completes
        proc.wait(60)
    finally:
        proxy.close()
    left = s3_objects(fs, "out-kill")
    assert "part-001.tar" not in left and "manifest.json" not in left  # nothing under a final name unfinished
    assert left.get("part-000.tar", reference["part-000.tar"]) == reference["part-000.tar"]
    assert ".eclipse-stream.lock" in left  # the dead run's lock: taken over by the rerun on this host

    r = subprocess.run([*args, "--storage-options", json.dumps({"endpoint_url": endpoint})], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    objects = s3_objects(fs, "out-kill")
    assert sorted(objects) == sorted([*reference, *(f"{n}.stats.json" for n in reference), "manifest.json"])
    assert {k: v for k, v in objects.items() if k.endswith(".tar")} == reference
    import hashlib
    for name, data in reference.items():
        stats = json.loads(objects[f"{name}.stats.json"])
        assert stats["output_sha256"] == hashlib.sha256(data).hexdigest() and stats["output_size"] == len(data)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"eclipse-stream-out-{proc.pid}-*"))


def test_a_remote_beton_is_staged_once_and_gives_the_local_output(s3, cifar64, tiny_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("ffcv")
    from test_pipeline_beton import make_beton

    from eclipse_stream.formats import beton

    _, fs = s3
    (tmp_path / "in").mkdir()
    src = make_beton(tmp_path / "in" / "b.beton", [rgb_array(s["png"]) for s in cifar_samples(cifar64[:5])])
    fs.put_file(str(src), f"{BUCKET}/beton/b.beton")
    purify_shards(src, tmp_path / "local", tiny_ckpt, cfg(), progress=False)
    # The reader worker (another process) stages the shard; this process, which writes the output, fetches
    # only the head it takes the field layout from: never the whole shard a second time.
    staged, fetched = [], []
    real_staged, real_fetch = beton.staged, storage._Ranges._fetch
    monkeypatch.setattr(beton, "staged", lambda *a, **kw: staged.append(a) or real_staged(*a, **kw))
    monkeypatch.setattr(storage._Ranges, "_fetch", lambda self, n: fetched.append(real_fetch(self, n)) or fetched[-1])
    purify_shards(f"s3://{BUCKET}/beton/b.beton", tmp_path / "remote", tiny_ckpt, cfg(workers=1), progress=False)
    assert (tmp_path / "remote" / "b.beton").read_bytes() == (tmp_path / "local" / "b.beton").read_bytes()
    assert not staged and 0 < sum(map(len, fetched)) < src.stat().st_size / 10, (len(fetched), src.stat().st_size)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"eclipse-stream-stage-{os.getpid()}-*"))


# --- the README's examples, against the local servers -----------------------------------------------------------

def readme_examples() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- remote-examples", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("eclipse-stream ")]


def test_the_readme_examples_run_against_local_servers(s3, shard_dir, tiny_ckpt, tmp_path, monkeypatch):
    """README's https / pipe: / s3:// lines, run as written but for the host: data.example.org is the local
    http.server (plain http), my-bucket lives in the local moto server."""
    import shlex

    from click.testing import CliRunner

    from eclipse_stream.cli import main

    endpoint, fs = s3
    site = tmp_path / "site" / "cifar"
    site.mkdir(parents=True)
    fs.mkdir("my-bucket")
    for i, p in enumerate(sorted(shard_dir.glob("*.tar"))):
        shutil.copy(p, site / f"train-{i:06d}.tar")
        fs.put_file(str(p), f"my-bucket/cifar/train/train-{i:06d}.tar")
    purify_shards(site, tmp_path / "reference", tiny_ckpt, cfg(), progress=False)
    expected = tars(tmp_path / "reference")
    lines = readme_examples()
    assert [shlex.split(line)[2].split(":")[0] for line in lines] == ["https", "pipe", "s3"]
    settings = ["-d", str(tiny_ckpt), "--t-star", "100", "--steps", "2", "--batch-size", "4", "--workers", "0", "-q",
                "--storage-options", json.dumps({"endpoint_url": endpoint})]
    with http_server(tmp_path / "site") as base:
        for n, line in enumerate(lines):
            cwd = tmp_path / f"run{n}"
            cwd.mkdir()
            monkeypatch.chdir(cwd)
            args = shlex.split(line.replace("https://data.example.org", base))[1:]
            r = CliRunner().invoke(main, [*args, *settings])
            assert r.exit_code == 0, (line, r.output)
            if args[2].startswith("s3://"):
                got = {k: v for k, v in s3_objects(fs, "cifar/purified", "my-bucket").items() if k.endswith(".tar")}
            else:
                got = tars(cwd / "purified")
            assert got and got == {k: expected[k] for k in got}, line
    assert len(got) == 3
