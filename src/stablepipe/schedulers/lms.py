"""Linear multistep on σ (k-diffusion `sample_lms`)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import SigmaScheduler
from stablepipe.schedulers.sampling import lms_coefficient, to_d


class LMSDiscreteScheduler(SigmaScheduler):
    """Linear multistep method of up to `order` (default 4) on the probability-flow ODE in σ
    (Karras et al. 2022 / k-diffusion `sample_lms`). History: `derivatives`, the last slopes dx/dσ."""

    karras_from_config_range = False

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._init_sigma_schedule()
        self.derivatives: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced timesteps and their σ (resampled if the config asks), ending at σ = 0."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps = self._inference_sigmas(self._spaced_float_timesteps(num_inference_steps))
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.float32)
        self.derivatives = []
        self._reset_position()

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Weight of the slope `current_order` steps back, for a step from σ_t to σ_{t+1}."""
        nodes = [float(self.sigmas[t - k]) for k in range(order)]
        return lms_coefficient(nodes, current_order, float(self.sigmas[t]), float(self.sigmas[t + 1]))

    def step(self, model_output, timestep, sample, order: int = 4, return_dict: bool = True):
        """x_next = x + Σ_j c_j d_{t−j} over the last `order` slopes d = (x − x₀)/σ."""
        index = self._ensure_step_index(timestep)
        sigma = self.sigmas[index]
        x0 = self._denoised(model_output, sample, sigma)
        self.derivatives = [*self.derivatives, to_d(sample, sigma, x0)][-order:]
        order = min(index + 1, order)
        coefficients = [self.get_lms_coefficient(order, index, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coefficients, reversed(self.derivatives)))
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
