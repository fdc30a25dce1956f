"""The Purifier module and corruption compensation."""

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.corruption import (DEFAULT_JPEG_CHROMA, DEFAULT_JPEG_QUALITY, DEFAULT_LOWFREQ_SIGMA,
                                      RandomCorruption, corrupt, corrupt_samples)
from eclipse_stream.jpegsim import jpeg_quantize
from eclipse_stream.purifier import Purifier, PurifierConfig


@pytest.fixture(scope="module")
def den(tiny_ckpt):
    return load_denoiser(tiny_ckpt)


def count_calls(purifier):
    calls = []
    h = purifier.model.register_forward_hook(lambda m, i, o: calls.append(i[1].clone()))
    return calls, h


@pytest.mark.parametrize("steps,expected", [(None, 100), (10, 10), (1, 1)])
def test_number_of_model_calls_and_timesteps(den, steps, expected):
    p = Purifier(den, PurifierConfig(t_star=100, steps=steps))
    calls, h = count_calls(p)
    p(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    h.remove()
    assert len(calls) == expected
    # the first call always sees t* - 1 = 99 on the full 4000-step grid (model scale 0..1000)
    assert calls[0][0].item() == pytest.approx(99 * 1000 / 4000)
    assert calls[-1][0].item() == pytest.approx(0.0 if expected > 1 else 99 * 1000 / 4000)


def test_dtypes_sizes_and_bounded_change(den):
    p = Purifier(den, steps=4)
    x = torch.randint(0, 256, (3, 3, 36, 20), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    y = p(x, generator=g)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    d = (y.int() - x.int()).abs().float()
    assert 0 < d.mean() < 20
    f = p(x.float() / 255, generator=torch.Generator().manual_seed(0))
    assert f.dtype == torch.float32 and f.min() >= 0 and f.max() <= 1
    assert (f * 255).round().to(torch.uint8).equal(y)
    with pytest.raises(ValueError, match="RGB batch"):
        p(torch.zeros(2, 1, 32, 32))


def test_same_generator_same_output_and_seed_matters(den):
    p = Purifier(den, steps=3)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    a = p(x, generator=torch.Generator().manual_seed(1))
    b = p(x, generator=torch.Generator().manual_seed(1))
    c = p(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_close_to_fp32_from_same_noise(den):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fp32 = Purifier(den, steps=10)(x.float() / 255, generator=torch.Generator().manual_seed(0))
    bf16 = Purifier(den, steps=10, precision="bf16")(x.float() / 255, generator=torch.Generator().manual_seed(0))
    assert (fp32 - bf16).abs().mean().item() * 255 <= 1.0


def test_t_star_above_checkpoint_T_is_refused(den):
    with pytest.raises(ValueError, match="exceeds"):
        Purifier(den, t_star=5000)


def test_corruption_definition():
    """The paper's corruption (lowfreq_sigma=0, jpeg_quality=None): grayscale with probability p, then white noise."""
    torch.manual_seed(0)
    x = torch.rand(400, 3, 8, 8)
    assert torch.equal(corrupt(x, p=0.0, sigma=0.0, lowfreq_sigma=0.0, jpeg_quality=None), x)
    gray = corrupt(x, p=1.0, sigma=0.0, lowfreq_sigma=0.0, jpeg_quality=None)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(gray[:, 0], luma, atol=1e-3)
    mid = torch.full((200, 3, 16, 16), 0.5)
    noisy = corrupt(mid, p=0.0, sigma=0.05, lowfreq_sigma=0.0, jpeg_quality=None)
    assert abs((noisy - mid).std().item() - 0.05) < 0.002
    out = corrupt(x, p=0.4, sigma=0.0, lowfreq_sigma=0.0, jpeg_quality=None)
    frac_gray = (out[:, 0] == out[:, 1]).all(-1).all(-1).float().mean().item()
    assert 0.3 < frac_gray < 0.5


def test_lowfreq_noise_is_smooth_and_survives_patch_averaging():
    """The low-frequency term moves 8x8 patches together (white noise of the same std averages to ~1/8 of it
    over a patch), and with lowfreq_sigma=0 the corruption draws exactly the paper's random numbers."""
    mid = torch.full((300, 3, 32, 32), 0.5)
    smooth = corrupt(mid, p=0.0, sigma=0.0, lowfreq_sigma=0.05) - mid
    white = corrupt(mid, p=0.0, sigma=0.05, lowfreq_sigma=0.0, jpeg_quality=None) - mid
    patch = torch.nn.functional.avg_pool2d
    assert patch(smooth, 8).std() > 0.025 > 0.01 > patch(white, 8).std()
    step = (smooth[..., 1:] - smooth[..., :-1]).abs().mean()  # neighbours agree (white noise: ~1.1x its mean)
    assert step < 0.25 * smooth.abs().mean()
    assert smooth[:, 0].sub(smooth[:, 1]).abs().mean() > 0.01  # each channel has its own field (colour)
    x = torch.rand(8, 3, 32, 32)
    paper = corrupt(x, 0.4, 0.05, torch.Generator().manual_seed(3), lowfreq_sigma=0.0, jpeg_quality=None)
    g = torch.Generator().manual_seed(3)
    gray = torch.rand(8, generator=g) < 0.4
    want = torch.where(gray[:, None, None, None], x.mul(torch.tensor([0.2989, 0.587, 0.114])[:, None, None])
                       .sum(1, keepdim=True).expand_as(x), x) + 0.05 * torch.randn(x.shape, generator=g)
    assert torch.allclose(paper, want.clamp(0, 1), atol=1e-3)
    default = RandomCorruption()
    assert default.lowfreq_sigma == DEFAULT_LOWFREQ_SIGMA > 0 and "lowfreq_sigma" in repr(default)
    with pytest.raises(ValueError, match="low-frequency"):
        RandomCorruption(lowfreq_sigma=-0.1)


def test_jpeg_term_quantizes_first_at_a_seeded_quality_per_image():
    """jpeg_quality=(lo, hi): each image is JPEG-quantized (jpegsim) at a quality drawn from [lo, hi] before the
    grayscale and noise; the draw comes from the generator, so a seed repeats it; None draws nothing."""
    x = torch.rand(6, 3, 16, 16)
    only = corrupt(x, p=0.0, sigma=0.0, lowfreq_sigma=0.0, jpeg_quality=(10, 10))
    assert torch.equal(only, jpeg_quantize(x, 10, chroma=DEFAULT_JPEG_CHROMA))
    g = torch.Generator().manual_seed(4)
    ranged = corrupt(x, 0.0, 0.0, torch.Generator().manual_seed(4), lowfreq_sigma=0.0, jpeg_quality=(5, 60))
    assert torch.equal(ranged, jpeg_quantize(x, torch.randint(5, 61, (6,), generator=g), chroma=DEFAULT_JPEG_CHROMA))
    full = [corrupt(x, 0.4, 0.05, torch.Generator().manual_seed(1), 0.05, (10, 50)) for _ in range(2)]
    assert torch.equal(*full)
    default = RandomCorruption()
    assert default.jpeg_quality == DEFAULT_JPEG_QUALITY == (10, 50) and "jpeg_quality" in repr(default)
    assert default.jpeg_chroma is DEFAULT_JPEG_CHROMA is False  # luma only, since 2026-12-08
    assert RandomCorruption(jpeg_quality=[20, 30]).jpeg_quality == (20, 30)
    for bad in ((0, 10), (50, 10), (10, 101), (10.5, 20), 10):
        with pytest.raises(ValueError, match="JPEG quality"):
            RandomCorruption(jpeg_quality=bad)
    samples = [{"__key__": "k", "png": Image.new("RGB", (16, 16), (200, 10, 10))}]
    with pytest.raises(ValueError, match="JPEG quality"):
        list(wds.DataPipeline(lambda: iter(samples), corrupt_samples(jpeg_quality=(0, 5))))
    out = list(wds.DataPipeline(lambda: iter(samples), corrupt_samples(p=0.0, sigma=0.0, lowfreq_sigma=0.0,
                                                                      jpeg_quality=[30, 30], seed=0)))
    assert out[0]["png"].size == (16, 16)


def test_jpeg_term_on_luma_only_keeps_the_colour_and_draws_the_same_numbers():
    """jpeg_chroma=False: the JPEG term quantizes luma alone (jpegsim's chroma=False) at the same seeded quality
    draw, in every entry point (corrupt, RandomCorruption, corrupt_samples); the default is DEFAULT_JPEG_CHROMA."""
    x = torch.rand(6, 3, 16, 16)
    only = corrupt(x, p=0.0, sigma=0.0, lowfreq_sigma=0.0, jpeg_quality=(10, 10), jpeg_chroma=False)
    assert torch.equal(only, jpeg_quantize(x, 10, chroma=False)) and not torch.equal(only, jpeg_quantize(x, 10))
    g = torch.Generator().manual_seed(4)
    ranged = corrupt(x, 0.0, 0.0, torch.Generator().manual_seed(4), 0.0, (5, 60), jpeg_chroma=False)
    assert torch.equal(ranged, jpeg_quantize(x, torch.randint(5, 61, (6,), generator=g), chroma=False))
    # the rest of the corruption draws the same numbers with either JPEG term: only the JPEG step differs
    a = corrupt(x, 0.4, 0.05, torch.Generator().manual_seed(1), 0.05, (10, 50), jpeg_chroma=False)
    b = corrupt(x, 0.4, 0.05, torch.Generator().manual_seed(1), 0.05, (10, 50), jpeg_chroma=True)
    assert a.shape == b.shape and not torch.equal(a, b)
    module = RandomCorruption(jpeg_chroma=False, generator=torch.Generator().manual_seed(1), jpeg_quality=(10, 50))
    assert torch.equal(module(x), a) and "jpeg_chroma=False" in repr(module)
    assert RandomCorruption().jpeg_chroma is DEFAULT_JPEG_CHROMA
    with pytest.raises(ValueError, match="jpeg_chroma"):
        RandomCorruption(jpeg_chroma="no")
    samples = [{"__key__": "k", "png": Image.new("RGB", (16, 16), (200, 10, 10))}]
    stage = corrupt_samples(p=0.0, sigma=0.0, lowfreq_sigma=0.0, jpeg_quality=(10, 10), jpeg_chroma=False, seed=0)
    red = np.asarray(list(wds.DataPipeline(lambda: iter(samples), stage))[0]["png"]).astype(int)
    assert np.abs(red - [200, 10, 10]).max() <= 2  # a flat red block keeps its colour (a JPEG's chroma would not)


def test_random_corruption_module_draws_fresh_and_keeps_dtype():
    m = RandomCorruption()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    a, b = m(x), m(x)
    assert a.dtype == torch.uint8 and not torch.equal(a, b)
    assert m(x.float() / 255).dtype == torch.float32


def test_corrupt_samples_stage_in_webdataset_pipeline():
    from PIL import Image

    samples = [{"__key__": f"k{i}", "png": Image.new("RGB", (8, 8), (200, 10, 10)), "cls": i} for i in range(5)]
    stage = corrupt_samples(p=1.0, sigma=0.0, seed=0, lowfreq_sigma=0.0, jpeg_quality=None)
    out = list(wds.DataPipeline(lambda: iter(samples), stage))
    assert [s["__key__"] for s in out] == [f"k{i}" for i in range(5)] and [s["cls"] for s in out] == list(range(5))
    arr = np.asarray(out[0]["png"])
    assert (arr[..., 0] == arr[..., 1]).all()


def test_purify_is_noise_to_tstar_then_denoise(den):
    # what preview and tools.denoiser_quality rely on to show/measure the image that is then denoised
    p = Purifier(den, steps=3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    whole = p.purify(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    split = p.denoise(p.noise_to_tstar(x, g), g)
    assert torch.equal(split, whole)
    assert not torch.equal(p.denoise(p.noise_to_tstar(x, g), g), whole)  # a later draw is another image


def test_compiled_denoiser_matches_eager_and_adds_no_parameters(den):
    """purify --compile: the chain calls torch.compile's UNet; same noise, same images up to rounding."""
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    eager = Purifier(den, steps=2, prefilter="none")
    keys = sorted(eager.state_dict())
    a = eager(x, generator=torch.Generator().manual_seed(3))
    compiled = Purifier(den, steps=2, prefilter="none").compile_denoiser()
    assert sorted(compiled.state_dict()) == keys  # the compiled module is not registered as a second copy
    b = compiled(x, generator=torch.Generator().manual_seed(3))
    assert b.dtype == torch.uint8 and b.shape == x.shape
    assert (a.int() - b.int()).abs().max().item() <= 1
    calls = []
    h = compiled._compiled[0].register_forward_hook(lambda m, i, o: calls.append(1))
    compiled(x, generator=torch.Generator().manual_seed(3))
    h.remove()
    assert len(calls) == 2  # the chain really goes through the compiled module
