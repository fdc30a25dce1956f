"""The impulse prefilter: isolated extreme pixels go, edges, lines and flat images stay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.prefilter import impulse_filter, impulse_filter_strips, impulse_mask
from eclipse_stream.purifier import Purifier, PurifierConfig


def _smooth_batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("pos", [(0, 0), (5, 7), (15, 15), (0, 9)])  # corners and borders too
def test_isolated_extreme_pixel_is_replaced_by_neighbour_median(pos):
    x = _smooth_batch()
    poisoned = x.clone()
    poisoned[1, :, pos[0], pos[1]] = torch.tensor([1.0, 0.0, 1.0])
    out = impulse_filter(poisoned)
    mask = impulse_mask(poisoned)
    assert mask[1, pos[0], pos[1]] and mask.sum() == 1
    assert (out[1, :, pos[0], pos[1]] - x[1, :, pos[0], pos[1]]).abs().max() < 0.1  # back near the smooth value
    changed = (out != poisoned).any(1)
    assert changed.sum() == 1  # nothing else touched


def test_edges_lines_and_small_deviations_pass_untouched():
    x = torch.zeros(1, 3, 16, 16)
    x[..., :, 8:] = 1.0          # a hard vertical edge
    x[..., 3, :] = 0.5           # a one-pixel-wide horizontal line
    x[..., 12, 4] = 0.2          # a small isolated deviation (below the threshold)
    assert torch.equal(impulse_filter(x), x)


def test_two_by_two_patch_is_not_an_impulse():
    """The documented limit: a perturbation of 2x2 pixels is not isolated and is left to the diffusion stage."""
    x = _smooth_batch(1)
    x[0, :, 4:6, 4:6] = 1.0
    x[0, 0, 4:6, 4:6] = 0.0
    assert not impulse_mask(x).any()


def test_clean_cifar_like_images_lose_almost_nothing():
    rng = np.random.default_rng(0)
    x = _smooth_batch(64, 32) + torch.from_numpy(rng.normal(0, 0.02, (64, 3, 32, 32)).astype(np.float32))
    x = x.clamp(0, 1)
    assert impulse_mask(x).float().mean() < 1e-3


def test_purifier_applies_the_prefilter_before_the_noise(tiny_ckpt):
    tiny_denoiser = load_denoiser(tiny_ckpt)
    x = _smooth_batch(2, 32)
    x[0, :, 10, 10] = torch.tensor([0.0, 1.0, 0.0])
    on = Purifier(tiny_denoiser, PurifierConfig(prefilter="impulse", steps=1))
    off = Purifier(tiny_denoiser, PurifierConfig(steps=1))
    g = torch.Generator().manual_seed(0)
    noised_on = on.noise_to_tstar(x * 2 - 1, torch.Generator().manual_seed(0))
    noised_off = off.noise_to_tstar(impulse_filter(x) * 2 - 1, g)
    assert torch.equal(noised_on, noised_off)


def test_config_rejects_unknown_prefilter_and_bad_threshold():
    with pytest.raises(ValueError, match="prefilter"):
        PurifierConfig(prefilter="median")
    with pytest.raises(ValueError, match="threshold"):
        PurifierConfig(impulse_threshold=0.0)


def test_recipes_name_settings_and_explicit_settings_win():
    from eclipse_stream.defaults import DEFAULT_RECIPE, RECIPES

    paper = PurifierConfig.from_recipe("paper")
    assert (paper.t_star, paper.steps, paper.prefilter) == (100, None, "none")  # the full chain, as published
    robust = PurifierConfig.from_recipe("robust", t_star=80)
    assert (robust.steps, robust.prefilter, robust.t_star) == (1, "impulse", 80)
    assert PurifierConfig.from_recipe("robust", steps=10, prefilter="none").steps == 10
    assert PurifierConfig.from_recipe("robust", prefilter="none").prefilter == "none"
    default = PurifierConfig()  # the dataclass defaults are the default recipe's: one source
    assert (default.t_star, default.steps, default.prefilter) == tuple(RECIPES[DEFAULT_RECIPE].values())
    assert default.t_star == 300  # robust: 300 since 2026-12-07 evening (200 before, 100 before that); paper: 100
    with pytest.raises(ValueError, match="recipe"):
        PurifierConfig.from_recipe("fancy")


def test_noise_like_images_are_left_alone_sparse_impulses_are_not():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 32, 32, generator=g)  # every pixel "isolated": texture, not a sparse poison
    assert torch.equal(impulse_filter(noise), noise) and not impulse_mask(noise).any()
    x = _smooth_batch(1, 32)
    for i in range(20):  # 20 of 1,024 pixels (< 2%): still sparse
        x[0, :, 1 + (i // 5) * 7, 1 + (i % 5) * 6] = torch.tensor([1.0, 0.0, 1.0])
    assert impulse_mask(x).sum() == 20


@pytest.mark.parametrize("fraction", [0.0, 0.005, 0.0199, 0.03])  # sparse, near the 2% limit, texture
def test_the_filter_in_strips_gives_the_same_values_bit_for_bit(fraction):
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 20, 17, generator=g), size=(203, 170), mode="bilinear")
    hit = torch.rand(2, 203, 170, generator=g) < fraction
    hit[0, :, 0] = hit[0, 0, :] = fraction > 0  # borders and strip edges too (strips of 11 or 12 rows here)
    x = torch.where(hit[:, None], torch.randint(0, 2, x.shape, generator=g).float(), x)
    whole = impulse_filter(x)
    assert torch.equal(impulse_filter_strips(x, strip_pixels=2000), whole)
    y = x.clone()
    assert impulse_filter_strips(y, strip_pixels=2000, inplace=True) is y and torch.equal(y, whole)
    assert (whole != x).any() == (0 < fraction < 0.02)
