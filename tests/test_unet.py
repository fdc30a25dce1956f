import pytest
import torch

from eclipse_stream.unet import PRESETS, UNet, UNetConfig, preset_config


def test_paper_preset_parameter_count():
    n = UNet(preset_config("paper", 32)).num_parameters()
    assert abs(n - 52_500_000) <= 0.01 * 52_500_000
    assert n == 52_546_438  # the reference UNet's count (NOTES.md)


def test_small_preset_fits_budget():
    assert UNet(preset_config("small", 32)).num_parameters() <= 8_000_000


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_channel_mult_adapts_to_image_size(size):
    cfg = preset_config("paper", size)
    assert cfg.image_size == size and len(cfg.channel_mult) == {32: 4, 64: 4, 128: 5, 256: 6}[size]
    tiny = UNet(preset_config("tiny", size))
    out = tiny(torch.randn(1, 3, size, size), torch.tensor([10.0]))
    assert out.shape == (1, 6, size, size)


def test_fully_convolutional_on_other_sizes_and_clear_error():
    m = UNet(preset_config("tiny", 32)).eval()
    assert m(torch.randn(2, 3, 40, 24), torch.tensor([1.0, 2.0])).shape == (2, 6, 40, 24)
    with pytest.raises(ValueError, match="multiple of 4"):
        m(torch.randn(1, 3, 30, 32), torch.tensor([1.0]))


def test_output_layer_zero_initialised_and_config_validation():
    m = UNet(PRESETS["tiny"])
    assert m(torch.randn(1, 3, 32, 32), torch.tensor([3.0])).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="image size"):
        preset_config("tiny", 48)
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(model_channels=48)
    with pytest.raises(ValueError, match="unknown UNet config"):
        UNetConfig.from_dict({"image_size": 32, "bogus": 1})
