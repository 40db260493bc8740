"""What the network predicts (ε, v or x₀), turned into the clean-sample estimate x₀ the samplers use.

Two parameterisations appear: the variance-exploding one of k-diffusion, x = x₀ + σ ε (with the network fed
x / sqrt(σ² + 1)), and the variance-preserving one, x = α x₀ + s ε with α² + s² = 1.
"""

from __future__ import annotations

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _unknown(prediction_type: str, scheduler: str, allowed=PREDICTION_TYPES) -> ValueError:
    return ValueError(
        f"prediction_type {prediction_type!r} is not supported by {scheduler}; use one of {', '.join(allowed)}"
    )


def x0_from_sigma(model_output, sample, sigma, prediction_type: str, scheduler: str = "this scheduler"):
    """x₀ in the k-diffusion (VE) parameterisation; v-prediction as in Salimans & Ho 2022, Sec. 4."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise _unknown(prediction_type, scheduler)


def x0_and_eps_from_alpha(model_output, sample, alpha_prod, prediction_type: str, scheduler: str = "this scheduler"):
    """(x₀, ε) from the model output given ᾱ_t, in the DDPM (VP) parameterisation x_t = √ᾱ x₀ + √(1−ᾱ) ε."""
    beta_prod = 1 - alpha_prod
    if prediction_type == "epsilon":
        return (sample - beta_prod ** (0.5) * model_output) / alpha_prod ** (0.5), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod ** (0.5) * model_output) / beta_prod ** (0.5)
    if prediction_type == "v_prediction":
        x0 = (alpha_prod**0.5) * sample - (beta_prod**0.5) * model_output
        return x0, (alpha_prod**0.5) * model_output + (beta_prod**0.5) * sample
    raise _unknown(prediction_type, scheduler)


def x0_from_alpha_sigma(model_output, sample, alpha_t, sigma_t, prediction_type: str, scheduler: str):
    """x₀ given the VP coefficients (α_t, σ_t) of the ODE solvers (DPM-Solver++ "data prediction")."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    raise _unknown(prediction_type, scheduler)


def eps_from_alpha_sigma(model_output, sample, alpha_t, sigma_t, prediction_type: str, scheduler: str):
    """ε given the VP coefficients (α_t, σ_t) of the ODE solvers (DPM-Solver "noise prediction")."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise _unknown(prediction_type, scheduler)


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3): clip each image to its `ratio` quantile
    of |x₀| (at least 1, at most `max_value`) and rescale into [-1, 1]."""
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # quantile needs float32; clamp is not implemented for CPU half
    flat = sample.reshape(batch, channels * int(np.prod(rest)))  # (B, C*H*W)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)

