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


def test_deblur_stage_removes_a_known_class_blur(tiny_ckpt):
    """With the class's true kernel, the deblur stage leaves a small part of a CUDA-style blur."""
    import functools

    from eclipse_stream.deblur import ClassKernels, ClasswiseDeblur
    from tools.poisons.cuda import class_kernels, convolve

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:32, 0:32]
    base = (60 + 120 * ((yy // 6 + xx // 5) % 2))[..., None].repeat(3, -1)  # sharp edges: a blur shows
    clean = np.clip(base[None] * rng.uniform(0.6, 1.0, (4, 1, 1, 1)), 0, 255).astype(np.uint8)
    labels = np.zeros(4, dtype=np.int64)
    k = class_kernels(1, seed=0, blur_parameter=0.3)
    poisoned = convolve(clean, k, labels)
    # CUDA divides by each image's maximum: scale back so only the blur is left to undo
    scale = clean.reshape(4, -1).max(1) / poisoned.reshape(4, -1).max(1)
    poisoned = np.clip(poisoned * scale[:, None, None, None], 0, 255).astype(np.uint8)
    kern = (k[0, 0, 0] / k[0, 0, 0].sum()).tolist()
    deblur = functools.partial(ClasswiseDeblur(ClassKernels(kernels={"0": kern})), labels=[0] * 4)
    res = residuals(clean, poisoned, load_denoiser(tiny_ckpt), deblur=deblur)
    stored = res["stored"].flatten(1).norm(dim=1).mean()
    assert res["deblur"].flatten(1).norm(dim=1).mean() < 0.25 * stored
    assert set(res) == {"stored", "impulse", "purified", "impulse+purified", "deblur", "deblur+impulse+purified"}
