"""Euler samplers on σ: the deterministic one with optional churn, and the ancestral one (k-diffusion)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import SigmaScheduler, broadcast_to
from stablepipe.schedulers.denoiser import karras_noise_level
from stablepipe.schedulers.sampling import to_d
from stablepipe.schedulers.schedules import ancestral_step, sigma_to_t, train_sigmas


def _reject_integer_timestep(timestep, scheduler: str) -> None:
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(
            f"{scheduler}.step got an integer index as the timestep (from enumerate?); "
            "pass one of scheduler.timesteps instead"
        )


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler's method on the probability-flow ODE, with optional stochastic churn
    (Karras et al. 2022, Alg. 2; k-diffusion `sample_euler`)."""

    accepts_custom_timesteps = True
    accepts_custom_sigmas = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self._init_sigma_schedule()
        if self._continuous_timesteps():
            self.timesteps = karras_noise_level(self.sigmas[:-1])

    def _continuous_timesteps(self) -> bool:
        """Timesteps are c_noise = ¼ log σ (Karras et al. 2022, Table 1) for continuous v-prediction models."""
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def _schedule_sigmas(self, timesteps: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(σ incl. the final one, timesteps) for spaced or custom timesteps."""
        sigmas = train_sigmas(self.alphas_cumprod)
        if self.config.interpolation_type == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        elif self.config.interpolation_type == "log_linear":
            sigmas = torch.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), n + 1).exp().numpy()
        else:
            kind = self.config.interpolation_type
            raise ValueError(f"unknown interpolation_type {kind!r}; use 'linear' or 'log_linear'")
        sigmas, timesteps = self._resample_sigmas(sigmas, timesteps)
        if self.config.final_sigmas_type == "sigma_min":
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        elif self.config.final_sigmas_type == "zero":
            last = 0
        else:
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', not {self.config.final_sigmas_type!r}")
        return np.concatenate([sigmas, [last]]).astype(np.float32), timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced timesteps and their σ; or custom timesteps; or custom σ (including the final one)."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        if timesteps is not None and self._continuous_timesteps():
            raise ValueError("custom timesteps cannot be used with timestep_type='continuous' and v_prediction")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], np.log(train_sigmas(self.alphas_cumprod)))
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = self._spaced_float_timesteps(num_inference_steps)
            sigmas, timesteps = self._schedule_sigmas(timesteps, num_inference_steps)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if self._continuous_timesteps():
            self.timesteps = torch.Tensor([karras_noise_level(sigma) for sigma in sigmas[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self.sigmas = sigmas.to("cpu")
        self._reset_position()

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True):
        """x_next = x̂ + (σ_next − σ̂) (x̂ − x₀)/σ̂, after raising σ to σ̂ = σ(1 + γ) by churn noise
        (Karras et al. 2022, Alg. 2, lines 5–8)."""
        _reject_integer_timestep(timestep, "EulerDiscreteScheduler")
        index = self._ensure_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = self._noise_like(model_output, generator)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        # diffusers converts ε at σ̂ but v at σ; identical without churn
        sigma_for_x0 = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        x0 = self._denoised(model_output, sample, sigma_for_x0)
        derivative = to_d(sample, sigma_hat, x0)
        prev_sample = (sample + derivative * (self.sigmas[index + 1] - sigma_hat)).to(model_output.dtype)
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ ε − √(1−ᾱ) x₀. As in diffusers, ᾱ is read at each timestep's *position* in the schedule."""
        _reject_integer_timestep(timesteps, "EulerDiscreteScheduler")
        schedule = self.timesteps.to(sample.device)
        indices = [self.index_for_timestep(t, schedule) for t in timesteps.to(sample.device)]
        alphas_cumprod = self.alphas_cumprod.to(sample)
        sqrt_alpha = broadcast_to(alphas_cumprod[indices] ** 0.5, sample)
        sqrt_one_minus_alpha = broadcast_to((1 - alphas_cumprod[indices]) ** 0.5, sample)
        return sqrt_alpha * noise - sqrt_one_minus_alpha * sample


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Ancestral Euler: an Euler step down to σ_down, then fresh noise of scale σ_up
    (k-diffusion `sample_euler_ancestral`; Song et al. 2021 ancestral sampling on σ)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_sigma_schedule()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced timesteps and their interpolated σ, ending at σ = 0."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        self.num_inference_steps = num_inference_steps
        timesteps = self._spaced_float_timesteps(num_inference_steps)
        sigmas, _ = self._inference_sigmas(timesteps)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._reset_position()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """x_next = x + (σ_down − σ)(x − x₀)/σ + σ_up z (k-diffusion `sample_euler_ancestral`, η = 1)."""
        _reject_integer_timestep(timestep, "EulerAncestralDiscreteScheduler")
        index = self._ensure_step_index(timestep)
        sigma = self.sigmas[index]
        sample = sample.to(torch.float32)
        x0 = self._denoised(model_output, sample, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, self.sigmas[index + 1])
        prev_sample = sample + to_d(sample, sigma, x0) * (sigma_down - sigma)
        noise = self._noise_like(model_output, generator)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
