import numpy as np
import pytest
import torch
from helpers import read_cifar, rgb_array

from eclipse_stream.purifier import PurifierConfig
from tools.pixel_rounding import compare, purify_float


def test_compare_counts_the_pixels_rounding_moves_up():
    levels = torch.tensor([0.2, 0.7, 1.4, 254.6, 255.0], dtype=torch.float64)
    r = compare(levels / 255)
    assert r["pixels"] == 5
    assert r["share_differ"] == r["share_differ_by_one"] == pytest.approx(0.4)  # 0.7 -> 1 / 0, 254.6 -> 255 / 254
    assert r["mean_difference_levels"] == pytest.approx(0.4) and r["max_abs_difference_levels"] == 1
    assert r["mean_error_truncated_levels"] == pytest.approx(-(0.2 + 0.7 + 0.4 + 0.6) / 5)
    assert r["mean_error_rounded_levels"] == pytest.approx((-0.2 + 0.3 - 0.4 + 0.4) / 5)
    assert r["share_outside_0_1"] == 0


def test_purify_float_is_the_purifiers_output_before_rounding(tiny_ckpt):
    images = np.stack([rgb_array(jpg) for _, _, jpg in read_cifar(3, split="test")])
    out = purify_float(str(tiny_ckpt), images, PurifierConfig(steps=1), batch_size=2, device=torch.device("cpu"))
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    assert 0 < compare(out)["share_differ"] < 1
