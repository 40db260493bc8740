"""PNDM: pseudo numerical methods on the DDIM transfer function (Liu et al. 2022), PRK then PLMS steps."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import AlphaScheduler
from stablepipe.schedulers.schedules import spaced_timesteps


def adams_bashforth(ets: list[torch.Tensor]) -> torch.Tensor:
    """Linear multistep combination of the last 1–4 noise estimates, oldest first (Liu et al. 2022, Eq. 12)."""
    e = ets[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


class PNDMScheduler(AlphaScheduler):
    """Pseudo Runge–Kutta (PRK, 3 warm-up steps of 4 evaluations) then pseudo linear multistep (PLMS)
    steps (Liu et al. 2022, Alg. 1–2). With `skip_prk_steps` the warm-up is one Heun-like double step.

    State (reset by `set_timesteps`): `counter` (steps taken), `ets` (past noise estimates), and the
    pending Runge–Kutta sum `cur_model_output` with its base sample `cur_sample`.
    """

    pndm_order = 4

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"PNDMScheduler takes prediction_type epsilon or v_prediction, got {prediction_type!r}")
        self._init_alpha_schedule()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = np.array([], dtype=np.int64)
        self._reset_history()

    def _reset_history(self) -> None:
        self.counter = 0
        self.ets: list[torch.Tensor] = []
        self.cur_sample = None
        self.cur_model_output = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """PRK timesteps (each inner point twice, half-steps between) followed by the PLMS timesteps."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        n, c = num_inference_steps, self.config
        self.num_inference_steps = n
        ascending = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, steps_offset=c.steps_offset)
        ascending = ascending[::-1].round()
        if c.skip_prk_steps:  # the first PLMS step is taken twice (the second as a correction)
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            half_step = np.tile(np.array([0, c.num_train_timesteps // n // 2]), self.pndm_order)
            prk = np.array(ascending[-self.pndm_order:]).repeat(2) + half_step
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].astype(np.int64)
            plms = ascending[:-3][::-1]
        self.plms_timesteps = plms.astype(np.int64)  # diffusers' name, for loops that call step_plms themselves
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, plms]).astype(np.int64)).to(device)
        self._reset_history()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One PRK stage during the warm-up, a PLMS step after it."""
        in_warm_up = self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps
        return (self.step_prk if in_warm_up else self.step_plms)(model_output, timestep, sample, return_dict)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Stage `counter % 4` of a pseudo Runge–Kutta step (Liu et al. 2022, Eq. 13): weights 1/6, 1/3, 1/3, 1/6."""
        self._require_timesteps()
        half_step = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - (0 if self.counter % 2 else half_step)
        base_timestep = self.prk_timesteps[self.counter // 4 * 4]
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        base_sample = self.cur_sample if self.cur_sample is not None else sample
        self.counter += 1
        return self._output(return_dict, self._transfer(base_sample, base_timestep, prev_timestep, model_output))

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A pseudo linear multistep step (Liu et al. 2022, Eq. 12) on the last four noise estimates."""
        self._require_timesteps()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PLMS steps need the 3 PRK warm-up steps first; use the timesteps from set_timesteps")
        step = self.config.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - step
        if self.counter == 1:  # the correction of the first step: average its two estimates, restart from x_T
            prev_timestep, timestep = timestep, timestep + step
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:
            self.ets = [*self.ets[-3:], model_output]
            if self.counter == 0:
                self.cur_sample = sample
            else:
                model_output = adams_bashforth(self.ets)
        self.counter += 1
        return self._output(return_dict, self._transfer(sample, timestep, prev_timestep, model_output))

    def _transfer(self, sample, timestep, prev_timestep, model_output) -> torch.Tensor:
        """The transfer function φ(x_t, ε, t, t−δ) (Liu et al. 2022, Eq. 11)."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self._alpha_prod(prev_timestep, self.final_alpha_cumprod)
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        model_output = self._vp_denoiser(alpha_prod_t, noise=True).combine(sample, model_output)  # ε
        sample_coeff = (alpha_prod_prev / alpha_prod_t) ** (0.5)
        denominator = alpha_prod_t * beta_prod_prev ** (0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_prev) ** (0.5)
        return sample_coeff * sample - (alpha_prod_prev - alpha_prod_t) * model_output / denominator
