"""DPM-Solver and DPM-Solver++, multistep and singlestep, ODE and SDE variants (Lu et al. 2022a, 2022b)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.multistep import SolverScheduler

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
DATA_PREDICTION = ("dpmsolver++", "sde-dpmsolver++")


class ExpIntegrator(NamedTuple):
    """x_t = c_x x_s + phi1 D0 + phi2 D1 + phi3 D2 + c_noise z, the exponential-integrator step from s to t."""

    c_x: torch.Tensor
    phi1: torch.Tensor
    phi2: torch.Tensor
    phi3: torch.Tensor | None
    c_noise: torch.Tensor | None


def exp_integrator(algorithm: str, alpha_t, sigma_t, alpha_s, sigma_s, h) -> ExpIntegrator:
    """Coefficients of the Taylor terms D0, D1, D2 over a log-SNR step h: noise prediction (Lu et al. 2022a,
    Eq. 3.5), data prediction (Lu et al. 2022b, Eq. 9), and the SDE variants of both (Lu et al. 2022b,
    SDE-DPM-Solver++), which shrink the deterministic part and add fresh noise."""
    if algorithm == "dpmsolver++":
        em = torch.exp(-h) - 1.0
        return ExpIntegrator(sigma_t / sigma_s, -(alpha_t * em), alpha_t * (em / h + 1.0),
                             -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)), None)
    if algorithm == "dpmsolver":
        ep = torch.exp(h) - 1.0
        return ExpIntegrator(alpha_t / alpha_s, -(sigma_t * ep), -(sigma_t * (ep / h - 1.0)),
                             -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)), None)
    if algorithm == "sde-dpmsolver++":
        em2 = 1.0 - torch.exp(-2.0 * h)
        return ExpIntegrator(sigma_t / sigma_s * torch.exp(-h), alpha_t * em2, alpha_t * (em2 / (-2.0 * h) + 1.0),
                             alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5),
                             sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)))
    if algorithm == "sde-dpmsolver":
        ep = torch.exp(h) - 1.0
        return ExpIntegrator(alpha_t / alpha_s, -(2.0 * (sigma_t * ep)), -(2.0 * (sigma_t * (ep / h - 1.0))), None,
                             sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0))
    raise ValueError(f"unknown algorithm_type {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


def apply_integrator(coeffs: ExpIntegrator, sample, terms, noise=None) -> torch.Tensor:
    """c_x x + Σ c_k D_k (+ c_noise z), summed left to right."""
    x = coeffs.c_x * sample
    for coefficient, derivative in terms:
        if coefficient is None:
            raise ValueError("algorithm_type 'sde-dpmsolver' has no third-order step; use solver_order 1 or 2")
        x = x + coefficient * derivative
    return x if coeffs.c_noise is None else x + coeffs.c_noise * noise


class _DPMSolverBase(SolverScheduler):
    """Model-output conversion and the first-order step shared by multistep and singlestep DPM-Solver."""

    def _check_solver_config(self, algorithm_type: str, solver_type: str, final_sigmas_type: str) -> None:
        # configs of the other solvers name their own variants; they map onto ours, as in diffusers
        if algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type not in ALGORITHMS:
            raise ValueError(f"unknown algorithm_type {algorithm_type!r}; choose one of {', '.join(ALGORITHMS)}")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        elif solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}; choose 'midpoint' or 'heun'")
        if self.config.algorithm_type not in DATA_PREDICTION and final_sigmas_type == "zero":
            raise ValueError(
                f"final_sigmas_type='zero' needs a data-prediction algorithm (dpmsolver++ or sde-dpmsolver++); "
                f"with {algorithm_type!r} use final_sigmas_type='sigma_min'"
            )

    def convert_model_output(self, model_output: torch.Tensor, *, sample: torch.Tensor) -> torch.Tensor:
        """x₀ (DPM-Solver++, thresholded if asked) or ε (DPM-Solver) at the current step."""
        c = self.config
        output = self._x0_model_output(model_output) if c.prediction_type == "epsilon" else model_output
        if c.algorithm_type in DATA_PREDICTION:
            return self._clip_x0(self._step_denoiser().combine(sample, output))
        eps = self._step_denoiser(noise=True).combine(sample, output)
        if c.thresholding:  # threshold x₀, then recover ε from it
            x0 = self._clip_x0(self._step_denoiser("epsilon").combine(sample, eps))
            eps = self._step_denoiser("sample", noise=True).combine(sample, x0)
        return eps

    def _integrator(self, target: int, source: int) -> tuple[ExpIntegrator, torch.Tensor]:
        """Coefficients for a step from position `source` to `target` of the schedule, and its h."""
        alpha_t, sigma_t = self._alpha_sigma_at(target)
        alpha_s, sigma_s = self._alpha_sigma_at(source)
        h = self._log_snr(target) - self._log_snr(source)
        return exp_integrator(self.config.algorithm_type, alpha_t, sigma_t, alpha_s, sigma_s, h), h

    def dpm_solver_first_order_update(self, model_output, *, sample, noise=None) -> torch.Tensor:
        """DPM-Solver-1 / DPM-Solver++(1), i.e. DDIM in λ (Lu et al. 2022b, Eq. 9 with k = 1)."""
        coeffs, _ = self._integrator(self.step_index + 1, self.step_index)
        return apply_integrator(coeffs, sample, [(coeffs.phi1, model_output)], noise)

    def _second_order_term(self, coeffs: ExpIntegrator):
        """Weight of D1: ½ phi1 for the midpoint variant, phi2 for Heun's."""
        return 0.5 * coeffs.phi1 if self.config.solver_type == "midpoint" else coeffs.phi2


class DPMSolverMultistepScheduler(_DPMSolverBase):
    """Multistep DPM-Solver(++) of order 1–3 (Lu et al. 2022b, Alg. 2 "DPM-Solver++(2M)" and its order-3
    variant; Lu et al. 2022a for noise prediction), with the SDE variants "sde-dpmsolver(++)"."""

    accepts_custom_timesteps = True

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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_solver_config(algorithm_type, solver_type, final_sigmas_type)
        self._init_solver()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced (or custom) integer timesteps and their σ, resampled if the config asks."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        if timesteps is not None and self.config.use_lu_lambdas:
            raise ValueError("custom timesteps cannot be combined with use_lu_lambdas=True")
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            timesteps = self._spaced_solver_timesteps(num_inference_steps)
        round_resampled = self.config.beta_schedule != "squaredcos_cap_v2"
        sigmas, timesteps, _ = self._solver_sigmas(timesteps, num_inference_steps, round_resampled=round_resampled)
        self._store_schedule(sigmas, self._final_sigma_for(self.config.final_sigmas_type), timesteps, device)

    def _final_step_first_order(self) -> bool:
        return self.config.euler_at_final or self.config.final_sigmas_type == "zero"

    def multistep_dpm_solver_second_order_update(self, model_output_list, *, sample, noise=None) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): D1 from the previous step's output."""
        i = self.step_index
        coeffs, h = self._integrator(i + 1, i)
        r0 = (self._log_snr(i) - self._log_snr(i - 1)) / h
        m0, m1 = model_output_list[-1], model_output_list[-2]
        d1 = (1.0 / r0) * (m0 - m1)
        return apply_integrator(coeffs, sample, [(coeffs.phi1, m0), (self._second_order_term(coeffs), d1)], noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list, *, sample, noise=None) -> torch.Tensor:
        """Multistep third order (Lu et al. 2022b, App. B): D1, D2 from the last three outputs."""
        i = self.step_index
        coeffs, h = self._integrator(i + 1, i)
        lambda_s0, lambda_s1, lambda_s2 = self._log_snr(i), self._log_snr(i - 1), self._log_snr(i - 2)
        r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return apply_integrator(coeffs, sample, [(coeffs.phi1, m0), (coeffs.phi2, d1), (coeffs.phi3, d2)], noise)

    def _noise(self, model_output, generator, variance_noise):
        if self.config.algorithm_type not in ("sde-dpmsolver", "sde-dpmsolver++"):
            return None
        if variance_noise is not None:
            return variance_noise.to(device=model_output.device, dtype=torch.float32)
        return self._noise_like(model_output, generator, dtype=torch.float32)

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        """One multistep update of the current order from the stored model outputs."""
        order, model_output = self._begin_multistep(model_output, timestep, sample)
        sample = sample.to(torch.float32)
        noise = self._noise(model_output, generator, variance_noise)
        if order == 1:
            prev_sample = self.dpm_solver_first_order_update(model_output, sample=sample, noise=noise)
        elif order == 2:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample, noise=noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample, noise=noise)
        self._count_step()
        return self._output(return_dict, prev_sample.to(model_output.dtype))


class DPMSolverSinglestepScheduler(_DPMSolverBase):
    """Singlestep DPM-Solver(++) (Lu et al. 2022a, Alg. 1–2; 2022b, Alg. 1 "DPM-Solver++(2S)"): each step of
    order k spends k network evaluations at intermediate points of the schedule, taken as its own steps.

    History: `sample`, the start of the current multi-evaluation step; `order_list`, the order of every step.
    """

    accepts_custom_timesteps = True

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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
    ):
        if algorithm_type == "sde-dpmsolver":
            raise ValueError("DPMSolverSinglestepScheduler has no 'sde-dpmsolver'; use 'sde-dpmsolver++'")
        if solver_order > 3:
            raise ValueError(f"DPMSolverSinglestepScheduler supports solver_order 1 to 3, not {solver_order}")
        self._check_solver_config(algorithm_type, solver_type, final_sigmas_type)
        self._init_solver()
        self.sample = None
        self.order_list = self.get_order_list(num_train_timesteps)

    def _lower_order_final(self, num_inference_steps: int) -> bool:
        """Odd step counts and a zero final σ force lower orders at the end (diffusers switches the config)."""
        c = self.config
        return c.lower_order_final or num_inference_steps % c.solver_order != 0 or c.final_sigmas_type == "zero"

    def get_order_list(self, num_inference_steps: int, lower_order_final: bool | None = None) -> list[int]:
        """The order of each step: cycles 1, 2, (3), ..., shortened at the end so the cycles fit."""
        steps, order = num_inference_steps, self.config.solver_order
        lower = self.config.lower_order_final if lower_order_final is None else lower_order_final
        cycle = list(range(1, order + 1))
        orders = cycle * (steps // order)
        if lower and steps % order == 0 and order > 1:
            orders = cycle * (steps // order - 1) + list(range(1, order)) + [1]
        elif lower:
            orders += list(range(1, steps % order + 1))
        if self.config.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Evenly spaced (or custom) integer timesteps, their σ, and the order of each step."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        num_inference_steps = num_inference_steps or len(timesteps)
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            timesteps = self._spaced_solver_timesteps(num_inference_steps)
        sigmas, timesteps, _ = self._solver_sigmas(timesteps, num_inference_steps)
        self._store_schedule(sigmas, self._final_sigma_for(self.config.final_sigmas_type), timesteps, device)
        self.num_inference_steps = num_inference_steps
        self.sample = None
        self.order_list = self.get_order_list(num_inference_steps, self._lower_order_final(num_inference_steps))

    def singlestep_dpm_solver_second_order_update(self, model_output_list, *, sample, noise=None) -> torch.Tensor:
        """DPM-Solver-2 / DPM-Solver++(2S) from the step's start s1 over its intermediate point s0
        (Lu et al. 2022a, Alg. 1; 2022b, Alg. 1)."""
        i = self.step_index
        coeffs, h = self._integrator(i + 1, i - 1)
        r0 = (self._log_snr(i) - self._log_snr(i - 1)) / h
        m0, m1 = model_output_list[-1], model_output_list[-2]
        d1 = (1.0 / r0) * (m0 - m1)
        return apply_integrator(coeffs, sample, [(coeffs.phi1, m1), (self._second_order_term(coeffs), d1)], noise)

    def singlestep_dpm_solver_third_order_update(self, model_output_list, *, sample, noise=None) -> torch.Tensor:
        """DPM-Solver-3 (Lu et al. 2022a, Alg. 2) from the step's start s2 over s1 and s0."""
        i = self.step_index
        coeffs, h = self._integrator(i + 1, i - 2)
        lambda_s2 = self._log_snr(i - 2)
        r0, r1 = (self._log_snr(i) - lambda_s2) / h, (self._log_snr(i - 1) - lambda_s2) / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0, d1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
        if self.config.solver_type == "midpoint":
            terms = [(coeffs.phi1, m2), (coeffs.phi2, d1_1)]
        else:
            d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
            terms = [(coeffs.phi1, m2), (coeffs.phi2, d1), (coeffs.phi3, d2)]
        return apply_integrator(coeffs, sample, terms, noise)

    def singlestep_dpm_solver_update(self, model_output_list, *, sample, order: int, noise=None) -> torch.Tensor:
        """The update of `order` from the step's start `sample` with the outputs gathered so far."""
        if order == 1:
            return self.dpm_solver_first_order_update(model_output_list[-1], sample=sample, noise=noise)
        if order == 2:
            return self.singlestep_dpm_solver_second_order_update(model_output_list, sample=sample, noise=noise)
        return self.singlestep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """One evaluation of the current singlestep update, from the step's start sample."""
        self._require_timesteps()
        index = self._ensure_step_index(timestep)
        model_output = self.convert_model_output(model_output, sample=sample)
        self._push_model_output(model_output)
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = self._noise_like(model_output, generator)
        order = self.order_list[index]
        while self.model_outputs[-order] is None:  # not enough history yet (img2img starts mid-cycle)
            order -= 1
        if order == 1:
            self.sample = sample
        prev_sample = self.singlestep_dpm_solver_update(self.model_outputs, sample=self.sample, order=order,
                                                        noise=noise)
        self._step_index += 1
        return self._output(return_dict, prev_sample)
