"""The benchmark scripts: each --quick run works on a CPU; FLOP counting and the precision check hold."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eclipse_stream.unet import preset_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ sits beside the package, not inside it

from benchmarks import common  # noqa: E402
from benchmarks.bench_purifier import MAX_DIFF, precision_diff  # noqa: E402


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_quick(script: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", f"benchmarks.{script}", "--quick", "--threads", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.glob(f"{script}-cpu-*.json"))
    assert len(files) == 1, list(out.iterdir())
    assert files[0].with_suffix(".md").is_file()
    record = json.loads(files[0].read_text())
    env_rec = record["environment"]
    for key in ("device_name", "torch", "git_commit", "git_dirty", "timestamp", "cpu_model"):
        assert key in env_rec
    assert env_rec["device_kind"] == "cpu" and record["benchmark"] == script
    assert record["settings"]["quick"] is True
    for t in record["targets"]:
        assert t["status"] in ("PASS", "FAIL", "not-measured")
    return record


def test_bench_purifier_quick(tmp_path):
    r = run_quick("bench_purifier", tmp_path, "--device", "cpu", "--baseline")
    assert r["flops"][0]["gflops_per_forward"] > 0
    assert r["peak"][0]["tflops"] > 0
    assert {row["precision"] for row in r["results"]} == {"fp32", "bf16"}
    for row in r["results"] + r["baseline"]:
        assert row["images_per_s"] > 0
    assert all(row["speedup_vs_reference"] > 0 for row in r["results"])
    assert r["checks"] and all(c["pass"] and c["mean_abs_diff_255"] <= MAX_DIFF for c in r["checks"])
    # GPU targets are never given a CPU verdict
    assert [t["status"] for t in r["targets"][:3]] == ["not-measured"] * 3


def test_bench_end_to_end_quick(tmp_path):
    r = run_quick("bench_end_to_end", tmp_path, "--device", "cpu")
    (row,) = r["results"]
    assert row["images"] == 32
    assert row["alone_images_per_s"] > 0 and row["e2e_images_per_s"] > 0
    assert 0 < row["e2e_busy_fraction"] <= 1.01 and 0 < row["alone_busy_fraction"] <= 1.01


def test_bench_io_quick(tmp_path):
    r = run_quick("bench_io", tmp_path)
    assert [m["images"] for m in r["memory"]] == [80, 800]
    assert all(m["peak_tree_rss_mib"] > 0 for m in r["memory"])
    assert all(t["images"] == 800 and t["images_per_s"] > 0 for t in r["throughput"])


def test_bench_large_images_quick(tmp_path):
    r = run_quick("bench_large_images", tmp_path)
    rows = {(row["mode"], row["size"]): row for row in r["results"]}
    assert set(rows) == {("either (one tile)", 32), ("tiled", 224), ("native", 224)}
    assert all(row["pixels"] == 3 * 224 * 224 for (_, size), row in rows.items() if size == 224)
    assert all(row["us_per_pixel"] > 0 and row["peak_tree_rss_mib"] > 100 for row in rows.values())
    assert all(row["cpu_us_per_pixel"] > 0 for row in rows.values())
    assert {t["target"] for t in r["targets"]} == {"tiled 224 px: wall time per pixel / 32 px",
                                                   "tiled 224 px: CPU time per pixel / 32 px",
                                                   "tiled 224 px: peak tree RSS / 32 px (equal pixels)"}


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image (the bench extra) is missing")
def test_bench_tiles_quality_quick(tmp_path):
    r = run_quick("bench_tiles_quality", tmp_path, "--plot", str(tmp_path / "seams.png"))
    methods = {row["method"] for row in r["psnr"]}
    assert methods == {"native", "windows only", "independent 32 tiles", "tiled, 32 tiles", "tiled"}
    assert all(20 < row["psnr_db"] < 60 and row["noised_psnr_db"] < row["psnr_db"] for row in r["psnr"])
    assert {s["method"] for s in r["seams"]} == methods and (tmp_path / "seams.png").stat().st_size > 1000


def test_bench_train_quick(tmp_path):
    r = run_quick("bench_train", tmp_path, "--device", "cpu")
    assert {row["precision"] for row in r["results"]} == {"fp32", "bf16"}
    assert all(row["iters_per_s"] > 0 and row["gflops_per_iter"] > 0 for row in r["results"])


def test_flop_count_scales_with_pixels():
    cfg = preset_config("tiny", 32)
    f32, f64 = common.unet_forward_flops(cfg, 32), common.unet_forward_flops(cfg, 64)
    assert f32 > 0
    assert 3.5 < f64 / f32 < 4.5  # convolutions scale with pixels; attention a bit faster


def test_flop_count_of_paper_unet_matches_the_paper():
    assert common.unet_forward_flops(preset_config("paper", 32)) / 1e9 == pytest.approx(16.77, abs=0.01)


def test_bf16_output_close_to_fp32(one_thread):
    denoiser = common.make_denoiser("tiny")
    x = common.decode_uint8(common.read_cifar_jpegs(4), 4).float() / 255.0
    diff = precision_diff(denoiser, x, t_star=100, steps=3, precision="bf16")
    assert 0 < diff <= MAX_DIFF, f"bf16 vs fp32 mean |diff| = {diff:.4f} in 0..255 units"


def test_bench_remote_quick(tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    record = run_quick("bench_remote", tmp_path)
    rows = {r["path"]: r for r in record["reader"]}
    ahead, none = "S3 (moto, s3fs), read-ahead 16 MiB", "S3 (moto, s3fs), no read-ahead"
    assert rows["local disk"]["images"] == rows[ahead]["images"] == rows[none]["images"] == 200
    assert rows[ahead]["median_cpu_s"] > 0 and record["targets"][0]["measured"] > 0
    assert [r["path"] for r in record["raw_bytes"]] == ["local disk", "S3 (moto, s3fs)"]


def test_bench_scan_quick(tmp_path):
    r = run_quick("bench_scan", tmp_path)
    timing = {row["set"]: row for row in r["CLI time"]}
    assert timing["clean"]["exit_status"] in (0, 11) and timing["urp"]["exit_status"] == 10
    assert all(row["wall_s"] > 0 and row["images"] == 1000 for row in r["CLI time"])
    (mixed,) = r["Mixed sets"]
    assert mixed["family"] == "urp" and mixed["poisoned_shards"] == ["mixed-000001.tar"]
    assert mixed["poisoned_flagged"] == 1 and mixed["clean_flagged"] == 0 and mixed["exit_status"] == 10
