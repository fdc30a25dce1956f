"""Output bytes do not change: purify the committed inputs and compare with the committed outputs, byte for byte.

The fixtures in tests/golden were made by ``tests/golden/make_golden.py`` with the code before the pipeline
redesign (commit 98ffd19): tars with png/jpg/gif/tiff/webp fields, two images in one sample, odd and private
fields, a rejected sample, loose members and several image sizes; raw and jpg ``.beton`` files (ffcv writes
the same bytes for the same samples, so they are compared as bytes too); the default recipe and
``--recipe paper --steps 2``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

import make_golden  # noqa: E402

HAVE_FFCV = importlib.util.find_spec("ffcv") is not None


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("golden")
    inputs = make_golden.unpack(GOLDEN / "in", tmp / "in")
    if not HAVE_FFCV:
        for p in inputs.glob("*.beton"):
            p.unlink()
    make_golden.run_settings(inputs, tmp, tiny_ckpt)
    return tmp


@pytest.mark.parametrize("setting", sorted(make_golden.SETTINGS))
@pytest.mark.parametrize("shard", ["a.tar", "b.tar", "c-raw.beton", "c-jpg.beton"])
def test_output_bytes_are_those_of_the_reference(golden_run, tmp_path, setting, shard):
    if shard.endswith(".beton") and not HAVE_FFCV:
        pytest.skip("ffcv is not installed")
    expected = make_golden.unpack(GOLDEN / f"out-{setting}", tmp_path)
    got = (golden_run / f"out-{setting}" / shard).read_bytes()
    assert got == (expected / shard).read_bytes(), f"{setting}/{shard} differs from the reference output"
