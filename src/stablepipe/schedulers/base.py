"""What every scheduler shares: config loading and saving, the step output, and the position in the schedule.

Three families build on `SchedulerMixin`:
- `AlphaScheduler`: DDPM-style samplers on ᾱ_t with integer timesteps (DDPM, DDIM, PNDM, LCM);
- `SigmaScheduler`: k-diffusion samplers on σ, x = x₀ + σ ε (Euler, Heun, DPM2, LMS, ...);
- `SolverScheduler` (in `multistep.py`): multistep solvers in log-SNR time (DPM-Solver, DEIS, UniPC).

State is explicit: `timesteps`/`sigmas` (set by `set_timesteps`), `step_index` (the position in them, found
from the first timestep seen or from `set_begin_index`), and each sampler's own named history, all reset by
`set_timesteps`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stablepipe.configuration import ConfigMixin
from stablepipe.outputs import BaseOutput
from stablepipe.random import randn_tensor
from stablepipe.schedulers.denoiser import (
    Scalings,
    threshold_sample,
    ve_model_input,
    ve_scalings,
    vp_noise_scalings,
    vp_scalings,
)
from stablepipe.schedulers.schedules import (
    interpolate_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_schedule,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)

HUB_KWARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token", "proxies")

# The public scheduler classes by diffusers name, in the order `compatibles` and SCHEDULER_CLASSES list them.
SCHEDULER_NAMES: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
)


@dataclass
class SchedulerOutput(BaseOutput):
    """The result of `step`: the next sample, and where the scheduler has it, its x₀ estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None
    denoised: torch.Tensor | None = None  # LCM's name for its x₀ estimate


@functools.cache
def _init_keys(cls: type) -> frozenset[str]:
    return frozenset(cls.init_keys())


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample values reshaped to (B, 1, 1, ...) to multiply a tensor shaped like `like`."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


class SchedulerMixin(ConfigMixin):
    """Loading, saving, compatibility and the position in the schedule, shared by all schedulers."""

    config_name = "scheduler_config.json"
    order = 1
    accepts_custom_timesteps = False  # whether set_timesteps(timesteps=[...]) is supported
    accepts_custom_sigmas = False  # whether set_timesteps(sigmas=[...]) is supported

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None, **kwargs: Any):
        """Build from `scheduler_config.json` in a folder or Hub repo; other keyword arguments override the config."""
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        config = cls.load_config(path_or_repo_id, subfolder=subfolder, **hub)
        return cls.from_config(config, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> Path:
        """Write `scheduler_config.json` into `save_directory` (created if needed)."""
        return self.save_config(save_directory)

    @property
    def compatibles(self) -> list[type]:
        """Every scheduler class that can be built from this one's config (all of ours)."""
        return scheduler_classes()

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _declared(self, key: str, default: Any = None) -> Any:
        """A config value this class takes in `__init__`; keys carried over from other classes are ignored."""
        return self.config[key] if key in _init_keys(type(self)) else default

    def _clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The config's dynamic `thresholding` (preferred) or `clip_sample` applied to an x₀ estimate."""
        if self._declared("thresholding", False):
            return threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        if self._declared("clip_sample", False):
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    # ------------------------------------------------------------------ noise schedule
    def _init_noise_schedule(self, *, floor_terminal_alpha: bool = False) -> None:
        """betas, alphas and ᾱ from the config; with zero terminal SNR, σ-based samplers floor ᾱ_T at 2⁻²⁴."""
        c = self.config
        betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas)
        rescale = self._declared("rescale_betas_zero_snr", False)
        self.betas = rescale_zero_terminal_snr(betas) if rescale else betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale and floor_terminal_alpha:
            self.alphas_cumprod[-1] = 2**-24  # keeps σ_T finite

    def _check_schedule_request(self, num_inference_steps, timesteps, sigmas) -> None:
        """Exactly one of the three must be given, and custom lists only where the class takes them."""
        name = type(self).__name__
        if timesteps is not None and not self.accepts_custom_timesteps:
            raise ValueError(f"{name} does not take custom `timesteps`; pass num_inference_steps instead")
        if sigmas is not None and not self.accepts_custom_sigmas:
            raise ValueError(f"{name} does not take custom `sigmas`; pass num_inference_steps instead")
        given = [x is not None for x in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas to set_timesteps")
        if timesteps is not None and self._sigma_kind() is not None:
            raise ValueError(f"custom `timesteps` cannot be combined with use_{self._sigma_kind()}_sigmas=True")

    def _sigma_kind(self) -> str | None:
        """Which resampled sigma schedule the config asks for: "karras", "exponential", "beta" or None."""
        kinds = [k for k in ("karras", "exponential", "beta") if self._declared(f"use_{k}_sigmas", False)]
        if len(kinds) > 1:
            raise ValueError(f"use only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas; got {kinds}")
        return kinds[0] if kinds else None

    # ------------------------------------------------------------------ position in the schedule
    @property
    def step_index(self) -> int | None:
        """Index of the current step in `timesteps`; None until the first `step` / `scale_model_input`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Where sampling starts (img2img starts part way); None means: find it from the first timestep."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before step()")

    @staticmethod
    def _noise_like(model_output: torch.Tensor, generator, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Fresh standard normal noise shaped like `model_output`, drawn as diffusers draws it."""
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype if dtype is None else dtype)

    @staticmethod
    def _output(return_dict: bool, prev_sample: torch.Tensor, **fields: torch.Tensor):
        output = SchedulerOutput(prev_sample=prev_sample, **fields)
        return output if return_dict else output.to_tuple()

    def _reset_position(self) -> None:
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of `timestep` in the schedule; of a repeated one, the second (img2img starts mid-pair)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule == timestep).nonzero()
        if len(indices) == 0:
            return self._index_of_unknown_timestep(timestep)
        return indices[1 if len(indices) > 1 else 0].item()

    def _index_of_unknown_timestep(self, timestep) -> int:
        raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps; pass one of scheduler.timesteps")

    def _ensure_step_index(self, timestep) -> int:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                if isinstance(timestep, torch.Tensor):
                    timestep = timestep.to(self.timesteps.device)
                self._step_index = self.index_for_timestep(timestep)
        return self._step_index

    def _noise_indices(self, timesteps: torch.Tensor, schedule: torch.Tensor) -> list[int]:
        """Schedule positions for `add_noise`: looked up, or the current / begin position when one is set."""
        if self._begin_index is None:
            return [self.index_for_timestep(t, schedule) for t in timesteps]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.shape[0]


def scheduler_classes() -> list[type[SchedulerMixin]]:
    """The public scheduler classes in SCHEDULER_NAMES order, found among SchedulerMixin's subclasses (walked
    recursively). Importing any scheduler module runs the schedulers package, which imports them all."""
    found: dict[str, type[SchedulerMixin]] = {}
    pending = SchedulerMixin.__subclasses__()
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("stablepipe.schedulers."):
            found.setdefault(cls.__name__, cls)
    missing = [name for name in SCHEDULER_NAMES if name not in found]
    if missing:
        raise RuntimeError(f"scheduler classes {missing} are not defined yet: import stablepipe.schedulers first")
    return [found[name] for name in SCHEDULER_NAMES]


class AlphaScheduler(SchedulerMixin):
    """DDPM-style samplers working on ᾱ_t at integer timesteps (Ho et al. 2020)."""

    init_noise_sigma = 1.0

    def _init_alpha_schedule(self) -> None:
        self._init_noise_schedule()
        self.one = torch.tensor(1.0)
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, self.config.num_train_timesteps)[::-1].copy())
        self._reset_position()

    def previous_timestep(self, timestep) -> int | torch.Tensor:
        """The next timestep of the schedule (−1 after the last); t − 1 before set_timesteps."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
        return torch.tensor(-1) if index == self.timesteps.shape[0] - 1 else self.timesteps[index + 1]

    def _integer_timesteps(self, num_inference_steps: int) -> np.ndarray:
        c = self.config
        if num_inference_steps > c.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps "
                f"({c.num_train_timesteps}), the steps the model was trained on"
            )
        spaced = spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing,
                                  steps_offset=c.steps_offset)
        return spaced.round().astype(np.int64)

    def _check_custom_timesteps(self, timesteps) -> None:
        if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"custom timesteps must be strictly descending, got {list(timesteps)}")
        if timesteps[0] >= self.config.num_train_timesteps:
            raise ValueError(f"custom timesteps must be < num_train_timesteps={self.config.num_train_timesteps}")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _vp_denoiser(self, alpha_prod: torch.Tensor, *, noise: bool = False) -> Scalings:
        """The VP denoiser at ᾱ_t (α = √ᾱ_t, s = √(1 − ᾱ_t)) for the config's prediction type: the scalings
        that give x₀ from the model output, or with `noise` those that give ε."""
        alpha, sigma = alpha_prod ** (0.5), (1 - alpha_prod) ** (0.5)
        scalings = vp_noise_scalings if noise else vp_scalings
        return scalings(alpha, sigma, self.config.prediction_type, scheduler=type(self).__name__)

    def _alpha_prod(self, timestep, final: torch.Tensor) -> torch.Tensor:
        """ᾱ at `timestep`, or `final` before the first training step (timestep < 0)."""
        return self.alphas_cumprod[timestep] if timestep >= 0 else final

    def _sqrt_alphas(self, like: torch.Tensor, timesteps: torch.Tensor):
        """(√ᾱ_t, √(1−ᾱ_t)) at `timesteps`, shaped to broadcast against `like`."""
        self.alphas_cumprod = self.alphas_cumprod.to(device=like.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=like.dtype)
        timesteps = timesteps.to(like.device)
        return (broadcast_to(alphas_cumprod[timesteps] ** 0.5, like),
                broadcast_to((1 - alphas_cumprod[timesteps]) ** 0.5, like))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (Ho et al. 2020, Eq. 4)."""
        sqrt_alpha, sqrt_one_minus_alpha = self._sqrt_alphas(original_samples, timesteps)
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (Salimans & Ho 2022, Sec. 4)."""
        sqrt_alpha, sqrt_one_minus_alpha = self._sqrt_alphas(sample, timesteps)
        return sqrt_alpha * noise - sqrt_one_minus_alpha * sample


class SigmaScheduler(SchedulerMixin):
    """k-diffusion samplers on σ (Karras et al. 2022): x = x₀ + σ ε, the network sees x / √(σ² + 1)."""

    round_resampled_timesteps = False  # DPM2 rounds the timesteps of Karras sigmas
    karras_from_config_range = True  # LMS and DPM-SDE take Karras' ends from the schedule, not the config

    def _init_sigma_schedule(self) -> None:
        """The noise schedule, and until `set_timesteps` the full training schedule."""
        self._sigma_kind()  # fails early on conflicting use_*_sigmas flags
        self._init_noise_schedule(floor_terminal_alpha=True)
        sigmas = torch.from_numpy(train_sigmas(self.alphas_cumprod)[::-1].copy())
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        t = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, t - 1, t, dtype=np.float32)[::-1].copy())
        self.num_inference_steps = None
        self._reset_position()

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Scale of the initial noise: σ_max, or √(σ_max² + 1) for "leading" spacing (as diffusers)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def _input_sigma(self) -> torch.Tensor:
        """σ of the point the network is evaluated at (two-stage samplers override this)."""
        return self.sigmas[self.step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / √(σ² + 1): the network's input in the VP scale it was trained on (Karras et al. 2022, c_in)."""
        self._ensure_step_index(timestep)
        return ve_model_input(sample, self._input_sigma())

    def _denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x₀ = D(x, σ) from the model output, by the config's prediction type (the VE denoiser)."""
        scalings = ve_scalings(sigma, self.config.prediction_type, scheduler=type(self).__name__)
        return scalings.combine(sample, model_output)

    def _spaced_float_timesteps(self, num_inference_steps: int, num_train_timesteps: int | None = None,
                                dtype=np.float32) -> np.ndarray:
        c = self.config
        spaced = spaced_timesteps(num_inference_steps, num_train_timesteps or c.num_train_timesteps,
                                  c.timestep_spacing, steps_offset=c.steps_offset)
        return spaced.astype(dtype)

    def _inference_sigmas(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(σ, timesteps) at the inference steps: interpolated, then resampled if the config asks (float64)."""
        return self._resample_sigmas(interpolate_sigmas(timesteps, train_sigmas(self.alphas_cumprod)), timesteps)

    def _resample_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Karras / exponential / beta sigmas over the range of `sigmas`, with their fractional timesteps."""
        kind = self._sigma_kind()
        if kind is None:
            return sigmas, timesteps
        use_config = kind != "karras" or self.karras_from_config_range
        sigma_range = {"sigma_min": self.config.get("sigma_min"), "sigma_max": self.config.get("sigma_max")}
        sigmas = sigma_schedule(kind, sigmas, len(timesteps), **(sigma_range if use_config else {}))
        new_timesteps = sigma_to_t(sigmas, np.log(train_sigmas(self.alphas_cumprod)))
        if kind == "karras" and self.round_resampled_timesteps:
            new_timesteps = new_timesteps.round()
        return sigmas, new_timesteps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x = x₀ + σ ε at each sample's timestep."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        sigma = broadcast_to(sigmas[self._noise_indices(timesteps, schedule)], original_samples)
        return original_samples + noise * sigma


def repeat_inner(values: torch.Tensor, *, last_too: bool = False) -> torch.Tensor:
    """[v0, v1, v1, v2, v2, ..., v_last]: every inner point is visited by both stages of a two-stage sampler."""
    middle = values[1:] if last_too else values[1:-1]
    return torch.cat([values[:1], middle.repeat_interleave(2), values[-1:]])


class TwoStageSigmaScheduler(SigmaScheduler):
    """Samplers taking two network evaluations per step (Heun, DPM2, DPM-SDE).

    `sample` holds the step's starting point between its two stages (None: the next call is a first stage).
    """

    order = 2

    def _init_two_stage(self) -> None:
        self._init_sigma_schedule()
        self.set_timesteps(self.config.num_train_timesteps, num_train_timesteps=self.config.num_train_timesteps)

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def _stage_sigmas(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, σ_next) of the whole step the current stage belongs to."""
        start = index if self.state_in_first_order else index - 1
        return self.sigmas[start], self.sigmas[start + 1]
