"""DDIM: the non-Markovian deterministic (η = 0) to ancestral (η = 1) sampler (Song et al. 2021)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import AlphaScheduler
from stablepipe.schedulers.denoiser import vp_noise_scalings


class DDIMScheduler(AlphaScheduler):
    """Denoising diffusion implicit models (Song et al. 2021, Eq. 12), with η, clipping and thresholding.

    As in diffusers, the previous timestep is always t − T // N, whatever the spacing.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_alpha_schedule()
        # ᾱ "before" the first training step: 1 (a clean image) or ᾱ_0.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced integer timesteps for `num_inference_steps` steps."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(self._integer_timesteps(num_inference_steps)).to(device)

    def _variance(self, timestep, prev_timestep) -> torch.Tensor:
        """σ_t²(η = 1) = (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev) (Song et al. 2021, Eq. 16)."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self._alpha_prod(prev_timestep, self.final_alpha_cumprod)
        return ((1 - alpha_prod_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """x_{t−1} = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z (Song et al. 2021, Eq. 12)."""
        self._require_timesteps()
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self._alpha_prod(prev_timestep, self.final_alpha_cumprod)
        x0 = self._clip_x0(self._vp_denoiser(alpha_prod_t).combine(sample, model_output))
        eps = self._vp_denoiser(alpha_prod_t, noise=True).combine(sample, model_output)
        std_dev = eta * self._variance(timestep, prev_timestep) ** (0.5)
        if use_clipped_model_output:  # ε re-derived from the clipped x₀ (Glide)
            eps = vp_noise_scalings(alpha_prod_t ** (0.5), (1 - alpha_prod_t) ** (0.5), "sample").combine(sample, x0)
        prev_sample = alpha_prod_prev ** (0.5) * x0 + (1 - alpha_prod_prev - std_dev**2) ** (0.5) * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise to DDIMScheduler.step, not both")
            if variance_noise is None:
                variance_noise = self._noise_like(model_output, generator)
            prev_sample = prev_sample + std_dev * variance_noise
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
