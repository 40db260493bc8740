"""The samplers as plain functions of (denoiser, x, σ schedule), in the style of k-diffusion's `sampling.py`.

`denoiser(x, sigma) -> x0` is the VE denoiser D(x, σ) (`denoiser.Denoiser` wraps a network that predicts ε, v or
x₀); x is a VE sample, x = x₀ + σ ε, starting at σ_0 · noise; `sigmas` is descending and ends at 0 (a scheduler's
`sigmas`). The scheduler classes take the same steps one `step()` call at a time, and
tests/test_sampling_functions.py runs both on the same denoiser: these functions are the math, written once
without the step-by-step state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from stablepipe.random import Generator, randn_tensor
from stablepipe.schedulers.schedules import ancestral_step

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ = (x − D(x, σ))/σ, the probability-flow ODE in σ (Karras et al. 2022, Eq. 3 with σ(t) = t)."""
    return (x - denoised) / sigma


def lms_coefficient(nodes: list[float], j: int, start: float, end: float) -> float:
    """∫ ℓ_j(σ) dσ from `start` to `end`, ℓ_j the Lagrange basis polynomial of node j (Adams–Bashforth
    weights on a non-uniform grid; k-diffusion `linear_multistep_coeff`). Integrated exactly."""
    basis = np.poly1d([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.poly1d([1.0, -node]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(end) - antiderivative(start))


def sample_euler(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + to_d(x, sigma, denoiser(x, sigma)) * (sigma_next - sigma)
    return x


def sample_euler_ancestral(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           generator: Generator = None, s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`, η = 1): an Euler step down to σ_down, then fresh noise
    of scale σ_up, σ_down² + σ_up² = σ_next². Noise is drawn on every step, the last one too (where σ_up = 0), as
    diffusers draws it, so a generator shared with the scheduler class stays in step."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x = x + to_d(x, sigma, denoiser(x, sigma)) * (sigma_down - sigma)
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + noise * sigma_up * s_noise
    return x


def sample_heun(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn): an Euler predictor to σ_next, then
    the trapezoidal corrector with the slope there; the last step, into σ = 0, is Euler's."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = to_d(x, sigma, denoiser(x, sigma))
        predicted = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = predicted
        else:
            d_next = to_d(predicted, sigma_next, denoiser(predicted, sigma_next))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def sample_lms(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, order: int = 4) -> torch.Tensor:
    """Linear multistep (k-diffusion `sample_lms`): x_next = x + Σ_j c_j d_{i−j} over the slopes at the last
    `order` σ, c_j the integrals of their Lagrange basis over [σ_i, σ_next]; lower orders while warming up."""
    nodes = [float(s) for s in sigmas]
    slopes: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        slopes = [*slopes, to_d(x, sigmas[i], denoiser(x, sigmas[i]))][-order:]
        now = min(i + 1, order)
        history = [nodes[i - k] for k in range(now)]
        weights = [lms_coefficient(history, j, nodes[i], nodes[i + 1]) for j in range(now)]
        x = x + sum(c * d for c, d in zip(weights, reversed(slopes)))
    return x


def sample_dpmpp_2m(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in t = −log σ: x_next = (σ_next/σ) x − (e^−h − 1) D̂, with D̂
    this step's x₀ extrapolated through the last one, (1 + 1/2r) D_i − (1/2r) D_{i−1}, r = h_{i−1}/h_i;
    first order on the first step and on the last, into σ = 0."""
    previous = None  # (t, x₀) of the last step
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        t, t_next = -sigma.log(), -sigma_next.log()
        h = t_next - t
        extrapolated = denoised
        if previous is not None and sigma_next > 0:
            r = (t - previous[0]) / h
            extrapolated = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous[1]
        x = (sigma_next / sigma) * x - torch.expm1(-h) * extrapolated
        previous = (t, denoised)
    return x
