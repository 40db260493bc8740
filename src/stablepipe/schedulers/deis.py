"""DEIS: diffusion exponential integrator sampler, log-ρ multistep variant (Zhang & Chen 2022)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.dpm_solver import apply_integrator, exp_integrator
from stablepipe.schedulers.multistep import SolverScheduler


def _log(x: torch.Tensor) -> torch.Tensor:
    """log in numpy's float32, as diffusers computes it here: the coefficients below are differences of nearly
    equal terms, so torch's log (one ulp apart at times) would change results by ~1e-5."""
    return torch.as_tensor(np.log(x.detach().cpu().numpy()), device=x.device)


def deis_integral_2(t, b, c):
    """∫ of the degree-1 Lagrange basis through log ρ at nodes (b, c) against ρ, in closed form
    (Zhang & Chen 2022, Eq. 14 with ρ = σ/α)."""
    return t * (-_log(c) + _log(t) - 1) / (_log(b) - _log(c))


def deis_integral_3(t, b, c, d):
    """∫ of the degree-2 Lagrange basis through log ρ at nodes (b, c, d) against ρ, in closed form."""
    log_t, log_c, log_d = _log(t), _log(c), _log(d)
    numerator = t * (log_c * (log_d - log_t + 1) - log_d * log_t + log_d + log_t**2 - 2 * log_t + 2)
    return numerator / ((_log(b) - log_c) * (_log(b) - log_d))


class DEISMultistepScheduler(SolverScheduler):
    """DEIS with the log-ρ Adams–Bashforth polynomial (Zhang & Chen 2022, Sec. 4, "ρAB-DEIS") on ε,
    of order 1–3; its first order is DDIM."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        # configs of the other solvers name their own variants; they map onto DEIS's, as in diffusers
        if algorithm_type in ("dpmsolver", "dpmsolver++"):
            self.register_to_config(algorithm_type="deis")
        elif algorithm_type != "deis":
            raise ValueError(f"DEISMultistepScheduler supports algorithm_type 'deis', not {algorithm_type!r}")
        if solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.register_to_config(solver_type="logrho")
        elif solver_type != "logrho":
            raise ValueError(f"DEISMultistepScheduler supports solver_type 'logrho', not {solver_type!r}")
        self._init_solver()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced integer timesteps and their σ; resampled schedules end by repeating their last σ."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        timesteps = self._spaced_solver_timesteps(num_inference_steps)
        sigmas, timesteps, resampled = self._solver_sigmas(timesteps, num_inference_steps)
        self._store_schedule(sigmas, sigmas[-1] if resampled else self._train_sigma_min(), timesteps, device)

    def convert_model_output(self, model_output: torch.Tensor, *, sample: torch.Tensor) -> torch.Tensor:
        """ε, recomputed from the (thresholded) x₀ estimate."""
        x0 = self._clip_x0(self._step_denoiser().combine(sample, model_output))
        return self._step_denoiser("sample", noise=True).combine(sample, x0)

    def deis_first_order_update(self, model_output, *, sample) -> torch.Tensor:
        """DDIM in λ, the order-1 exponential integrator on ε."""
        i = self.step_index
        alpha_t, sigma_t = self._alpha_sigma_at(i + 1)
        alpha_s, sigma_s = self._alpha_sigma_at(i)
        h = self._log_snr(i + 1) - self._log_snr(i)
        coeffs = exp_integrator("dpmsolver", alpha_t, sigma_t, alpha_s, sigma_s, h)
        return apply_integrator(coeffs, sample, [(coeffs.phi1, model_output)])

    def _rhos(self, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(α_t, [ρ_t, ρ_s0, ρ_s1, ...]) with ρ = σ_t/α_t at the target and the last `count` steps."""
        i = self.step_index
        alphas_sigmas = [self._alpha_sigma_at(i + 1)] + [self._alpha_sigma_at(i - k) for k in range(count)]
        return alphas_sigmas[0][0], [s / a for a, s in alphas_sigmas]

    def multistep_deis_second_order_update(self, model_output_list, *, sample) -> torch.Tensor:
        """ρAB-DEIS of order 2 (Zhang & Chen 2022, Eq. 14)."""
        alpha_t, (rho_t, rho_s0, rho_s1) = self._rhos(2)
        alpha_s0 = self._alpha_sigma_at(self.step_index)[0]
        coef1 = deis_integral_2(rho_t, rho_s0, rho_s1) - deis_integral_2(rho_s0, rho_s0, rho_s1)
        coef2 = deis_integral_2(rho_t, rho_s1, rho_s0) - deis_integral_2(rho_s0, rho_s1, rho_s0)
        return alpha_t * (sample / alpha_s0 + coef1 * model_output_list[-1] + coef2 * model_output_list[-2])

    def multistep_deis_third_order_update(self, model_output_list, *, sample) -> torch.Tensor:
        """ρAB-DEIS of order 3 (Zhang & Chen 2022, Eq. 14)."""
        alpha_t, (rho_t, rho_s0, rho_s1, rho_s2) = self._rhos(3)
        alpha_s0 = self._alpha_sigma_at(self.step_index)[0]
        coef1 = deis_integral_3(rho_t, rho_s0, rho_s1, rho_s2) - deis_integral_3(rho_s0, rho_s0, rho_s1, rho_s2)
        coef2 = deis_integral_3(rho_t, rho_s1, rho_s2, rho_s0) - deis_integral_3(rho_s0, rho_s1, rho_s2, rho_s0)
        coef3 = deis_integral_3(rho_t, rho_s2, rho_s0, rho_s1) - deis_integral_3(rho_s0, rho_s2, rho_s0, rho_s1)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """One multistep DEIS update of the current order."""
        order, model_output = self._begin_multistep(model_output, timestep, sample)
        if order == 1:
            prev_sample = self.deis_first_order_update(model_output, sample=sample)
        elif order == 2:
            prev_sample = self.multistep_deis_second_order_update(self.model_outputs, sample=sample)
        else:
            prev_sample = self.multistep_deis_third_order_update(self.model_outputs, sample=sample)
        self._count_step()
        return self._output(return_dict, prev_sample)
