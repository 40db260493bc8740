"""The base of the multistep ODE/SDE solvers in log-SNR time: DPM-Solver(++), DEIS and UniPC.

They work in the variance-preserving parameterisation x_t = α_t x₀ + σ_t ε with α_t = 1/√(σ² + 1) and
σ_t = σ α_t (σ the k-diffusion sigma), stepping in λ = log(α_t/σ_t). History: `model_outputs`, the last
`solver_order` converted model outputs (oldest first), and `lower_order_nums`, how many steps have been
taken (capped at the order), so the first steps use lower orders. Both are reset by `set_timesteps`.
"""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.schedulers.base import SchedulerMixin, broadcast_to
from stablepipe.schedulers.denoiser import Scalings, vp_alpha_sigma, vp_noise_scalings, vp_scalings
from stablepipe.schedulers.schedules import (
    interpolate_sigmas,
    lu_lambdas,
    sigma_schedule,
    sigma_to_t,
    solver_timesteps,
    train_sigmas,
)


class SolverScheduler(SchedulerMixin):
    """Shared schedule, parameterisation and history of the multistep solvers."""

    init_noise_sigma = 1.0

    def _init_solver(self) -> None:
        self._sigma_kind()  # fails early on conflicting use_*_sigmas flags
        self._init_noise_schedule(floor_terminal_alpha=True)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        t = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, t - 1, t, dtype=np.float32)[::-1].copy())
        self.num_inference_steps = None
        self._reset_history()
        self._reset_position()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _push_model_output(self, model_output: torch.Tensor) -> None:
        self.model_outputs = [*self.model_outputs[1:], model_output]

    def _count_step(self) -> None:
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1

    # ------------------------------------------------------------------ parameterisation
    alpha_sigma = staticmethod(vp_alpha_sigma)  # (α_t, σ_t) of a k-diffusion σ

    def _log_snr(self, index: int) -> torch.Tensor:
        """λ = log α_t − log σ_t at position `index` of the schedule."""
        alpha_t, sigma_t = self.alpha_sigma(self.sigmas[index])
        return torch.log(alpha_t) - torch.log(sigma_t)

    def _alpha_sigma_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha_sigma(self.sigmas[index])

    def _step_denoiser(self, prediction_type: str | None = None, *, noise: bool = False) -> Scalings:
        """The VP denoiser at the current step: the scalings that give x₀ (with `noise`: ε) from an output of
        `prediction_type` (default: the config's)."""
        alpha_t, sigma_t = self._alpha_sigma_at(self.step_index)
        scalings = vp_noise_scalings if noise else vp_scalings
        return scalings(alpha_t, sigma_t, prediction_type or self.config.prediction_type, scheduler=type(self).__name__)

    # ------------------------------------------------------------------ schedule
    def _clipped_last_timestep(self) -> int:
        """T, shortened so that λ stays above `lambda_min_clipped` (Lu et al. 2022b, for cosine schedules)."""
        clip = self._declared("lambda_min_clipped", -float("inf"))
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), clip)
        return self.config.num_train_timesteps - int(clipped)

    def _spaced_solver_timesteps(self, num_inference_steps: int) -> np.ndarray:
        spacing = self._declared("timestep_spacing", "linspace")
        return solver_timesteps(num_inference_steps, self.config.num_train_timesteps, spacing,
                                steps_offset=self._declared("steps_offset", 0),
                                last_timestep=self._clipped_last_timestep())

    def _solver_sigmas(self, timesteps: np.ndarray, n: int, *, round_resampled: bool = True):
        """(σ, timesteps, resampled?) at the inference steps; resampled σ span the whole training range."""
        sigmas = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        kind = "lu" if self._declared("use_lu_lambdas", False) else self._sigma_kind()
        if kind is None:
            return interpolate_sigmas(timesteps, sigmas), timesteps, False
        if kind == "lu":  # uniform in log σ = −λ (Lu et al. 2022, Sec. 3.3)
            flipped = np.flip(log_sigmas.copy())
            new_sigmas = np.exp(lu_lambdas(flipped[0].item(), flipped[-1].item(), n))
        else:
            new_sigmas = sigma_schedule(kind, np.flip(sigmas).copy(), n, sigma_min=self.config.get("sigma_min"),
                                        sigma_max=self.config.get("sigma_max"))
        new_timesteps = sigma_to_t(new_sigmas, log_sigmas)
        if kind in ("karras", "lu") and round_resampled:
            new_timesteps = new_timesteps.round()
        return new_sigmas, new_timesteps, True

    def _train_sigma_min(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5

    def _final_sigma_for(self, final_sigmas_type: str):
        if final_sigmas_type == "sigma_min":
            return self._train_sigma_min()
        if final_sigmas_type == "zero":
            return 0
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', not {final_sigmas_type!r}")

    def _store_schedule(self, sigmas: np.ndarray, final_sigma, timesteps: np.ndarray, device) -> None:
        """Keep σ (with the final one appended, float32) and the integer timesteps; reset history and position."""
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [final_sigma]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()
        self._reset_position()

    # ------------------------------------------------------------------ sampling-loop API
    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def _index_of_unknown_timestep(self, timestep) -> int:
        return len(self.timesteps) - 1  # as diffusers: an unknown timestep means the last step

    def _final_step_first_order(self) -> bool:
        """Whether the last step is always first order, whatever the schedule's length."""
        return False

    def _solver_order_now(self) -> int:
        """Order of this step: lower during warm-up and, with `lower_order_final`, for the last steps of
        schedules shorter than 15 (Lu et al. 2022b, Sec. 5: higher orders are unstable there)."""
        c, n, i = self.config, len(self.timesteps), self.step_index
        short = c.lower_order_final and n < 15
        last_first_order = i == n - 1 and (short or self._final_step_first_order())
        if c.solver_order == 1 or self.lower_order_nums < 1 or last_first_order:
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or (i == n - 2 and short):
            return 2
        return 3

    def _begin_multistep(self, model_output: torch.Tensor, timestep, sample: torch.Tensor):
        """The start of every multistep `step`: find the position and this step's order, convert the model
        output and push it onto the history. Returns (order, converted output)."""
        self._require_timesteps()
        self._ensure_step_index(timestep)
        order = self._solver_order_now()
        converted = self.convert_model_output(model_output, sample=sample)
        self._push_model_output(converted)
        return order, converted

    def _x0_model_output(self, model_output: torch.Tensor) -> torch.Tensor:
        """Drop a learned-variance half of the channels (models that predict [ε, variance])."""
        if self._declared("variance_type") in ("learned", "learned_range"):
            return model_output[:, :3]
        return model_output

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x_t = α_t x₀ + σ_t ε at each sample's position in the schedule."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        sigma = broadcast_to(sigmas[self._noise_indices(timesteps, schedule)], original_samples)
        alpha_t, sigma_t = self.alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
