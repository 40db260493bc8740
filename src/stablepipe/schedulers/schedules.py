"""Noise-schedule math shared by every scheduler: betas, timestep spacing and sigma schedules.

Pure functions, written once. The float32 / float64 choices follow diffusers exactly (betas in float32
torch, spacing and sigma schedules in float64 numpy), so timesteps and sigmas agree with it to the last bit
that matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "exp", "laplace")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# ---------------------------------------------------------------------------------------------- betas


def _alpha_bar(kind: str):
    """ᾱ(t) for t in [0, 1], the continuous schedules behind `betas_for_alpha_bar`."""
    if kind == "cosine":  # Nichol & Dhariwal 2021, Eq. 17 (s = 0.008)
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(t * -12.0)
    if kind == "laplace":  # Laplace noise schedule (Hang et al. 2024), as a log-SNR
        def laplace(t: float) -> float:
            snr = math.exp(-0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6))
            return math.sqrt(snr / (1 + snr))

        return laplace
    raise ValueError(f"unknown alpha_bar kind {kind!r}; expected 'cosine', 'exp' or 'laplace'")


def betas_for_alpha_bar(num_train_timesteps: int, kind: str = "cosine", max_beta: float = 0.999) -> torch.Tensor:
    """β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T), capped at `max_beta` (Nichol & Dhariwal 2021, Eq. 17 and after)."""
    alpha_bar = _alpha_bar(kind)
    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """The training betas (float32, shape (T,)). `trained_betas`, when given, wins over the schedule."""
    n = num_train_timesteps
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":  # Ho et al. 2020
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion (Rombach et al. 2022): linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, "cosine")
    if beta_schedule in ("exp", "laplace"):
        return betas_for_alpha_bar(n, beta_schedule)
    if beta_schedule == "sigmoid":  # GeoDiff (Xu et al. 2022)
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ) so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for every training timestep, ascending in t (float32 numpy)."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


# ---------------------------------------------------------------------------------------------- timesteps


def spaced_timesteps(
    num_inference_steps: int, num_train_timesteps: int, spacing: str, *, steps_offset: int = 0
) -> np.ndarray:
    """Descending float64 timesteps for `spacing` ("Common Diffusion Noise Schedules...", Lin et al. 2023, Table 2).

    "linspace" values are left unrounded (discrete schedulers round them, sigma schedulers interpolate).
    """
    n, t = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, t - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (t // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(t, 0, -t / n)) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")


def solver_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    spacing: str,
    *,
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """Integer timesteps of the multistep ODE solvers: N + 1 points with the final 0 dropped (int64).

    `last_timestep` (≤ T) cuts the schedule short where λ is clipped (`lambda_min_clipped`).
    """
    n, last = num_inference_steps, num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "trailing":
        return (np.arange(last, 0, -num_train_timesteps / n).round() - 1).astype(np.int64)
    spaced = spaced_timesteps(n + 1, last, spacing, steps_offset=steps_offset)
    return spaced.round()[:-1].astype(np.int64)


def interpolate_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """σ at (fractional) `timesteps`, linear in t between the training sigmas (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray, *, blend_dtype=None) -> np.ndarray:
    """The fractional training timestep of each σ, by linear interpolation in log σ (inverse of the above).

    `blend_dtype=np.float32` does the final interpolation in float32, as diffusers does where it runs this
    on tensors (DPM2's midpoints); by default it is float64.
    """
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    low = low if blend_dtype is None else low.astype(blend_dtype)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


# ---------------------------------------------------------------------------------------------- sigmas


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (Karras et al. 2022, Eq. 5)."""
    ramp = np.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """σ evenly spaced in log σ, from σ_max down to σ_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """σ placed at the quantiles of a Beta(α, β) distribution ("Beta Sampling is All You Need", Lee et al. 2024)."""
    quantiles = [beta_ppf(float(q), alpha, beta) for q in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def sigma_schedule(kind: str, in_sigmas: np.ndarray, n: int, *, sigma_min=None, sigma_max=None) -> np.ndarray:
    """Resample a descending sigma schedule as "karras", "exponential" or "beta" over its own range.

    `sigma_min` / `sigma_max` (from the config, when set) override the range's ends.
    """
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    schedules = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}
    return schedules[kind](lo, hi, n)


def lu_lambdas(lambda_max: float, lambda_min: float, n: int) -> np.ndarray:
    """log-SNR λ evenly spaced ("uniform logSNR" steps of DPM-Solver, Lu et al. 2022, Sec. 3.3)."""
    return lambda_max + np.linspace(0, 1, n) * (lambda_min - lambda_max)


def ancestral_step(sigma_from, sigma_to):
    """(σ_down, σ_up) splitting a step into a deterministic part and fresh noise (k-diffusion, eta = 1)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


# ---------------------------------------------------------------------------------------------- Beta quantile


def _log_beta_function(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """Continued fraction for the incomplete beta function, by the modified Lentz method."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return result


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta_function(a, b)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile function, by bisection on `beta_cdf` to full float64 precision."""
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return 0.5 * (lo + hi)
