"""Where shards live (storage.py): URL parsing, redaction, file:// outputs and inputs."""

import json
import os
import threading
from pathlib import Path

import pytest

from eclipse_stream.errors import InputError, OutputError
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import PurifierConfig
from eclipse_stream.storage import local_path, redact, scheme_of

FAST = PurifierConfig(t_star=100, steps=2)


def cfg(**kw):
    return PurifyConfig(**{"purifier": FAST, "batch_size": 4, "workers": 0, **kw})


def test_schemes_paths_and_urls():
    assert scheme_of("shards/a.tar") is None and scheme_of("/abs/a.tar") is None
    assert scheme_of("file:///x") == "file" and scheme_of("HTTPS://h/x") == "https"
    assert scheme_of("s3://b/k") == "s3" and scheme_of("pipe:cat a.tar") == "pipe"
    assert scheme_of("c:relative") is None  # not a URL: no '//'
    assert local_path("out") == "out" and local_path(Path("/a/b")) == "/a/b"
    assert local_path("file:///abs/out") == "/abs/out"
    assert local_path("file://localhost/abs/my%20out") == "/abs/my out"
    assert local_path("s3://bucket/out") is None and local_path("pipe:cat x.tar") is None
    with pytest.raises(OutputError, match="absolute local path"):
        local_path("file://otherhost/abs/out", output=True)
    assert local_path("file:/abs/out") == "/abs/out"
    with pytest.raises(InputError, match="absolute local path"):
        local_path("file:relative/out")


def test_redact_never_shows_credentials():
    assert redact("https://user:secret@host:8080/a/b.tar?X-Amz-Signature=abc") == "https://***@host:8080/a/b.tar?..."
    assert "secret" not in redact("s3://AKIA:secret@bucket/k.tar")
    assert redact("s3://Bucket/Key.tar") == "s3://Bucket/Key.tar"
    assert redact("pipe:cat a.tar") == "pipe:cat a.tar" and redact("/x/y.tar") == "/x/y.tar"


def test_a_file_url_output_is_that_folder_not_a_folder_named_file(shard_dir, tiny_ckpt, tmp_path, monkeypatch):
    """Issue 23: `purify in/ file:///abs/out` used to exit 0 and write into ./file:/abs/out."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "abs" / "out"
    result = purify_shards(shard_dir / "part-002.tar", f"file://{out}", tiny_ckpt, cfg(), progress=False)
    assert not result.failed and len(result.processed) == 1
    assert (out / "part-002.tar").is_file() and (out / "manifest.json").is_file()
    assert not (tmp_path / "file:").exists()
    stats = json.loads((out / "part-002.tar.stats.json").read_text())
    assert stats["output"] == str(out / "part-002.tar")
    # and a file:// input is the same local file: the rerun finds it done
    again = purify_shards(f"file://{shard_dir / 'part-002.tar'}", f"file://{out}", tiny_ckpt, cfg(), progress=False)
    assert again.skipped == ["part-002.tar"] and not again.processed


def test_a_file_url_output_over_the_input_is_refused(shard_dir, tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match="overlaps the input"):
        purify_shards(shard_dir, f"file://{shard_dir}", tiny_ckpt, cfg(), progress=False)


def test_a_missing_cloud_package_says_how_to_install_it(monkeypatch):
    import fsspec.core

    from eclipse_stream.sources import expand_shards

    def no_s3fs(url, **kw):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3fs)
    with pytest.raises(InputError, match=r"s3://b/k\.tar: s3:// needs a package .*eclipse-stream\[cloud\]"):
        expand_shards("s3://b/k.tar")


def test_storage_options_must_be_a_json_object(shard_dir, tmp_path):
    from click.testing import CliRunner

    from eclipse_stream.cli import main

    for bad, why in (("{nope", "not JSON"), ("[1, 2]", "must be a JSON object")):
        r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "--storage-options", bad])
        assert r.exit_code == 2 and why in r.output, r.output
    assert not (tmp_path / "o").exists()


# --- reading remote objects: identity from the listing, range requests, the read-ahead (fsspec's memory fs) ---

@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem (memory://), emptied after the test."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


def test_listing_identity_is_what_a_fresh_look_gives_and_readers_ask_nothing(memfs, monkeypatch):
    from eclipse_stream import storage

    for i in range(3):
        memfs.pipe_file(f"/ls/s-{i}.tar", bytes([i]) * (1000 + i))
    urls = storage.list_shards("memory://ls/", (".tar",))
    assert urls == [f"memory:///ls/s-{i}.tar" for i in range(3)]
    listed = [storage.identity(u, fresh=False) for u in urls]
    assert [d["size"] for d in listed] == [1000, 1001, 1002] and all("mtime" in d for d in listed)
    assert [storage.identity(u) for u in urls] == listed  # info and a listing agree (time as UTC text)

    asked = []
    monkeypatch.setattr(type(memfs), "info", lambda self, path, **kw: asked.append(path) or 1 / 0)
    assert storage.identity(urls[1], fresh=False) == listed[1]
    with storage.open_input(urls[1]) as f:  # its size is known: ranges only, no info
        assert f.read() == b"\1" * 1001
    assert not asked
    with pytest.raises(storage.RemoteError):  # fresh: it asks (and says why it failed)
        storage.identity(urls[1])
    assert asked == ["/ls/s-1.tar"]


def test_object_times_of_listings_and_heads_compare_equal():
    from datetime import datetime, timedelta, timezone

    from dateutil.tz import tzlocal

    from eclipse_stream.storage import _info_identity

    when = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    local = when.astimezone(tzlocal())
    plus2 = when.astimezone(timezone(timedelta(hours=2)))
    assert _info_identity({"size": 3, "LastModified": local}) == _info_identity({"size": 3, "LastModified": plus2}) \
        == _info_identity({"size": 3, "created": when.timestamp()}) == {"size": 3, "mtime": "2026-05-01T12:00:00+00:00"}
    assert _info_identity({"size": 3, "ETag": '"abc"', "LastModified": local}) == {"size": 3, "etag": '"abc"'}


def test_read_in_order_starts_the_next_object_within_its_memory_bound(memfs):
    from eclipse_stream import storage

    data = {i: bytes(range(256)) * (12_000 + 1000 * i) for i in range(3)}  # about 3 MiB each
    for i, d in data.items():
        memfs.pipe_file(f"/ra/s-{i}.tar", d)
    urls = storage.list_shards("memory://ra/", (".tar",))
    with storage.read_in_order(urls, read_ahead_mib=1):
        plan = storage._ORDER.plan
        first = storage.open_input(urls[0])
        assert list(plan.ahead) == [1]  # the next one is under way already
        ahead = plan.ahead[1]
        for _ in range(200):  # its thread fills its budget, then waits
            if ahead._held >= 1 << 19:
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.05)
        assert 0 < ahead._held <= 1 << 20 and ahead._thread.is_alive()
        assert first.read(10) == data[0][:10] and first.read() == data[0][10:]
        second = storage.open_input(urls[1])
        assert second is ahead and list(plan.ahead) == [2]
        assert second.read() == data[1]
        left = plan.ahead[2]
    assert storage._ORDER.plan is None and not left._thread.is_alive()  # never read: stopped at the end
    with storage.read_in_order(urls, read_ahead_mib=0):  # no thread: plain range reads of 8 MiB blocks
        f = storage.open_input(urls[2])
        assert isinstance(f, storage._Ranges) and f.read() == data[2]


def test_a_readers_plan_is_active_only_while_it_reads_and_is_closed_with_it(memfs, shard_dir):
    """With --workers 0 the reader generator shares the main thread: between its events the thread's
    open_input must not see its plan, and an abandoned reader stops what it started."""
    import io
    import tarfile

    from eclipse_stream import storage
    from eclipse_stream.events import ShardStarted
    from eclipse_stream.outdir import Task
    from eclipse_stream.reading import ReadSettings, ShardEvents

    for p in sorted(shard_dir.glob("*.tar")):  # each shard with 4 MiB more at its end: the read-ahead fills up
        buf = io.BytesIO()
        with tarfile.open(p) as src, tarfile.open(fileobj=buf, mode="w") as dst:
            for m in src:
                dst.addfile(m, src.extractfile(m))
            big = tarfile.TarInfo("zz-padding.bin")
            big.size = 4 << 20
            dst.addfile(big, io.BytesIO(bytes(big.size)))
        memfs.pipe_file(f"/plan/{p.name}", buf.getvalue())
    urls = storage.list_shards("memory://plan/", (".tar",))
    events = ShardEvents([Task(i, u, storage.shard_name(u)) for i, u in enumerate(urls)], ReadSettings.from_config(
        cfg(read_ahead_mib=1), None))
    it = iter(events)
    seen = [next(it) for _ in range(3)]
    assert isinstance(seen[0], ShardStarted)
    assert getattr(storage._ORDER, "plan", None) is None  # not active between events
    threads = [t for t in threading.enumerate() if t.name == "eclipse-read-ahead"]
    assert threads  # the shard being read and the next one
    it.close()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)


def test_a_failing_or_changing_object_is_a_remote_error_when_read(memfs):
    from eclipse_stream import storage

    memfs.pipe_file("/bad/a.tar", b"x" * 5000)
    memfs.pipe_file("/bad/b.tar", b"y" * 5000)
    urls = storage.list_shards("memory://bad/", (".tar",))
    memfs.rm_file("/bad/b.tar")
    with storage.read_in_order(urls):
        assert storage.open_input(urls[0]).read() == b"x" * 5000
        gone = storage.open_input(urls[1])  # opened in the background: the failure comes with the read
        with pytest.raises(storage.RemoteError, match="not found"):
            gone.read()
    memfs.pipe_file("/bad/b.tar", b"y" * 100)  # shorter than listed
    storage.list_shards("memory://bad/a.tar", (".tar",))
    storage._KNOWN["memory:///bad/b.tar"] = {"size": 5000, "mtime": "listed earlier"}
    with pytest.raises(storage.RemoteError, match="changed since it was listed: it ends at byte 100, not at 5000"):
        storage.open_input("memory:///bad/b.tar", read_ahead=False).read()
    storage._KNOWN["memory:///bad/b.tar"] = {"size": 60, "mtime": "listed earlier"}
    with pytest.raises(storage.RemoteError, match="changed since it was listed: it is longer than the 60 bytes"):
        storage.open_input("memory:///bad/b.tar").read()


# --- outputs that are local files only: scan's report/plot, train's checkpoint/state, preview's image ---------

LOCAL_ONLY = [
    ("scan", ["--report", "{url}"], "--report"),
    ("scan", ["--plot", "{url}"], "--plot"),
    ("train", ["--out", "{url}", "--iterations", "1", "--preset", "tiny"], "--out"),
    ("train", ["--out", "d.safetensors", "--state", "{url}", "--iterations", "1", "--preset", "tiny"], "--state"),
    ("preview", ["-o", "{url}"], "-o"),
]


@pytest.mark.parametrize("command,args,what", LOCAL_ONLY, ids=[f"{c} {w}" for c, _, w in LOCAL_ONLY])
@pytest.mark.parametrize("url", ["s3://bucket/out/x.png", "https://user:pw@host/x.png?sig=1", "pipe:cat > x.png",
                                 "gs:/bucket/x.png"])
def test_a_url_for_a_local_only_output_is_refused_by_name(command, args, what, url, shard_dir, tiny_ckpt, tmp_path,
                                                          monkeypatch):
    """These outputs are written on the local disk: a URL used to become a local folder named 's3:' (or
    'https:'); now it is a one-line error naming the option and the URL (no credentials), exit 2, nothing
    written."""
    from click.testing import CliRunner

    from eclipse_stream.cli import main

    monkeypatch.chdir(tmp_path)
    target = str(shard_dir / "part-000.tar") if command == "preview" else str(shard_dir)
    extra = ["-d", str(tiny_ckpt)] if command == "preview" else []
    r = CliRunner().invoke(main, [command, target, *[a.format(url=url) for a in args], *extra])
    assert r.exit_code == 2, r.output
    assert f"error: {what} " in r.output and "writes this file on the local disk, not to a URL" in r.output
    assert "pw" not in r.output and "sig=1" not in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_url_for_a_local_only_output_is_its_path(shard_dir, tiny_ckpt, tmp_path, monkeypatch):
    from eclipse_stream.outputs import check_output_files
    from eclipse_stream.preview import preview

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "grids" / "p.png"
    out.parent.mkdir()
    assert check_output_files({"--plot": f"file://{out}", "--report": None}, [shard_dir], "scan") == \
        {"--plot": str(out), "--report": None}
    with pytest.raises(InputError, match="absolute local path"):
        check_output_files({"-o": "file:relative.png"}, [shard_dir], "preview")
    with pytest.raises(InputError, match="overlaps the input"):  # the URL is checked as the path it names
        check_output_files({"-o": f"file://{shard_dir}/x.png"}, [shard_dir], "preview")
    assert preview(shard_dir / "part-000.tar", tiny_ckpt, f"file://{out}", n=2) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["grids"]


# --- an fsspec OUT whose uploads are not all-or-nothing: upload to a temporary name, then move ---------------

def _objects(fs, root: str) -> dict[str, bytes]:
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in sorted(fs.find(root))}


def test_a_non_atomic_store_gets_each_shard_through_a_temporary_name(memfs, shard_dir, tiny_ckpt, tmp_path,
                                                                     monkeypatch):
    """fsspec's memory:// is not one of the stores whose uploads are all-or-nothing: each shard is uploaded to
    .NAME.partial-PID and moved into place. The outputs are the local run's, nothing temporary is left; a
    failure between the upload and the move leaves no object under the final name (and removes the
    temporary one), and the rerun finishes the job with the same bytes."""
    from eclipse_stream.outstore import RemoteStore

    local = tmp_path / "local"
    purify_shards(shard_dir, local, tiny_ckpt, cfg(), progress=False)
    expected = {p.name: p.read_bytes() for p in sorted(local.glob("*.tar"))}
    store = RemoteStore("memory://out")
    assert not store.atomic_upload
    fs = store.fs
    store.close()

    moved, real_mv = [], fs.mv
    monkeypatch.setattr(fs, "mv", lambda a, b, **kw: moved.append((a, b)) or real_mv(a, b, **kw))
    result = purify_shards(shard_dir, "memory://out", tiny_ckpt, cfg(), progress=False)
    assert not result.failed and len(result.processed) == 3
    objects = _objects(fs, "/out")
    assert {k: v for k, v in objects.items() if k.endswith(".tar")} == expected
    assert sorted(objects) == sorted([*expected, *(f"{n}.stats.json" for n in expected), "manifest.json"])
    assert any(a.endswith(f"/.part-001.tar.partial-{os.getpid()}") and b == "/out/part-001.tar" for a, b in moved)

    def fail_on_part_001(a, b, **kw):
        if b.endswith("/part-001.tar"):
            assert fs.exists(a) and not fs.exists(b)  # uploaded whole under the temporary name
            raise OSError(5, "the store went away between the upload and the move")
        return real_mv(a, b, **kw)

    monkeypatch.setattr(fs, "mv", fail_on_part_001)
    with pytest.raises(OutputError, match=r"memory://failing/part-001\.tar: cannot upload: .*went away"):
        purify_shards(shard_dir, "memory://failing", tiny_ckpt, cfg(), progress=False)
    left = _objects(fs, "/failing")
    assert "part-001.tar" not in left and "part-001.tar.stats.json" not in left and "manifest.json" not in left
    assert not [k for k in left if "partial" in k]  # the temporary object was removed too
    assert left.get("part-000.tar", expected["part-000.tar"]) == expected["part-000.tar"]

    monkeypatch.setattr(fs, "mv", real_mv)
    again = purify_shards(shard_dir, "memory://failing", tiny_ckpt, cfg(), progress=False)
    assert not again.failed and "part-001.tar" in [s["shard"] for s in again.processed]
    assert {k: v for k, v in _objects(fs, "/failing").items() if k.endswith(".tar")} == expected


def test_a_leftover_temporary_object_of_a_killed_run_is_removed_by_the_rerun(memfs, shard_dir, tiny_ckpt):
    memfs.pipe_file("/kill/.part-002.tar.partial-999999999", b"half an upload")
    result = purify_shards(shard_dir / "part-002.tar", "memory://kill", tiny_ckpt, cfg(), progress=False)
    assert len(result.processed) == 1
    assert sorted(_objects(memfs, "/kill")) == ["manifest.json", "part-002.tar", "part-002.tar.stats.json"]
