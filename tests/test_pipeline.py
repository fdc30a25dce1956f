"""eclipse-stream purify over WebDataset tars: round trip, determinism, resume, bad input."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cifar_samples, cli_env, rgb_array, tar_members, write_tar
from PIL import Image

from eclipse_stream.errors import SampleError, ShardError
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import PurifierConfig

# bounded-change checks: the impulse filter may replace a pixel outright
FAST = PurifierConfig(t_star=100, steps=2, prefilter="none")


def cfg(**kw):
    base = {"purifier": FAST, "batch_size": 4, "workers": 0}
    base.update(kw)
    return PurifyConfig(**base)


def outputs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_round_trip_keeps_keys_fields_order_and_bounds_change(shard_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    result = purify_shards(shard_dir, out, tiny_ckpt, cfg(), progress=False)
    assert not result.failed and len(result.processed) == 3
    for shard in sorted(shard_dir.glob("*.tar")):
        src, dst = tar_members(shard), tar_members(out / shard.name)
        src_d, dst_d = dict(src), dict(dst)
        assert set(src_d) == set(dst_d)
        keys_in = list(dict.fromkeys(n.split(".")[0] for n, _ in src))
        keys_out = list(dict.fromkeys(n.split(".")[0] for n, _ in dst))
        assert keys_in == keys_out
        for name, data in src_d.items():
            if name.endswith((".cls", ".json")):
                assert dst_d[name] == data, name
            else:
                a, b = rgb_array(data).astype(int), rgb_array(dst_d[name]).astype(int)
                assert a.shape == b.shape
                diff = np.abs(a - b)
                assert 0 < diff.mean() < 20 and diff.max() < 128, (name, diff.mean(), diff.max())
        stats = json.loads((out / (shard.name + ".stats.json")).read_text())
        assert stats["samples_in"] == stats["written"] + stats["rejected"] == len(keys_in)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 30 and len(manifest["shards"]) == 3


def test_png_stays_lossless_png_and_jpg_stays_jpg(shard_dir, tiny_ckpt, tmp_path):
    purify_shards(shard_dir / "part-001.tar", tmp_path / "o", tiny_ckpt, cfg(), progress=False)
    names = [n for n, _ in tar_members(tmp_path / "o" / "part-001.tar")]
    assert any(n.endswith(".jpg") for n in names) and not any(n.endswith(".png") for n in names)
    data = dict(tar_members(tmp_path / "o" / "part-001.tar"))
    img = Image.open(io.BytesIO(next(v for k, v in data.items() if k.endswith(".jpg"))))
    assert img.format == "JPEG"


def test_deterministic_whatever_workers_and_order_of_runs(shard_dir, tiny_ckpt, tmp_path):
    purify_shards(shard_dir, tmp_path / "a", tiny_ckpt, cfg(workers=0), progress=False)
    purify_shards(shard_dir, tmp_path / "b", tiny_ckpt, cfg(workers=2, encode_threads=3), progress=False)
    purify_shards(shard_dir / "part-001.tar", tmp_path / "c", tiny_ckpt, cfg(workers=1), progress=False)
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert a == b
    assert outputs(tmp_path / "c")["part-001.tar"] == a["part-001.tar"]
    purify_shards(shard_dir, tmp_path / "d", tiny_ckpt, cfg(seed=1), progress=False)
    assert outputs(tmp_path / "d") != a


def test_rerun_skips_done_shards_redoes_missing_and_refuses_other_settings(shard_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    purify_shards(shard_dir, out, tiny_ckpt, cfg(), progress=False)
    first = outputs(out)
    (out / "part-001.tar").unlink()
    (out / "manifest.json").unlink()
    again = purify_shards(shard_dir, out, tiny_ckpt, cfg(), progress=False)
    assert [s["shard"] for s in again.processed] == ["part-001.tar"]
    assert sorted(again.skipped) == ["part-000.tar", "part-002.tar"]
    assert outputs(out) == first and (out / "manifest.json").is_file()
    with pytest.raises(Exception, match="different settings"):
        purify_shards(shard_dir, out, tiny_ckpt, cfg(seed=5), progress=False)
    redo = purify_shards(shard_dir, out, tiny_ckpt, cfg(seed=5, overwrite=True), progress=False)
    assert len(redo.processed) == 3 and outputs(out) != first


def _bad_samples(good):
    """One good sample then one of each kind of odd or broken image."""
    def enc(img, fmt):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    base = Image.fromarray(rgb_array(good[0]["png"]))
    trunc = good[1]["png"][: len(good[1]["png"]) // 2]
    return [
        good[0],
        {"__key__": "zero", "png": b"", "cls": b"1"},
        {"__key__": "garbage", "png": b"this is not an image", "cls": b"1"},
        {"__key__": "truncated", "png": trunc, "cls": b"1"},
        {"__key__": "gray", "png": enc(base.convert("L"), "PNG"), "cls": b"2"},
        {"__key__": "rgba", "png": enc(base.convert("RGBA"), "PNG"), "cls": b"3"},
        {"__key__": "cmyk", "jpg": enc(base.convert("CMYK"), "JPEG"), "cls": b"4"},
        {"__key__": "sixteen", "png": enc(Image.fromarray(np.full((32, 32), 4000, np.uint16)), "PNG"), "cls": b"5"},
        {"__key__": "float", "png": enc(Image.fromarray(np.full((32, 32), 0.5, np.float32)), "TIFF"), "cls": b"5"},
        {"__key__": "huge", "png": enc(Image.new("RGB", (200, 200), (9, 9, 9)), "PNG"), "cls": b"6"},
        {"__key__": "noimage", "txt": b"hello", "cls": b"7"},
    ]


def test_skip_records_every_bad_sample_with_reason(cifar64, tiny_ckpt, tmp_path):
    good = cifar_samples(cifar64[:2])
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "bad.tar", _bad_samples(good))
    out = tmp_path / "out"
    res = purify_shards(tmp_path / "in", out, tiny_ckpt, cfg(on_error="skip", max_pixels=10_000), progress=False)
    stats = res.processed[0]
    reasons = {r["key"]: r["reason"] for r in stats["rejects"]}
    assert set(reasons) == {"zero", "garbage", "truncated", "float", "huge", "noimage"}
    assert "empty" in reasons["zero"] and "32-bit" in reasons["float"] and "over the limit" in reasons["huge"]
    assert "truncated" in reasons["truncated"] and "no image field" in reasons["noimage"]
    assert stats["samples_in"] == 11 and stats["written"] == 5 and stats["rejected"] == 6
    # a 16-bit PNG is read as 8-bit, written, and recorded (issue 21 section 5)
    assert stats["converted"] == [{"index": 7, "key": "sixteen", "field": "png",
                                   "how": "16-bit PNG (gray) read as 8-bit"}]
    data = dict(tar_members(out / "bad.tar"))
    assert Image.open(io.BytesIO(data["sixteen.png"])).mode == "L"
    assert Image.open(io.BytesIO(data["gray.png"])).mode == "L"
    rgba = Image.open(io.BytesIO(data["rgba.png"]))
    assert rgba.mode == "RGBA" and np.all(np.asarray(rgba)[..., 3] == 255)
    assert Image.open(io.BytesIO(data["cmyk.jpg"])).mode == "RGB"
    assert "zero.cls" not in data and data["gray.cls"] == b"2"


def test_fail_stops_naming_shard_and_key_and_leaves_nothing(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "bad.tar", _bad_samples(cifar_samples(cifar64[:2])))
    out = tmp_path / "out"
    with pytest.raises(SampleError, match=r"bad\.tar: sample 'zero': empty image field"):
        purify_shards(tmp_path / "in", out, tiny_ckpt, cfg(), progress=False)
    assert not out.exists()  # nothing written, and the OUT this run made is removed again


def test_truncated_and_corrupt_tars(shard_dir, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    data = (shard_dir / "part-000.tar").read_bytes()
    (tmp_path / "in" / "a-trunc.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "in" / "b-garbage.tar").write_bytes(b"\x00garbage" * 200)
    (tmp_path / "in" / "c-empty.tar").write_bytes(b"")
    (tmp_path / "in" / "d-good.tar").write_bytes((shard_dir / "part-002.tar").read_bytes())
    with pytest.raises(ShardError, match=r"a-trunc\.tar.*\(after sample '[^']+'\)") as caught:
        purify_shards(tmp_path / "in", tmp_path / "o1", tiny_ckpt, cfg(), progress=False)
    assert " @ <" not in str(caught.value)  # webdataset's stream repr is dropped; the path is named once
    assert not list((tmp_path / "o1").glob("*.tar")) and not list((tmp_path / "o1").glob(".*"))
    res = purify_shards(tmp_path / "in", tmp_path / "o2", tiny_ckpt, cfg(on_error="skip"), progress=False)
    assert sorted(f["shard"] for f in res.failed) == ["a-trunc.tar", "b-garbage.tar", "c-empty.tar"]
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["d-good.tar", "d-good.tar.stats.json"]
    assert res.manifest is None


def test_cli_exit_codes_and_messages(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "bad.tar", _bad_samples(cifar_samples(cifar64[:2])))
    args = [sys.executable, "-m", "eclipse_stream.cli", "purify", str(tmp_path / "in"), str(tmp_path / "out"),
            "--denoiser", str(tiny_ckpt), "--steps", "2", "--workers", "0", "-q"]
    r = subprocess.run(args, capture_output=True, text=True, env=cli_env())
    assert r.returncode != 0 and "bad.tar: sample 'zero'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(args + ["--on-error", "skip", "--max-pixels", "10000"], capture_output=True, text=True,
                       env=cli_env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rejected"] == 6
    r = subprocess.run(args[:4] + [str(tmp_path / "nothing"), str(tmp_path / "o"), "-d", str(tiny_ckpt)],
                       capture_output=True, text=True, env=cli_env())
    assert r.returncode != 0 and "nothing" in r.stderr


def _many_shards(cifar64, d: Path, n: int = 8) -> Path:
    d.mkdir()
    for i in range(n):
        write_tar(d / f"s-{i:03d}.tar", cifar_samples(cifar64[i * 6:(i + 1) * 6]))
    return d


def test_sigkill_then_resume_gives_identical_output(cifar64, tiny_ckpt, tmp_path):
    src = _many_shards(cifar64, tmp_path / "in")
    base = [sys.executable, "-m", "eclipse_stream.cli", "purify", str(src), "--denoiser", str(tiny_ckpt),
            "--steps", "12", "--batch-size", "2", "--workers", "1", "-q"]
    subprocess.run(base[:5] + [str(tmp_path / "ref")] + base[5:], check=True, env=cli_env(), capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(base[:5] + [str(out)] + base[5:], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.stats.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("*.stats.json")))
    assert 2 <= done_before < 8 and not (out / "manifest.json").exists()
    r = subprocess.run(base[:5] + [str(out)] + base[5:], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["already_done"] == done_before
    assert outputs(out) == outputs(tmp_path / "ref")
    assert not list(out.glob(".*partial*"))


def test_torchrun_two_processes_match_single_process(cifar64, tiny_ckpt, tmp_path):
    src = _many_shards(cifar64, tmp_path / "in", n=5)
    # --device cpu: the gloo path this test is about, also on a machine with one GPU (rank 1 has no cuda:1)
    common = ["purify", str(src), "OUT", "--denoiser", str(tiny_ckpt), "--steps", "2", "--workers", "0", "-q",
              "--device", "cpu"]
    single = [a.replace("OUT", str(tmp_path / "one")) for a in common]
    subprocess.run([sys.executable, "-m", "eclipse_stream.cli", *single], check=True, env=cli_env(),
                   capture_output=True)
    multi = [a.replace("OUT", str(tmp_path / "two")) for a in common]
    # --standalone: torchrun picks a free port, so a busy fixed port cannot fail the run
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "eclipse_stream.cli", *multi], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    ranks = {json.loads(p.read_text())["rank"] for p in (tmp_path / "two").glob("*.stats.json")}
    assert ranks == {0, 1}
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["totals"]["written"] == 30


def _sized_samples(cifar64):
    """Real CIFAR images resized to assorted sizes (as ImageNet-like sets have), as jpg and png."""
    sizes = [(48, 40), (33, 65), (100, 60), (48, 40), (32, 32), (17, 90)]
    out = []
    for i, ((w, h), (name, label, jpg)) in enumerate(zip(sizes, cifar64)):
        img = Image.open(io.BytesIO(jpg)).convert("RGB").resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        fmt = "png" if i % 2 else "jpg"
        img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
        out.append({"__key__": f"{i}-{name}", fmt: buf.getvalue(), "cls": str(label).encode()})
    return out


@pytest.mark.parametrize("resolution", ["native", "model"])
def test_mixed_sizes_keep_aspect_ratio(cifar64, tiny_ckpt, tmp_path, resolution):
    (tmp_path / "in").mkdir()
    samples = _sized_samples(cifar64)
    write_tar(tmp_path / "in" / "mixed.tar", samples)
    res = purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, cfg(resolution=resolution, batch_size=2),
                        progress=False)
    assert res.processed[0]["written"] == len(samples)
    data = dict(tar_members(tmp_path / "out" / "mixed.tar"))
    for s in samples:
        ext = "png" if "png" in s else "jpg"
        w, h = Image.open(io.BytesIO(s[ext])).size
        ow, oh = Image.open(io.BytesIO(data[f"{s['__key__']}.{ext}"])).size
        if resolution == "native":
            assert (ow, oh) == (w, h)
        else:
            assert min(ow, oh) == 32 and abs(ow / oh - w / h) < 0.05 * (w / h)
        assert data[f"{s['__key__']}.cls"] == s["cls"]


def test_every_image_field_is_purified_unless_image_key_names_them(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    samples = [{**s, "jpg": jpg} for s, (_, _, jpg) in zip(cifar_samples(cifar64[:3]), cifar64[:3])]
    write_tar(tmp_path / "in" / "two.tar", samples)
    purify_shards(tmp_path / "in", tmp_path / "auto", tiny_ckpt, cfg(), progress=False)
    purify_shards(tmp_path / "in", tmp_path / "png", tiny_ckpt, cfg(image_key="png"), progress=False)
    auto, png = dict(tar_members(tmp_path / "auto" / "two.tar")), dict(tar_members(tmp_path / "png" / "two.tar"))
    for s in samples:
        k = s["__key__"]
        assert auto[f"{k}.png"] != s["png"] and auto[f"{k}.jpg"] != s["jpg"]  # no image is left unpurified
        assert png[f"{k}.jpg"] == s["jpg"] and png[f"{k}.png"] != s["png"]  # --image-key: only the named ones
    with pytest.raises(SampleError, match="webp"):
        purify_shards(tmp_path / "in", tmp_path / "none", tiny_ckpt, cfg(image_key="webp"), progress=False)


def test_a_pattern_that_matches_nothing_is_an_error_even_beside_real_shards(shard_dir):
    from eclipse_stream.errors import InputError
    from eclipse_stream.sources import expand_shards

    with pytest.raises(InputError, match=r"part-9\*\.tar: no files match this pattern"):
        expand_shards([shard_dir / "part-000.tar", str(shard_dir / "part-9*.tar")])
    assert len(expand_shards([str(shard_dir / "part-00*.tar")])) >= 1


def test_in_memory_denoisers_are_told_apart_on_resume(shard_dir, tmp_path):
    from helpers import make_denoiser

    from eclipse_stream.checkpoint import load_denoiser
    from eclipse_stream.errors import InputError

    a = load_denoiser(make_denoiser(tmp_path / "a.safetensors", seed=0))
    b = load_denoiser(make_denoiser(tmp_path / "b.safetensors", seed=1))
    a.sha256 = b.sha256 = None  # as built in memory, with no file behind them
    purify_shards(shard_dir / "part-000.tar", tmp_path / "out", a, cfg(), progress=False)
    with pytest.raises(InputError, match="different settings .*checkpoint_sha256"):
        purify_shards(shard_dir / "part-000.tar", tmp_path / "out", b, cfg(), progress=False)
    assert purify_shards(shard_dir / "part-000.tar", tmp_path / "out", a, cfg(), progress=False).skipped


def test_a_bad_checkpoint_leaves_no_output_folder(shard_dir, tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tiny_ckpt.read_bytes()[:5000])
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "purify", str(shard_dir), str(tmp_path / "out"),
                        "-d", str(bad), "-q"], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 3 and "bad.safetensors: not a readable safetensors checkpoint" in r.stderr
    assert not (tmp_path / "out").exists()


def test_compile_is_recorded_and_refused_for_a_custom_purifier(shard_dir, tiny_ckpt, tmp_path):
    """--compile may round differently from eager, so a shard records it and a resume must agree."""
    out = tmp_path / "out"
    purify_shards(shard_dir / "part-000.tar", out, tiny_ckpt, cfg(compile=True), progress=False)
    stats = json.loads((out / "part-000.tar.stats.json").read_text())
    assert '"compile": true' in json.dumps(stats)
    eager = tmp_path / "eager"
    purify_shards(shard_dir / "part-000.tar", eager, tiny_ckpt, cfg(), progress=False)
    a, b = tar_members(out / "part-000.tar"), tar_members(eager / "part-000.tar")
    assert [n for n, _ in a] == [n for n, _ in b]  # same keys and fields, in order
    with pytest.raises(Exception, match="different settings"):
        purify_shards(shard_dir / "part-000.tar", out, tiny_ckpt, cfg(), progress=False)
    with pytest.raises(ValueError, match="your own purifier"):
        purify_shards(shard_dir / "part-000.tar", tmp_path / "c", None, cfg(compile=True),
                      purifier=lambda x, generator=None: x, progress=False)
