"""DPM-Solver++(2S) SDE on σ with Brownian-tree noise (k-diffusion `sample_dpmpp_sde`).

The Brownian motion is torchsde's `BrownianInterval`, built as diffusers builds it (tolerance 1e-6, pool of 24,
halfway tree), so a tree seed gives diffusers' noise bit for bit. torchsde is optional: only this scheduler
imports it, when it first draws noise.
"""

from __future__ import annotations

import numpy as np
import torch

from stablepipe.configuration import register_to_config
from stablepipe.schedulers.base import TwoStageSigmaScheduler, repeat_inner
from stablepipe.schedulers.sampling import to_d
from stablepipe.schedulers.schedules import sigma_to_t, train_sigmas

Seeds = int | list[int]


def brownian_interval_class():
    """torchsde's `BrownianInterval`, or an ImportError that says how to install it."""
    try:
        from torchsde import BrownianInterval
    except ImportError as error:
        raise ImportError(
            "DPMSolverSDEScheduler draws its Brownian noise with torchsde (as diffusers does): pip install torchsde"
        ) from error
    return BrownianInterval


def tree_seeds(generator=None) -> Seeds:
    """The tree seed(s): one drawn from each generator (a list gives one tree per sample), or, with none, one
    from torch's global RNG, as diffusers draws it."""
    if generator is None:
        return torch.randint(0, 2**63 - 1, []).item()
    if isinstance(generator, list):
        return [tree_seeds(g) for g in generator]
    return torch.randint(0, 2**63 - 1, [], generator=generator, device=generator.device).item()


class BrownianTree:
    """A Brownian motion W on [t0, t1] with W(t0) = 0, fixed by its seed (diffusers' `BatchedBrownianTree`):
    one tree for the whole sample, or with a list of seeds one tree per sample along dim 0."""

    def __init__(self, shape, t0: float, t1: float, *, seed: Seeds | None = None, generator=None,
                 dtype=torch.float32, device=None):
        self.t0, self.t1 = sorted((float(t0), float(t1)))
        seeds = tree_seeds(generator) if seed is None else seed
        self.batched = isinstance(seeds, list)
        if self.batched and len(seeds) != shape[0]:
            raise ValueError(f"got {len(seeds)} noise seeds or generators for {shape[0]} samples; give one per sample")
        size = tuple(shape)[1:] if self.batched else tuple(shape)
        interval = brownian_interval_class()
        self.trees = [
            interval(t0=self.t0, t1=self.t1, size=size, dtype=dtype, device=device, entropy=s, tol=1e-6,
                     pool_size=24, halfway_tree=True)
            for s in (seeds if self.batched else [seeds])
        ]

    def increment(self, s, t) -> torch.Tensor:
        """W(t) − W(s), for s and t in [t0, t1] (clamped into it, as torchsde would, without its warning)."""
        s, t = (min(max(float(x), self.t0), self.t1) for x in (s, t))
        low, high, sign = (s, t, 1.0) if s < t else (t, s, -1.0)
        w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return w if self.batched else w[0]

    def __call__(self, t: float) -> torch.Tensor:
        """W(t), for t clamped into [t0, t1]."""
        return self.increment(self.t0, t)

    def normalized_increment(self, s, t) -> torch.Tensor:
        """(W(t) − W(s)) / √|t − s|: a standard normal, correlated with the tree's other increments."""
        return self.increment(s, t) / (torch.as_tensor(t) - torch.as_tensor(s)).abs().sqrt()


class DPMSolverSDEScheduler(TwoStageSigmaScheduler):
    """DPM-Solver++(2S) with SDE noise (Lu et al. 2022b, Alg. 1 with ancestral noise; k-diffusion
    `sample_dpmpp_sde`): a first stage to the midpoint in t = −log σ, a second from the start to σ_next,
    each an exponential-integrator step to σ_down plus Brownian noise of scale σ_up.

    Noise: a `BrownianTree` (torchsde) seeded by `noise_sampler_seed` (diffusers' noise for the same seed), else
    by a seed drawn from the `generator` given to `step` (the same generator, the same picture; a list gives each
    sample its own tree), else by torch's global RNG (as diffusers, whose `step` takes no generator).
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
        positive = self.sigmas[self.sigmas > 0]
        return BrownianTree(sample.shape, positive.min().item(), self.sigmas.max().item(), seed=self.noise_sampler_seed,
                            generator=generator, dtype=sample.dtype, device=sample.device)

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
        x0 = self._denoised(model_output, sample, sigma_input)
        if sigma_next == 0:
            prev_sample = sample + to_d(sample, sigma, x0) * (sigma_next - sigma)
        elif first:
            prev_sample = self._sde_stage(x0, sample, t, t_mid, s_noise)
            self.sample, self.mid_point_sigma = sample, t_mid.neg().exp()
        else:
            prev_sample = self._sde_stage(x0, self.sample, t, t_next, s_noise)
            self.sample = self.mid_point_sigma = None
        self._step_index += 1
        return self._output(return_dict, prev_sample, pred_original_sample=x0)
