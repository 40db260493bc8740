"""Heun's second-order method on σ (Karras et al. 2022, Alg. 1)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import TwoStageSigmaScheduler, repeat_inner
from stablepipe.schedulers.sampling import to_d


class HeunDiscreteScheduler(TwoStageSigmaScheduler):
    """Heun's method: an Euler predictor to σ_next, then the trapezoidal corrector with the slope there
    (Karras et al. 2022, Alg. 1; k-diffusion `sample_heun`). Each step is two `step` calls; the timesteps
    list every inner point twice.

    Stage state (besides `sample`): `prev_derivative` and `dt` of the predictor.
    """

    accepts_custom_timesteps = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._init_two_stage()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None,
                      num_train_timesteps: int | None = None):
        """Spaced (or custom) timesteps and their σ, each inner point repeated for the corrector stage."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        num_inference_steps = num_inference_steps or len(timesteps)
        self.num_inference_steps = num_inference_steps
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.float32)
        else:
            timesteps = self._spaced_float_timesteps(num_inference_steps, num_train_timesteps)
        sigmas, timesteps = self._inference_sigmas(timesteps)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.sigmas = repeat_inner(sigmas)
        timesteps = torch.from_numpy(timesteps)
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device, torch.float32)
        self.sample = self.prev_derivative = self.dt = None
        self._reset_position()

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """Predictor: x' = x + (σ_next − σ) d(x, σ); corrector: x_next = x + (σ_next − σ)(d + d')/2."""
        index = self._ensure_step_index(timestep)
        first = self.state_in_first_order
        sigma, sigma_next = self._stage_sigmas(index)
        sigma_input = sigma if first else sigma_next
        x0 = self._clip_x0(self._denoised(model_output, sample, sigma_input))
        derivative = to_d(sample, sigma_input, x0)
        if first:
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            prev_sample = sample + derivative * self.dt
        else:
            derivative = (self.prev_derivative + derivative) / 2
            prev_sample = self.sample + derivative * self.dt
            self.sample = self.prev_derivative = self.dt = None
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
