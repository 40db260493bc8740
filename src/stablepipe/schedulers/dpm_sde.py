"""DPM-Solver++(2S) SDE on σ with Brownian-tree noise (k-diffusion `sample_dpmpp_sde`).

The noise comes from our own Brownian tree, not from torchsde, so for the same seed it differs from
diffusers' DPMSolverSDEScheduler (whose tree is torchsde's); the deterministic part is identical.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.random import randn_tensor
from stablepipe.schedulers.base import TwoStageSigmaScheduler, repeat_inner
from stablepipe.schedulers.prediction import x0_from_sigma
from stablepipe.schedulers.schedules import sigma_to_t, train_sigmas


class BrownianTree:
    """A Brownian motion W on [t0, t1] revealed lazily: each new point is drawn from the Brownian bridge
    between its known neighbours (Lévy's construction), so overlapping increments stay consistent."""

    def __init__(self, shape, t0: float, t1: float, *, generator=None, dtype=torch.float32, device=None):
        self.t0, self.t1 = min(t0, t1), max(t0, t1)
        self._draw = lambda: randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
        self._times = [self.t0, self.t1]
        self._values = [torch.zeros(tuple(shape), dtype=dtype, device=device),
                        self._draw() * math.sqrt(self.t1 - self.t0)]

    def __call__(self, t: float) -> torch.Tensor:
        """W(t), for t clamped into [t0, t1]."""
        t = min(max(float(t), self.t0), self.t1)
        i = bisect.bisect_left(self._times, t)
        if self._times[i] == t:
            return self._values[i]
        a, b = self._times[i - 1], self._times[i]
        w_a, w_b = self._values[i - 1], self._values[i]
        mean = w_a + (t - a) / (b - a) * (w_b - w_a)
        value = mean + self._draw() * math.sqrt((t - a) * (b - t) / (b - a))
        self._times.insert(i, t)
        self._values.insert(i, value)
        return value

    def normalized_increment(self, s: float, t: float) -> torch.Tensor:
        """(W(t) − W(s)) / √|t − s|: a standard normal, correlated with the tree's other increments."""
        return (self(t) - self(s)) / math.sqrt(abs(float(t) - float(s)))


class DPMSolverSDEScheduler(TwoStageSigmaScheduler):
    """DPM-Solver++(2S) with SDE noise (Lu et al. 2022b, Alg. 1 with ancestral noise; k-diffusion
    `sample_dpmpp_sde`): a first stage to the midpoint in t = −log σ, a second from the start to σ_next,
    each an exponential-integrator step to σ_down plus Brownian noise of scale σ_up.

    Noise: a `BrownianTree` seeded by `noise_sampler_seed`, else by the `generator` given to `step`, else by
    torch's global RNG. It does not reproduce diffusers' torchsde noise for the same seed.
    Stage state: `sample` and `mid_point_sigma`; `noise_sampler` lives for one `set_timesteps`.
    """

    karras_from_config_range = False

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
        noise_sampler_seed: int | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._init_two_stage()
        self.noise_sampler_seed = noise_sampler_seed

    def _input_sigma(self):
        return self.sigmas[self.step_index] if self.state_in_first_order else self.mid_point_sigma

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None,
                      num_train_timesteps: int | None = None):
        """σ repeated for the two stages; timesteps alternate step start / log-σ midpoint."""
        self._check_schedule_request(num_inference_steps, timesteps, sigmas)
        self.num_inference_steps = num_inference_steps
        spaced = self._spaced_float_timesteps(num_inference_steps, num_train_timesteps, dtype=np.float64)
        sigmas, spaced = self._inference_sigmas(spaced)
        t = -np.log(sigmas)
        midpoints = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), np.log(train_sigmas(self.alphas_cumprod)))
        self.sigmas = repeat_inner(torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)))
        timesteps = torch.from_numpy(spaced)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        timesteps[1::2] = torch.from_numpy(midpoints)
        self.timesteps = timesteps.to(device=device)
        self.sample = self.mid_point_sigma = self.noise_sampler = None
        self._reset_position()

    def _make_noise_sampler(self, sample: torch.Tensor, generator) -> BrownianTree:
        if self.noise_sampler_seed is not None:
            generator = torch.Generator().manual_seed(self.noise_sampler_seed)
        elif generator is None:
            generator = torch.Generator().manual_seed(torch.randint(0, 2**63 - 1, []).item())
        positive = self.sigmas[self.sigmas > 0]
        return BrownianTree(sample.shape, positive.min().item(), self.sigmas.max().item(), generator=generator,
                            dtype=sample.dtype, device=sample.device)

    def _sde_stage(self, x0, sample, t, t_target, s_noise):
        """One stage from t = −log σ to t_target (k-diffusion `sample_dpmpp_sde`):
        x_next = (σ_down/σ) x − expm1(t − t_down) x₀ + σ_up z, with (σ_down, σ_up) the ancestral split."""
        sigma_from, sigma_to = t.neg().exp(), t_target.neg().exp()
        sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        ancestral_t = ((sigma_to**2 - sigma_up**2) ** 0.5).log().neg()
        x_next = (ancestral_t.neg().exp() / t.neg().exp()) * sample - (t - ancestral_t).expm1() * x0
        return x_next + self.noise_sampler.normalized_increment(sigma_from, sigma_to) * s_noise * sigma_up

    def step(self, model_output, timestep, sample, return_dict: bool = True, s_noise: float = 1.0, generator=None):
        """First stage to the log-σ midpoint, second from the step's start to σ_next; Euler into σ = 0."""
        index = self._ensure_step_index(timestep)
        if self.noise_sampler is None:
            self.noise_sampler = self._make_noise_sampler(sample, generator)
        first = self.state_in_first_order
        sigma, sigma_next = self._stage_sigmas(index)
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        t_mid = t + (t_next - t) * 0.5
        sigma_input = sigma if first else t_mid.neg().exp()
        x0 = x0_from_sigma(model_output, sample, sigma_input, self.config.prediction_type, "DPMSolverSDEScheduler")
        if sigma_next == 0:
            prev_sample = sample + (sample - x0) / sigma * (sigma_next - sigma)
        elif first:
            prev_sample = self._sde_stage(x0, sample, t, t_mid, s_noise)
            self.sample, self.mid_point_sigma = sample, t_mid.neg().exp()
        else:
            prev_sample = self._sde_stage(x0, self.sample, t, t_next, s_noise)
            self.sample = self.mid_point_sigma = None
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
