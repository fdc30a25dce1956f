import numpy as np
import pytest
import torch

from eclipse_stream.diffusion import DiffusionConfig, GaussianDiffusion, cosine_betas, purification_timesteps
from eclipse_stream.unet import UNet, preset_config


@pytest.fixture(scope="module")
def full():
    return GaussianDiffusion.from_config(DiffusionConfig(steps=4000))


def test_cosine_schedule_matches_paper_noise_level(full):
    assert full.betas.dtype == np.float64
    assert abs(full.alphas_cumprod[99] - 0.997513) < 1e-5
    # the noise std added at t* = 100 in [-1, 1] units (NOTES.md: 0.0499)
    assert abs(np.sqrt(1 - full.alphas_cumprod[99]) - 0.0499) < 5e-4
    assert np.all(np.diff(full.alphas_cumprod) < 0)
    assert cosine_betas(10).max() <= 0.999


def test_q_sample_mean_and_variance(full):
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 0.5)
    for t_idx in (99, 1999):
        t = torch.full((x0.shape[0],), t_idx)
        xt = full.q_sample(x0, t)
        abar = full.alphas_cumprod[t_idx]
        assert abs(xt.mean().item() - np.sqrt(abar) * 0.5) < 0.01
        assert abs(xt.var().item() - (1 - abar)) < 0.02 * (1 - abar) + 1e-4


def test_respaced_chain_keeps_alpha_bar_at_kept_steps(full):
    keep = purification_timesteps(100, 10)
    assert keep[-1] == 99 and keep[0] == 0 and len(keep) == 10
    spaced = full.respace(keep)
    assert spaced.num_timesteps == 10
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[keep], rtol=1e-12)
    assert list(spaced.timestep_map) == keep
    # the model sees the full chain's timestep, rescaled to 0..1000
    t = torch.tensor([9])
    assert spaced.model_timesteps(t).item() == pytest.approx(99 * 1000 / 4000)


def test_full_purification_chain_is_identity_respacing(full):
    keep = purification_timesteps(100, 100)
    assert keep == list(range(100))
    spaced = full.respace(keep)
    np.testing.assert_allclose(spaced.betas, full.betas[:100], rtol=1e-10)


class ConstModel(torch.nn.Module):
    """Outputs fixed eps and v so the reverse step can be checked by hand."""

    def __init__(self, eps, v):
        super().__init__()
        self.eps, self.v = eps, v

    def forward(self, x, t):
        return torch.cat([torch.full_like(x, self.eps), torch.full_like(x, self.v)], 1)


def test_p_sample_at_t0_returns_clipped_mean_without_noise(full):
    x = torch.full((2, 3, 4, 4), 0.9)
    t = torch.zeros(2, dtype=torch.long)
    model = ConstModel(eps=-1e4, v=0.0)  # drives the x0 estimate far above 1, so clipping matters
    out = full.p_mean_variance(model, x, t)
    assert out["pred_xstart"].max().item() == 1.0
    a = full.p_sample(model, x, t, noise=torch.randn_like(x) * 100)
    b = full.p_sample(model, x, t, noise=torch.zeros_like(x))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, out["mean"])
    # at t=0 the posterior mean of a clipped x0 = 1 is (almost) x0 itself
    assert (a - 1.0).abs().max().item() < 1e-3


def test_p_sample_learned_variance_interpolates(full):
    x = torch.zeros(1, 3, 2, 2)
    t = torch.tensor([50])
    lo = full.p_mean_variance(ConstModel(0.0, -1.0), x, t)["log_variance"]
    hi = full.p_mean_variance(ConstModel(0.0, 1.0), x, t)["log_variance"]
    assert lo.flatten()[0].item() == pytest.approx(full.posterior_log_variance_clipped[50], rel=1e-5)
    assert hi.flatten()[0].item() == pytest.approx(np.log(full.betas[50]), rel=1e-5)


def test_hybrid_loss_weights_and_stop_gradient(full):
    torch.manual_seed(0)
    model = UNet(preset_config("tiny", 32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = torch.tensor([5, 3000])
    losses = full.training_losses(model, x, t)
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"])
    # the vb term must not send gradient into the eps half of the output
    eps_out = {}
    model.out[2].register_forward_hook(lambda m, i, o: eps_out.setdefault("o", o))
    losses = full.training_losses(model, x, t)
    g = torch.autograd.grad(losses["vb"].sum(), eps_out["o"])[0]
    assert g[:, :3].abs().max().item() == 0.0 and g[:, 3:].abs().max().item() > 0.0


def test_training_loss_falls_on_tiny_set():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=100))
    model = UNet(preset_config("tiny", 32))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(1)
    t_eval = torch.randint(0, 100, (32,), generator=g)
    noise_eval = torch.randn(32, 3, 32, 32, generator=g)
    x_eval = x.repeat(8, 1, 1, 1)

    def eval_loss():
        with torch.no_grad():
            return diffusion.training_losses(model, x_eval, t_eval, noise_eval)["loss"].mean().item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        loss = diffusion.training_losses(model, x.repeat(4, 1, 1, 1), diffusion.sample_timesteps(16, "cpu"))
        opt.zero_grad()
        loss["loss"].mean().backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="steps"):
        purification_timesteps(100, 101)
    with pytest.raises(ValueError):
        GaussianDiffusion.from_config(DiffusionConfig(steps=10)).respace([20])
