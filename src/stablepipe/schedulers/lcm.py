"""LCM: multistep sampling of latent consistency models (Luo et al. 2023)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import AlphaScheduler
from stablepipe.schedulers.denoiser import consistency_scalings


class LCMScheduler(AlphaScheduler):
    """Latent consistency model sampling (Luo et al. 2023, Alg. 3): denoise to x₀ with the consistency
    function, then re-noise to the next timestep (no noise after the last one)."""

    accepts_custom_timesteps = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_alpha_schedule()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.sigma_data = 0.5
        self.custom_timesteps = False

    def _distillation_timesteps(self, original_steps: int, strength: float) -> np.ndarray:
        """The ascending timesteps the model was distilled on: k − 1, 2k − 1, ... with k = T // original_steps."""
        if original_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps ({original_steps}) cannot exceed num_train_timesteps "
                f"({self.config.num_train_timesteps})"
            )
        k = self.config.num_train_timesteps // original_steps
        return np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1

    def _custom(self, timesteps, strength: float) -> np.ndarray:
        self._check_custom_timesteps(timesteps)
        values = np.array(timesteps, dtype=np.int64)
        kept = min(int(len(values) * strength), len(values))
        return values[max(len(values) - kept, 0) :]

    def _evenly_skipped(self, origin: np.ndarray, num_inference_steps: int, original_steps: int) -> np.ndarray:
        if num_inference_steps > self.config.num_train_timesteps or num_inference_steps > original_steps:
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) cannot exceed original_inference_steps "
                f"({original_steps}) nor num_train_timesteps ({self.config.num_train_timesteps})"
            )
        if len(origin) // num_inference_steps < 1:
            raise ValueError(
                f"original_inference_steps x strength gives {len(origin)} timesteps, fewer than "
                f"num_inference_steps ({num_inference_steps}); lower num_inference_steps or raise strength"
            )
        descending = origin[::-1].copy()
        indices = np.floor(np.linspace(0, len(descending), num=num_inference_steps, endpoint=False)).astype(np.int64)
        return descending[indices]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        *,
        timesteps=None,
        sigmas=None,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
    ):
        """`num_inference_steps` timesteps spread evenly over the distillation schedule (or custom ones)."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        original_steps = (
            original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps
        )
        origin = self._distillation_timesteps(original_steps, strength)
        self.custom_timesteps = timesteps is not None
        if timesteps is not None:
            self.num_inference_steps = len(timesteps)
            values = self._custom(timesteps, strength)
        else:
            values = self._evenly_skipped(origin, num_inference_steps, original_steps)
            self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(values).to(device=device, dtype=torch.long)
        self._reset_position()

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """(c_skip, c_out) at `timestep`."""
        return consistency_scalings(timestep, self.config.timestep_scaling, self.sigma_data)[:2]

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """x₀ = c_skip x_t + c_out f(x_t); x_prev = √ᾱ_prev x₀ + √(1−ᾱ_prev) z (Luo et al. 2023, Alg. 3)."""
        self._require_timesteps()
        index = self._ensure_step_index(timestep)
        prev_timestep = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else timestep
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self._alpha_prod(prev_timestep, self.final_alpha_cumprod)
        x0 = self._clip_x0(self._vp_denoiser(alpha_prod_t).combine(sample, model_output))
        denoised = consistency_scalings(timestep, self.config.timestep_scaling, self.sigma_data).combine(sample, x0)
        prev_sample = denoised
        if index != self.num_inference_steps - 1:
            noise = self._noise_like(model_output, generator, dtype=denoised.dtype)
            prev_sample = alpha_prod_prev.sqrt() * denoised + (1 - alpha_prod_prev).sqrt() * noise
        self._step_index += 1
        return self._output(return_dict, prev_sample, denoised=denoised)
