"""UniPC: unified predictor-corrector multistep solver (Zhao et al. 2023)."""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.multistep import SolverScheduler


def unipc_system(h: torch.Tensor, rks: torch.Tensor, order: int, *, predict_x0: bool, solver_type: str):
    """(h φ₁, B(h), R, b) of UniPC's linear system R ρ = b (Zhao et al. 2023, Alg. 1–2, Eq. 8):
    R_ij = r_j^(i−1), b_i = i! φ_{i+1}(hh) / B(hh), with B₁(h) = h ("bh1") or e^h − 1 ("bh2")."""
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h φ₁(h) = e^h − 1
    h_phi_k = h_phi_1 / hh - 1
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"UniPC solver_type must be 'bh1' or 'bh2', not {solver_type!r}")
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rows, rhs, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.stack(rhs)


class UniPCMultistepScheduler(SolverScheduler):
    """UniPC (Zhao et al. 2023): a UniP predictor of order p from the stored outputs, then at the next
    step a UniC corrector that reuses the new model output (no extra evaluation).

    History besides the outputs: `last_sample` (the predictor's input), `this_order` (its order) and
    `timestep_list`.
    """

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 (read, never changed: a list, as diffusers stores it)
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ):
        if solver_type in ("midpoint", "heun", "logrho"):  # other solvers' names, mapped as in diffusers
            self.register_to_config(solver_type="bh2")
        elif solver_type not in ("bh1", "bh2"):
            raise ValueError(f"UniPC solver_type must be 'bh1' or 'bh2', not {solver_type!r}")
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p
        self._init_solver()

    def _reset_history(self) -> None:
        super()._reset_history()
        self.timestep_list = [None] * self.config.solver_order
        self.last_sample = None
        self.this_order = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None):
        """Spaced integer timesteps and their σ, resampled if the config asks."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        timesteps = self._spaced_solver_timesteps(num_inference_steps)
        sigmas, timesteps, resampled = self._solver_sigmas(timesteps, num_inference_steps)
        final = self._final_sigma_for(self.config.final_sigmas_type)
        if resampled and self.config.final_sigmas_type == "sigma_min":
            final = sigmas[-1]
        self._store_schedule(sigmas, final, timesteps, device)
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def convert_model_output(self, model_output: torch.Tensor, *, sample: torch.Tensor) -> torch.Tensor:
        """x₀ (thresholded if asked) when `predict_x0`, else ε."""
        converted = self._step_denoiser(noise=not self.predict_x0).combine(sample, model_output)
        return self._clip_x0(converted) if self.predict_x0 else converted

    def _uni_update(self, x: torch.Tensor, base: int, order: int):
        """What UniP and UniC share for the step from position `base` to `base + 1`: the order-1 part
        x_t' (Zhao et al. 2023, Eq. 4), the coefficient of the corrections, the system, and the differences D1."""
        alpha_t, sigma_t = self._alpha_sigma_at(base + 1)
        alpha_s0, sigma_s0 = self._alpha_sigma_at(base)
        lambda_s0 = self._log_snr(base)
        h = self._log_snr(base + 1) - lambda_s0
        m0 = self.model_outputs[-1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._log_snr(base - k) - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), device=x.device))
        h_phi_1, b_h, r, b = unipc_system(h, torch.stack(rks), order, predict_x0=self.predict_x0,
                                          solver_type=self.config.solver_type)
        if self.predict_x0:
            first_order, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t * b_h
        else:
            first_order, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t * b_h
        d1s = torch.stack(d1s, dim=1) if d1s else None  # (B, K, C, H, W)
        return first_order, scale, r, b, d1s

    def multistep_uni_p_bh_update(self, model_output, *, sample, order: int) -> torch.Tensor:
        """UniP-p, the predictor (Zhao et al. 2023, Alg. 2 with B(h))."""
        if self.solver_p:
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        first_order, scale, r, b, d1s = self._uni_update(sample, self.step_index, order)
        if d1s is None:
            return (first_order - scale * 0).to(sample.dtype)
        rhos_p = torch.ones(1, dtype=sample.dtype) * 0.5 if order == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
        pred_res = torch.einsum("k,bkc...->bc...", rhos_p.to(sample.dtype), d1s)
        return (first_order - scale * pred_res).to(sample.dtype)

    def multistep_uni_c_bh_update(self, this_model_output, *, last_sample, this_sample, order: int) -> torch.Tensor:
        """UniC-p, the corrector (Zhao et al. 2023, Alg. 1 with B(h)): refines the last step with the new output."""
        first_order, scale, r, b, d1s = self._uni_update(last_sample, self.step_index - 1, order)
        rhos_c = torch.ones(1, dtype=last_sample.dtype) * 0.5 if order == 1 else torch.linalg.solve(r, b)
        rhos_c = rhos_c.to(last_sample.dtype)
        corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], d1s) if d1s is not None else 0
        d1_t = this_model_output - self.model_outputs[-1]
        return (first_order - scale * (corr_res + rhos_c[-1] * d1_t)).to(last_sample.dtype)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """Correct the previous step with this output (UniC), store it, then predict the next sample (UniP)."""
        self._require_timesteps()
        index = self._ensure_step_index(timestep)
        use_corrector = index > 0 and index - 1 not in self.disable_corrector and self.last_sample is not None
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(converted, last_sample=self.last_sample, this_sample=sample,
                                                    order=self.this_order)
        self._push_model_output(converted)
        self.timestep_list = [*self.timestep_list[1:], timestep]
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - index)
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up
        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output, sample=sample, order=self.this_order)
        self._count_step()
        return self._output(return_dict, prev_sample)
