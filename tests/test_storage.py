"""Where shards live (storage.py): URL parsing, redaction, file:// outputs and inputs."""

import json
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
