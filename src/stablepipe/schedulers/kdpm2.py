"""DPM-Solver-2 on σ (k-diffusion `sample_dpm_2` and `sample_dpm_2_ancestral`)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import TwoStageSigmaScheduler, repeat_inner
from stablepipe.schedulers.sampling import to_d
from stablepipe.schedulers.schedules import ancestral_step, sigma_to_t, train_sigmas


class _KDPM2Base(TwoStageSigmaScheduler):
    """The shared config and schedule: each step evaluates the network at σ and at a geometric midpoint σ_mid."""

    round_resampled_timesteps = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._init_two_stage()

    def _midpoints(self, sigmas: torch.Tensor) -> torch.Tensor:
        """σ_mid for each σ: halfway in log σ to a neighbour that the subclass chooses."""
        raise NotImplementedError

    def _midpoint_timesteps(self, sigmas_interpol: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None,
                      num_train_timesteps: int | None = None):
        """σ and midpoint σ, each repeated for the two stages; timesteps alternate step / midpoint."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        self.num_inference_steps = num_inference_steps
        spaced = self._spaced_float_timesteps(num_inference_steps, num_train_timesteps)
        sigmas, spaced = self._inference_sigmas(spaced)
        self.log_sigmas = torch.from_numpy(np.log(train_sigmas(self.alphas_cumprod))).to(device)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        sigmas_interpol = self._midpoints(sigmas)
        self.sigmas = repeat_inner(sigmas, last_too=True)
        self.sigmas_interpol = repeat_inner(sigmas_interpol, last_too=True)
        timesteps = torch.from_numpy(spaced).to(device)
        self.timesteps = torch.cat([timesteps[:1], self._midpoint_timesteps(sigmas_interpol, timesteps)])
        self.sample = None
        self._reset_position()

    def _timesteps_of(self, sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        values = sigma_to_t(sigmas.cpu().numpy(), self.log_sigmas.cpu().numpy(), blend_dtype=np.float32)
        return torch.from_numpy(values).to(like.device, dtype=like.dtype)

    def _midpoint_and_target(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(σ_mid, σ the second stage lands on) for the step at `index`."""
        raise NotImplementedError

    def _euler_stage(self, model_output, sample):
        """(x₀, next sample). First stage: Euler from σ to σ_mid. Second stage: from the step's start, with the
        slope d = (x − x₀)/σ_mid measured at the midpoint, to the target σ (Lu et al. 2022a, Alg. 1, k = 2)."""
        index = self.step_index
        first = self.state_in_first_order
        sigma = self._stage_sigmas(index)[0]
        sigma_interpol, target = self._midpoint_and_target(index)
        sigma_input = sigma if first else sigma_interpol
        x0 = self._denoised(model_output, sample, sigma_input)
        derivative = to_d(sample, sigma_input, x0)
        if first:
            self.sample = sample
            return x0, sample + derivative * (sigma_interpol - sigma)
        base, self.sample = self.sample, None
        return x0, base + derivative * (target - sigma)


class KDPM2DiscreteScheduler(_KDPM2Base):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1 with k = 2, in σ; Karras et al. 2022, Sec. 3 / k-diffusion
    `sample_dpm_2`): the slope at the log-midpoint of [σ_next, σ] advances the full step."""

    def _midpoints(self, sigmas):
        return sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()  # between σ_{i-1} and σ_i

    def _midpoint_timesteps(self, sigmas_interpol, timesteps):
        interpol = self._timesteps_of(sigmas_interpol, timesteps)
        return torch.stack((interpol[1:-1, None], timesteps[1:, None]), dim=-1).flatten()

    def _input_sigma(self):
        return self.sigmas[self.step_index] if self.state_in_first_order else self.sigmas_interpol[self.step_index]

    def _midpoint_and_target(self, index):
        if self.state_in_first_order:
            return self.sigmas_interpol[index + 1], self.sigmas[index + 1]
        return self.sigmas_interpol[index], self.sigmas[index]

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """First stage: Euler to σ_mid; second: from x with the slope at σ_mid, to σ_next."""
        self._ensure_step_index(timestep)
        x0, prev_sample = self._euler_stage(model_output, sample)
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)


class KDPM2AncestralDiscreteScheduler(_KDPM2Base):
    """Ancestral DPM-Solver-2 (k-diffusion `sample_dpm_2_ancestral`): DPM-2 to σ_down, then noise σ_up."""

    def _midpoints(self, sigmas):
        """Between σ_i and σ_down,i; also sets the ancestral tables `sigmas_down` / `sigmas_up` of the schedule."""
        sigmas_next = sigmas.roll(-1)
        sigmas_next[-1] = 0.0
        sigmas_down, sigmas_up = ancestral_step(sigmas, sigmas_next)
        sigmas_down[-1] = 0.0
        self.sigmas_up = repeat_inner(sigmas_up, last_too=True)
        self.sigmas_down = repeat_inner(sigmas_down, last_too=True)
        midpoints = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
        midpoints[-2:] = 0.0
        return midpoints

    def _midpoint_timesteps(self, sigmas_interpol, timesteps):
        interpol = self._timesteps_of(sigmas_interpol, timesteps)
        return torch.stack((interpol[:-2, None], timesteps[1:, None]), dim=-1).flatten()

    def _input_sigma(self):
        index = self.step_index
        return self.sigmas[index] if self.state_in_first_order else self.sigmas_interpol[index - 1]

    def _midpoint_and_target(self, index):
        if self.state_in_first_order:
            return self.sigmas_interpol[index], None
        return self.sigmas_interpol[index - 1], self.sigmas_down[index - 1]

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """First stage: Euler to σ_mid; second: to σ_down with the slope at σ_mid, plus σ_up noise."""
        index = self._ensure_step_index(timestep)
        second = not self.state_in_first_order
        x0, prev_sample = self._euler_stage(model_output, sample)
        if second:
            prev_sample = prev_sample + self._noise_like(model_output, generator) * self.sigmas_up[index - 1]
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
