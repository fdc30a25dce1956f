"""The pipeline's parts on their own, without a denoiser or DataLoader workers: bucketing, in-order writing,
the resume plan, the format registry, the typed events of one shard."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from eclipse_stream.assembly import OutputShard
from eclipse_stream.bucketing import Bucketer
from eclipse_stream.errors import InputError
from eclipse_stream.events import Batch, Item, Members, Rejected, ShardEnded, ShardFailed, ShardStarted
from eclipse_stream.finisher import finish_shard
from eclipse_stream.formats import FORMATS, Image, ReadPolicy, WritePolicy, format_for
from eclipse_stream.outdir import Task, plan, stat_record, stats_path
from eclipse_stream.reading import ReadSettings, read_shard
from helpers import cifar_samples, read_cifar, write_tar


class It:
    def __init__(self, index):
        self.index = index


def _rgb(h, w, v=0):
    return np.full((h, w, 3), v, np.uint8)


# --- bucketing ------------------------------------------------------------------------------------------------

def test_bucketer_groups_by_padded_size_and_emits_full_buckets():
    b = Bucketer(batch_size=2, multiple=32, max_batch_pixels=10**9, max_pending=100)
    assert list(b.add(It(0), _rgb(32, 32))) == []
    assert list(b.add(It(1), _rgb(20, 40))) == []  # pads to 32 x 64: another bucket
    (items, pixels), = b.add(It(2), _rgb(30, 31, 7))  # pads to 32 x 32: joins item 0, bucket full
    assert [i.index for i in items] == [0, 2] and tuple(pixels.shape) == (2, 3, 32, 32)
    assert pixels[1, :, 29:, 30:].eq(7).all()  # edge padding repeats the border
    (items, pixels), = b.flush()
    assert [i.index for i in items] == [1] and tuple(pixels.shape) == (1, 3, 32, 64)


def test_bucketer_bounds_pixels_and_pending_images_oldest_first():
    b = Bucketer(batch_size=100, multiple=32, max_batch_pixels=3 * 32 * 32, max_pending=100)
    out = [x for i in range(3) for x in b.add(It(i), _rgb(32, 32))]
    assert len(out) == 1 and len(out[0][0]) == 3  # the pixel bound, not the batch size
    b = Bucketer(batch_size=100, multiple=32, max_batch_pixels=10**9, max_pending=2)
    sizes = [(32, 32), (64, 64), (96, 96)]
    out = [x for i, (h, w) in enumerate(sizes) for x in b.add(It(i), _rgb(h, w))]
    assert [[i.index for i in items] for items, _ in out] == [[0]]  # over max_pending: the oldest bucket goes
    assert [[i.index for i in items] for items, _ in b.flush()] == [[1], [2]]


# --- in-order writing -------------------------------------------------------------------------------------------

class RecordingWriter:
    def __init__(self):
        self.steps, self.aborted = [], False

    def write_sample(self, key, fields):
        self.steps.append(("sample", key, dict(fields)))

    def write_members(self, members):
        self.steps.append(("members", len(members)))

    def finish(self, stop=None):
        return "sha"

    def abort(self):
        self.aborted = True


def _shard(tmp_path, writer):
    task = Task(0, str(tmp_path / "in.tar"), "in.tar")
    return OutputShard(task, format_for("x.tar"), writer, tmp_path / ".in.tar.partial-1", WritePolicy(), None)


def _item(index, key, field, parts, fields=None):
    return Item(index, index, key, Image(field, None), parts, (1, 1), fields)


def test_output_shard_writes_in_input_order_whatever_order_parts_arrive(tmp_path):
    w = RecordingWriter()
    shard = _shard(tmp_path, w)
    assert not shard.put_image(_item(2, "c", "png", 1, {"cls": b"2"}), b"C")  # waits for 0 and 1
    assert not shard.put_members(1, [("m", None)])
    assert not shard.put_image(_item(0, "a", "right.png", 2), b"R")  # second part first
    assert w.steps == []
    assert not shard.put_image(_item(0, "a", "left.png", 2, {"cls": b"0"}), b"L")
    assert [s[0] for s in w.steps] == ["sample", "members", "sample"]
    assert w.steps[0] == ("sample", "a", {"cls": b"0", "left.png": b"L", "right.png": b"R"})
    assert not shard.reject(3, 2, "d", "bad")
    assert shard.end(4) is True  # complete now, and only once
    assert shard.end(4) is False and shard.state == "finishing"
    assert shard.written == 2 and shard.rejects == [{"index": 2, "key": "d", "reason": "bad"}]


def test_output_shard_rejects_a_sample_whose_image_cannot_be_encoded_and_ignores_late_parts(tmp_path):
    w = RecordingWriter()
    shard = _shard(tmp_path, w)
    shard.put_image(_item(0, "a", "left.png", 2, {"cls": b"0"}), None, "too big")
    shard.put_image(_item(0, "a", "right.png", 2), b"R")
    assert w.steps == [] and shard.rejects == [{"index": 0, "key": "a", "reason": "field 'left.png': too big"}]
    shard.abort()
    assert w.aborted and shard.put_image(_item(1, "b", "png", 1, {}), b"B") is False


def test_finish_renames_then_writes_the_stats_file(tmp_path):
    src = write_tar(tmp_path / "in.tar", [{"__key__": "a", "cls": b"1"}])
    task = Task(0, str(src), "in.tar")
    out = tmp_path / "out"
    out.mkdir()
    fmt = format_for(src)
    shard = OutputShard.create(task, out, out / ".in.tar.partial-1", WritePolicy(), stat_record(os.stat(src)))
    shard.put_members(0, [])
    shard.end(1)
    stats = finish_shard(shard, {"k": 1}, rank=0)
    assert fmt is FORMATS[".tar"] and (out / "in.tar").is_file() and not (out / ".in.tar.partial-1").exists()
    assert stats["output_sha256"] == __import__("hashlib").sha256((out / "in.tar").read_bytes()).hexdigest()
    assert json.loads(stats_path(out / "in.tar").read_text())["config"] == {"k": 1}
    with tarfile.open(out / "in.tar") as tf:
        assert tf.getnames() == []


# --- the resume plan --------------------------------------------------------------------------------------------

def _done(out: Path, src: Path, config: dict, **over) -> None:
    st = stat_record(os.stat(src))
    (out / src.name).write_bytes(b"x")
    stats = {"config": config, "output": str(out / src.name), "input_size": st["size"],
             "input_mtime_ns": st["mtime_ns"], **over}
    stats_path(out / src.name).write_text(json.dumps(stats))


def test_plan_skips_done_shards_redoes_changed_or_missing_ones_and_refuses_other_settings(tmp_path):
    shards = []
    for name in ("a.tar", "b.tar", "c.tar", "d.tar"):
        shards.append(write_tar(tmp_path / name, [{"__key__": "k", "cls": name.encode()}]))
    out = tmp_path / "out"
    out.mkdir()
    _done(out, shards[0], {"s": 1})
    _done(out, shards[1], {"s": 1}, input_size=1)  # the input changed since
    _done(out, shards[2], {"s": 1})
    (out / "c.tar").unlink()  # the output was deleted since
    todo, done = plan(shards, out, {"s": 1}, overwrite=False)
    assert [t.name for t in todo] == ["b.tar", "c.tar", "d.tar"] and done == ["a.tar"]
    assert [t.name for t in plan(shards, out, {"s": 1}, overwrite=True)[0]] == ["a.tar", "b.tar", "c.tar", "d.tar"]
    with pytest.raises(InputError, match=r"a\.tar was purified with different settings \(s\)"):
        plan(shards, out, {"s": 2}, overwrite=False)
    with pytest.raises(InputError, match="share the output name"):
        plan([shards[0], tmp_path / "x" / "a.tar"], out, {"s": 1}, overwrite=False)


# --- formats and the reader's events ----------------------------------------------------------------------------

def test_formats_are_found_by_suffix():
    assert set(FORMATS) >= {".tar", ".beton"}
    assert format_for("x/y.beton") is FORMATS[".beton"]
    with pytest.raises(InputError, match="not a shard"):
        format_for("x.zip")


def test_read_shard_events_in_order(tmp_path):
    samples = cifar_samples(read_cifar(3), "png")
    samples[1]["png"] = b"garbage"
    src = write_tar(tmp_path / "s.tar", samples)
    settings = ReadSettings(ReadPolicy(), model_size=32, batch_size=2)
    events = list(read_shard(Task(0, str(src), "s.tar"), settings))
    kinds = [type(e) for e in events]
    assert kinds[0] is ShardStarted and kinds[-1] is ShardEnded and events[-1].count == 3
    assert Rejected in kinds and all(k in (ShardStarted, Batch, Rejected, Members, ShardEnded) for k in kinds)
    batches = [e for e in events if isinstance(e, Batch)]
    assert [i.key for b in batches for i in b.items] == [samples[0]["__key__"], samples[2]["__key__"]]
    assert {"cls", "json"} <= set(batches[0].items[0].fields) and "png" not in batches[0].items[0].fields
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[:1500])
    events = list(read_shard(Task(1, str(cut), "cut.tar"), settings))
    assert isinstance(events[-1], ShardFailed) and "tar" in events[-1].reason


def test_any_purifier_can_be_handed_to_purify_and_is_recorded(shard_dir, tmp_path, capsys):
    import torch

    from eclipse_stream.cli import run_purify
    from eclipse_stream.config import PurifyConfig
    from eclipse_stream.pipeline import purify_shards

    calls = []

    def invert(x, generator=None):
        calls.append(tuple(x.shape))
        assert x.dtype == torch.uint8 and isinstance(generator, torch.Generator)
        return 255 - x

    cfg = PurifyConfig(batch_size=4, workers=0, device="cpu")
    res = purify_shards(shard_dir / "part-001.tar", tmp_path / "o", cfg=cfg, purifier=invert, progress=False)
    assert calls and res.processed[0]["written"] == 10
    assert res.processed[0]["config"]["device_stage"].endswith("function")  # no fingerprint attribute: its type
    invert.fingerprint = "invert-v1"
    assert run_purify(shard_dir / "part-000.tar", tmp_path / "o2", cfg, purifier=invert, progress=False) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 12
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["config"]["device_stage"] == "invert-v1"


def test_bucketer_pads_as_numpy_edge_padding():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (int(rng.integers(1, 70)), int(rng.integers(1, 70)), 3), dtype=np.uint8)
              for _ in range(12)]
    b = Bucketer(batch_size=3, multiple=32, max_batch_pixels=10**9, max_pending=100)
    batches = [x for i, im in enumerate(images) for x in b.add(It(i), im)] + list(b.flush())
    assert sum(len(items) for items, _ in batches) == 12
    for items, pixels in batches:
        ph, pw = pixels.shape[2:]
        for item, got in zip(items, pixels):
            im = images[item.index]
            want = np.pad(im, ((0, ph - im.shape[0]), (0, pw - im.shape[1]), (0, 0)), mode="edge")
            assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


def test_shards_are_finished_on_the_finisher_thread_not_the_device_loop(shard_dir, tmp_path, monkeypatch):
    import threading

    from eclipse_stream import finisher
    from eclipse_stream.config import PurifyConfig
    from eclipse_stream.pipeline import purify_shards

    threads, real = [], finisher.finish_shard

    def spy(*a, **k):
        threads.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(finisher, "finish_shard", spy)
    cfg = PurifyConfig(batch_size=4, workers=0, device="cpu")
    purify_shards(shard_dir, tmp_path / "o", cfg=cfg, purifier=lambda x, generator=None: x, progress=False)
    assert threads == ["eclipse-finish"] * 3
