"""Improved-DDPM Gaussian diffusion: the noise schedule and everything computed from it.

One class, :class:`GaussianDiffusion`, owns a schedule (computed in float64) and the
operations on it: ``q_sample`` (forward noising), ``p_mean_variance`` / ``p_sample``
(one reverse step with learned variance) and ``training_losses`` (the hybrid loss
L_simple + lambda * L_vlb of Nichol & Dhariwal 2021). :meth:`GaussianDiffusion.respace`
returns a diffusion over a subset of the timesteps whose cumulative alpha at every kept
step equals the full chain's, so a timestep always names the same noise level.

Conventions: images live in [-1, 1]; timesteps ``t`` are integer indices 0..T-1 into
the (possibly respaced) chain; the model sees ``timestep_map[t] * 1000 / T_full``
(improved-diffusion's ``rescale_timesteps``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["DiffusionConfig", "GaussianDiffusion", "cosine_betas", "purification_timesteps"]

SCHEDULES = ("cosine", "linear")
MAX_STEPS = 100_000  # T: the paper uses 4,000; a schedule is a few float64 arrays of T entries


@dataclass(frozen=True)
class DiffusionConfig:
    """What defines a schedule; stored in every checkpoint."""

    schedule: str = "cosine"
    steps: int = 4000
    vlb_weight: float = 0.001  # lambda in L_hybrid = L_simple + lambda * L_vlb

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 2 <= self.steps <= MAX_STEPS:
            raise ValueError(f"diffusion steps must be an integer in 2..{MAX_STEPS}, got {self.steps!r}")
        if not (isinstance(self.vlb_weight, (int, float)) and math.isfinite(self.vlb_weight) and self.vlb_weight >= 0):
            raise ValueError(f"vlb_weight must be a finite number >= 0, got {self.vlb_weight!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), float64."""
    t = np.arange(steps + 1, dtype=np.float64) / steps
    abar = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def linear_betas(steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, scaled so that any T covers the same range."""
    scale = 1000.0 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


def purification_timesteps(t_star: int, steps: int) -> list[int]:
    """Kept timesteps (0-based, on the full grid) for a reverse chain from t* with ``steps`` calls.

    The highest kept index is always ``t_star - 1``, so the chain starts from exactly
    the noise level of the full chain; index 0 is always kept so the chain ends clean.
    """
    if t_star < 1:
        raise ValueError(f"t_star must be >= 1, got {t_star}")
    if not 1 <= steps <= t_star:
        raise ValueError(f"steps must be between 1 and t_star={t_star}, got {steps}")
    if steps == 1:
        return [t_star - 1]
    kept = np.round(np.linspace(0, t_star - 1, steps)).astype(int)
    return sorted({int(k) for k in kept})


def _extract(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather per-batch coefficients ``arr[t]`` and shape them to broadcast over an image batch."""
    out = arr.to(t.device)[t]
    return out.reshape(out.shape + (1,) * (ndim - 1))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised to 256 bins."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class GaussianDiffusion:
    """A discrete diffusion chain with epsilon prediction and learned-range variance.

    ``betas`` are float64. ``timestep_map[i]`` is the index on the full chain of step ``i``
    of this chain (identity unless respaced); ``full_steps`` is the full chain's T.
    """

    def __init__(self, betas: np.ndarray, *, timestep_map: np.ndarray | None = None,
                 full_steps: int | None = None, config: DiffusionConfig | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.full_steps = full_steps or self.num_timesteps
        self.timestep_map = (np.arange(self.num_timesteps) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        self.config = config or DiffusionConfig(steps=self.full_steps)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - acp) / (1.0 - ac)
        # posterior variance is 0 at t=0; clip the log as improved-diffusion does (a one-step
        # chain has no t=1 to borrow from: use beta_0, the variance's upper bound)
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        coefs = {
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
            "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
            "log_betas": np.log(betas),
            "model_timesteps": self.timestep_map * (1000.0 / self.full_steps),
        }
        # float32 copies for the math on image tensors; the float64 arrays stay the reference
        self._coef = {k: torch.from_numpy(v.astype(np.float32)) for k, v in coefs.items()}
        self._coef_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> GaussianDiffusion:
        betas = cosine_betas(config.steps) if config.schedule == "cosine" else linear_betas(config.steps)
        return cls(betas, config=config)

    def respace(self, use_timesteps) -> GaussianDiffusion:
        """A chain over ``use_timesteps`` (indices into this chain) with the same alpha-bar there."""
        keep = sorted({int(t) for t in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps to keep must lie in [0, {self.num_timesteps - 1}]")
        new_betas, last = [], 1.0
        for i in keep:
            new_betas.append(1.0 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        return GaussianDiffusion(np.array(new_betas), timestep_map=self.timestep_map[keep],
                                 full_steps=self.full_steps, config=self.config)

    def coef(self, name: str, device: torch.device | str) -> torch.Tensor:
        """A float32 coefficient table, cached on ``device`` (so a sampling loop copies nothing)."""
        device = torch.device(device)
        cache = self._coef_cache.setdefault(device, {})
        if name not in cache:
            cache[name] = self._coef[name].to(device)
        return cache[name]

    def _c(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return _extract(self.coef(name, t.device), t, ndim)

    # -- forward process ----------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._c("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
                + self._c("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self._c("posterior_mean_coef1", t, x_t.ndim) * x_start
                + self._c("posterior_mean_coef2", t, x_t.ndim) * x_t)
        log_var = self._c("posterior_log_variance_clipped", t, x_t.ndim)
        return mean, log_var

    # -- reverse process ----------------------------------------------------------------

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the network sees for chain index ``t``: the full-chain index rescaled to 0..1000."""
        return self.coef("model_timesteps", t.device)[t]

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Split a 2C-channel output into eps and the variance interpolation v; return (eps, log_var)."""
        c = x_t.shape[1]
        if model_output.shape[1] != 2 * c:
            raise ValueError(f"model must output {2 * c} channels (eps and v), got {model_output.shape[1]}")
        eps, v = model_output.float().split(c, dim=1)
        min_log = self._c("posterior_log_variance_clipped", t, x_t.ndim)
        max_log = self._c("log_betas", t, x_t.ndim)
        frac = (v + 1) / 2
        return eps, frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        model_output: torch.Tensor | None = None):
        """Mean and log-variance of p(x_{t-1} | x_t), with the x_0 estimate clipped to [-1, 1]."""
        if model_output is None:
            model_output = model(x_t, self.model_timesteps(t))
        eps, log_var = self.split_output(model_output, x_t, t)
        x_t = x_t.float()
        pred_x0 = (self._c("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
                   - self._c("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_x0, "eps": eps}

    def p_sample(self, model, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 clip_denoised: bool = True) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1}; no noise is added where t == 0."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        if noise is None:
            noise = torch.randn_like(out["mean"])
        nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    # -- training -----------------------------------------------------------------------

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example hybrid loss: mse(eps) + lambda * T * L_t (L_vlb sampled uniformly).

        ``L_vlb = sum_t L_t = T * E_t[L_t]`` so ``lambda * L_vlb`` becomes ``lambda * T * L_t``
        for a uniformly drawn t (improved-diffusion's RESCALED_MSE with lambda = 1/1000).
        The vlb term sees the predicted mean through a stop-gradient: it trains only v.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t))
        c = x_start.shape[1]
        eps, v = model_output.float().split(c, dim=1)
        mse = (noise - eps).pow(2).flatten(1).mean(1)
        frozen = torch.cat([eps.detach(), v], dim=1)
        vb = self._vb_terms_bpd(x_start, x_t, t, frozen)
        vb = vb * (self.config.vlb_weight * self.num_timesteps)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb_terms_bpd(self, x_start, x_t, t, model_output):
        true_mean, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=False, model_output=model_output)
        kl = _normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None,
                         high: int | None = None):
        """Uniform training timesteps in [0, high) (default: the whole chain, [0, T))."""
        return torch.randint(0, high or self.num_timesteps, (batch,), device=device, generator=generator)
