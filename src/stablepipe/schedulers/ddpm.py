"""DDPM: ancestral sampling of the learned reverse process (Ho et al. 2020)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import AlphaScheduler

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(AlphaScheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020, Alg. 2), with learned variances
    (Nichol & Dhariwal 2021) and custom timesteps."""

    accepts_custom_timesteps = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str | None = "fixed_small",  # None: fixed_small (as diffusers, from DPM-Solver configs)
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type is not None and variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {', '.join(VARIANCE_TYPES)}")
        self._init_alpha_schedule()
        self.variance_type = variance_type
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced timesteps (or a custom descending list) for `num_inference_steps` steps."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        if timesteps is not None:
            self._check_custom_timesteps(timesteps)
            self.custom_timesteps, values = True, np.array(timesteps, dtype=np.int64)
        else:
            self.custom_timesteps, values = False, self._integer_timesteps(num_inference_steps)
        self.num_inference_steps = len(values)
        self.timesteps = torch.from_numpy(values).to(device)

    def _variance(self, t, predicted_variance=None, variance_type: str | None = None):
        """Posterior variance β̃_t (Ho et al. 2020, Eq. 7) or its variants; `learned_range` interpolates
        log β̃_t and log β_t (Nichol & Dhariwal 2021, Eq. 15)."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self._alpha_prod(self.previous_timestep(t), self.one)
        current_beta = 1 - alpha_prod_t / alpha_prod_prev
        variance = torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod_t) * current_beta, min=1e-20)
        kind = variance_type or self.config.variance_type
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if kind == "fixed_large":
            return current_beta
        if kind == "fixed_large_log":
            return torch.log(current_beta)
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(current_beta) + (1 - frac) * torch.log(variance)
        return variance

    def _noise_term(self, t, predicted_variance, noise: torch.Tensor) -> torch.Tensor:
        """σ_t z, with σ_t from the variance type."""
        variance = self._variance(t, predicted_variance=predicted_variance)
        if self.variance_type == "fixed_small_log":
            return variance * noise
        if self.variance_type == "learned_range":
            return torch.exp(0.5 * variance) * noise
        return (variance**0.5) * noise

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """x_{t-1} ~ q(x_{t-1} | x_t, x₀): the posterior mean (Ho et al. 2020, Eq. 7) plus noise."""
        t, prev_t = timestep, self.previous_timestep(timestep)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        alpha_prod_t, alpha_prod_prev = self.alphas_cumprod[t], self._alpha_prod(prev_t, self.one)
        current_alpha = alpha_prod_t / alpha_prod_prev
        x0 = self._clip_x0(self._vp_denoiser(alpha_prod_t).combine(sample, model_output))
        x0_coeff = (alpha_prod_prev ** (0.5) * (1 - current_alpha)) / (1 - alpha_prod_t)
        sample_coeff = current_alpha ** (0.5) * (1 - alpha_prod_prev) / (1 - alpha_prod_t)
        prev_sample = x0_coeff * x0 + sample_coeff * sample
        if t > 0:
            noise = self._noise_like(model_output, generator)
            prev_sample = prev_sample + self._noise_term(t, predicted_variance, noise)
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
