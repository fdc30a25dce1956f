"""tools.prepare / tools.common: CIFAR-10 tars -> shards, sparse set, .beton, and the missing-data error."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tools.common import CLASSES, PROJECT_ROOT, ToolError, default_data_dir, read_json, read_split, resolve_data_dir
from tools.prepare import choose_sparse, prepare

DATA = default_data_dir()
PER_CLASS = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "clean"
    prepare(None, out, limit_per_class=PER_CLASS, shard_size=16, sparse_per_class=2)
    return out


def test_shards_keys_labels_and_layout(prepared):
    keys, images, labels = read_split(prepared / "train")
    assert images.shape == (10 * PER_CLASS, 32, 32, 3) and images.dtype == np.uint8
    assert keys[0] == "train-airplane-0000" and keys[-1] == f"train-truck-{PER_CLASS - 1:04d}"
    assert all(CLASSES[label] == key.split("-")[1] for key, label in zip(keys, labels))
    shards = sorted(p.name for p in (prepared / "train").glob("*.tar"))
    assert shards == [f"train-{i:06d}.tar" for i in range(4)]  # 60 images, 16 per shard
    manifest = read_json(prepared / "train" / "manifest.json")
    assert manifest["count"] == 60 and manifest["shard_size"] == 16
    test_keys, _, test_labels = read_split(prepared / "test")
    assert test_keys[0] == "test-airplane-0000" and np.bincount(test_labels).tolist() == [PER_CLASS] * 10


def test_pixels_are_the_decoded_jpeg(prepared):
    """Shards store the decoded JPEG pixels losslessly (the clean images of the protocol)."""
    from tools.common import decode_image

    with tarfile.open(DATA / "train.tar.gz", "r|gz") as tar:
        for member in tar:
            if member.name.endswith("airplane/0000.jpg"):
                expected = decode_image(tar.extractfile(member).read())
                break
    _, images, _ = read_split(prepared / "train")
    np.testing.assert_array_equal(images[0], expected)


def test_sparse_set_is_balanced_subset_of_train(prepared):
    keys, images, labels = read_split(prepared / "train")
    s_keys, s_images, s_labels = read_split(prepared / "sparse")
    assert np.bincount(s_labels).tolist() == [2] * 10
    index = {k: i for i, k in enumerate(keys)}
    for k, img in zip(s_keys, s_images):
        np.testing.assert_array_equal(images[index[k]], img)
    assert read_json(prepared / "sparse" / "manifest.json")["seed"] == 0


def test_choose_sparse_is_seeded_and_balanced():
    labels = np.repeat(np.arange(10), 5000)
    a, b = choose_sparse(labels, 200), choose_sparse(labels, 200)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 2000 and np.bincount(labels[a]).tolist() == [200] * 10
    assert not np.array_equal(a, choose_sparse(labels, 200, seed=1))


def test_beton_matches_shards(prepared):
    from tools.victim import load_labeled

    x_beton, y_beton = load_labeled(prepared / "train.beton")
    x_tar, y_tar = load_labeled(prepared / "train")
    np.testing.assert_array_equal(x_beton, x_tar)
    np.testing.assert_array_equal(y_beton, y_tar)


def test_default_data_dir_is_beside_project():
    assert default_data_dir() == PROJECT_ROOT.parent / "shared" / "data" / "cifar10"


def test_missing_data_dir_raises_naming_path(tmp_path):
    missing = tmp_path / "no-such-cifar"
    with pytest.raises(ToolError, match=str(missing)):
        resolve_data_dir(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolError, match="train.tar.gz"):
        resolve_data_dir(tmp_path / "empty")


def test_missing_data_dir_cli_exits_nonzero(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "tools.evaluate", "prepare", "--data-dir", str(missing),
                           "--out", str(tmp_path / "out")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not Path(tmp_path / "out").exists()


def test_reusing_splits_made_with_other_settings_is_refused(prepared):
    with pytest.raises(ToolError, match=r"prepared with other settings \(limit_per_class=6 there, 7 asked\)"):
        prepare(None, prepared, limit_per_class=PER_CLASS + 1, shard_size=16, sparse_per_class=2)
    assert prepare(None, prepared, limit_per_class=PER_CLASS, shard_size=16, sparse_per_class=2) == {}  # same: reused
