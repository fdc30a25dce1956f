"""tools.stages: what is left of a perturbation after each stage (same noise for clean and poisoned)."""

import numpy as np

from eclipse_stream.checkpoint import load_denoiser
from tools.stages import residuals


def test_one_pixel_shortcut_is_gone_after_the_impulse_stage_but_not_without_it(tiny_ckpt):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    base = (96 + 40 * np.sin(yy / 5.0)[..., None] + 30 * np.cos(xx / 7.0)[..., None]).repeat(3, -1)
    clean = np.clip(base[None] + rng.normal(0, 2, (4, 32, 32, 3)), 0, 255).astype(np.uint8)
    poisoned = clean.copy()
    poisoned[:, 7, 20] = (255, 0, 255)
    res = residuals(clean, poisoned, load_denoiser(tiny_ckpt))
    assert res["stored"].abs().amax() > 0.5
    assert res["impulse"].abs().amax() < 0.05           # the filter alone removes it
    assert res["impulse+purified"].abs().amax() < 0.05  # and it stays removed through purification
    assert res["purified"].abs().amax() > 0.2           # the paper's recipe leaves much of it
