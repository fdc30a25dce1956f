import numpy as np
import torch

from helpers import read_cifar, rgb_array
from tools.denoiser_quality import measure, psnr


def test_psnr_definition():
    x = torch.rand(2, 3, 8, 8)
    assert psnr(x, x) > 90
    y = (x + 1 / 255).clamp(0, 1)
    assert 45 < psnr(x, y) < 50  # one 8-bit level everywhere is about 48 dB


def test_measure_reports_both_psnrs(tiny_ckpt):
    images = np.stack([rgb_array(jpg) for _, _, jpg in read_cifar(4, split="test")])
    r = measure(str(tiny_ckpt), images, t_star=100, steps=2, batch_size=2, device=torch.device("cpu"))
    assert r["images"] == 4 and r["steps"] == 2
    # t* = 100 on T = 4000 adds noise of std ~0.05 in [-1, 1] units, i.e. roughly 32 dB
    assert 28 < r["psnr_noised_db"] < 36 and r["psnr_purified_db"] > 10
