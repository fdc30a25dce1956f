"""eclipse-stream preview: a grid of input / noised / purified / corrupted."""

import subprocess
import sys

import numpy as np
from PIL import Image

from helpers import cli_env


def test_preview_writes_grid_of_four_columns(shard_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "preview", str(shard_dir / "part-000.tar"),
                        "--denoiser", str(tiny_ckpt), "-o", str(out), "-n", "3", "--steps", "2"],
                       capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # 4 columns and 3 rows of 32x32 tiles with 2px padding, scaled 4x, plus a 16px header
    assert img.shape == (16 + 4 * (3 * 34 + 2), 4 * (4 * 34 + 2), 3)
    tile = lambda r, c: img[16 + 4 * (2 + 34 * r): 16 + 4 * (34 + 34 * r), 4 * (2 + 34 * c): 4 * (34 + 34 * c)]  # noqa
    assert np.abs(tile(0, 0) - tile(0, 1)).mean() > 1  # noised differs from input
    assert np.abs(tile(1, 2) - tile(1, 0)).mean() > 1  # purified differs from input
    assert not np.array_equal(tile(0, 0), tile(1, 0))  # rows are different samples


def test_preview_of_corrupt_shard_fails_cleanly(tmp_path, tiny_ckpt):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x01" * 1000)
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "preview", str(bad), "--denoiser",
                        str(tiny_ckpt), "-o", str(tmp_path / "g.png")], capture_output=True, text=True, env=cli_env())
    assert r.returncode != 0 and "bad.tar" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "g.png").exists()


def test_preview_with_a_missing_image_key_names_shard_and_sample(shard_dir, tiny_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "eclipse_stream.cli", "preview", str(shard_dir / "part-000.tar"),
                        "--denoiser", str(tiny_ckpt), "-o", str(tmp_path / "g.png"), "--image-key", "webp"],
                       capture_output=True, text=True, env=cli_env())
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "part-000.tar: sample '" in r.stderr and "no field 'webp'" in r.stderr
    assert not (tmp_path / "g.png").exists()
