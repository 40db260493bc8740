"""The denoiser beneath every scheduler: how the network's output F becomes the clean-sample estimate x₀.

Each prediction type is one linear map of the noisy sample x and the output F (Karras et al. 2022, Eq. 7;
sgm's `denoiser_scaling.py`, k-diffusion's `external.py`):

    x₀ = D(x, σ) = c_skip · x + c_out · F(c_in · x, c_noise)

Two parameterisations of the noisy sample appear, and they are one up to scale:

- variance exploding (VE), k-diffusion's: x = x₀ + σ ε. The network was trained on the VP scale, so it is fed
  c_in · x = x / √(σ² + 1). The σ samplers (Euler, Euler a, Heun, DPM2, LMS, DPM-SDE) work here.
- variance preserving (VP): x = α x₀ + s ε with α² + s² = 1 (DDPM: α = √ᾱ_t, s = √(1 − ᾱ_t)), fed to the network
  as it is (c_in = 1). DDIM, DDPM, PNDM, LCM and the log-SNR solvers (DPM-Solver, DEIS, UniPC) work here.
  x_VP = α x_VE with α = 1/√(σ² + 1) and s = σ α.

                    VE c_skip      VE c_out          VP c_skip   VP c_out
    epsilon         1              −σ                1/α         −s/α
    v_prediction    1/(σ² + 1)     −σ/√(σ² + 1)      α           −s          (v = α ε − s x₀, Salimans & Ho 2022)
    sample          0              1                 0           1

Karras' EDM preconditioning (`karras_scalings`, σ_data = 1) is the VE v row with c_out's sign flipped: its F is −v.
Samplers that integrate the noise rather than x₀ (DDIM, PNDM, DPM-Solver, DEIS, UniPC with predict_x0=False) take
ε = c_skip · x + c_out · F from the same table solved for ε (`vp_noise_scalings`).

The coefficients are applied in diffusers' order of operations (see `Ratio`, `TensorFirst`), so each step's
numbers are diffusers' own, bit for bit, in float32 and in half precision.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

Coefficient = float | torch.Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def unknown_prediction_type(prediction_type: str, scheduler: str, allowed=PREDICTION_TYPES) -> ValueError:
    """The error for a prediction type a scheduler cannot convert."""
    return ValueError(
        f"prediction_type {prediction_type!r} is not supported by {scheduler}; use one of {', '.join(allowed)}"
    )


class Ratio(NamedTuple):
    """A coefficient num/den applied by dividing last, (num · t) / den, as diffusers rounds it. Two terms over the
    same `den` are summed before the one division: (x − s F)/α, not x/α − (s/α) F."""

    num: Coefficient
    den: Coefficient


class TensorFirst(NamedTuple):
    """A coefficient applied as t · c rather than c · t, where diffusers writes it so: PyTorch's CPU kernels
    keep a 0-dim second operand in float32 but round a first one to the tensor's float16/bfloat16."""

    value: Coefficient


def _exactly(coefficient, value: float) -> bool:
    return isinstance(coefficient, (int, float)) and coefficient == value


def _apply(coefficient, tensor: torch.Tensor) -> torch.Tensor | None:
    """coefficient · tensor; None for an exact 0, the tensor itself for an exact 1 (same values, same dtype)."""
    if isinstance(coefficient, Ratio):
        scaled = _apply(coefficient.num, tensor)
        return None if scaled is None else scaled / coefficient.den
    if isinstance(coefficient, TensorFirst):
        return tensor * coefficient.value
    if _exactly(coefficient, 0):
        return None
    return tensor if _exactly(coefficient, 1) else coefficient * tensor


class Scalings(NamedTuple):
    """The four numbers of a denoiser at one noise level: D(x) = c_skip · x + c_out · F(c_in · x, c_noise).

    Each is a number or a 0-dim tensor, some wrapped to say in which order diffusers rounds them (`Ratio`,
    `TensorFirst`), so that every step gives diffusers' numbers bit for bit. `c_noise` is None where the network
    is fed the schedule's own timestep (the discrete models: the scheduler's `timesteps` hold it); a continuous
    model takes ¼ log σ (Karras et al. 2022, Table 1).
    """

    c_skip: Coefficient | Ratio | TensorFirst
    c_out: Coefficient | Ratio | TensorFirst
    c_in: Coefficient | Ratio = 1.0
    c_noise: torch.Tensor | None = None

    def combine(self, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x₀ = c_skip · x + c_out · F."""
        skip, out, den = self.c_skip, self.c_out, None
        if isinstance(skip, Ratio) and isinstance(out, Ratio) and skip.den is out.den:
            skip, out, den = skip.num, out.num, skip.den  # one division after the sum
        terms = [term for term in (_apply(skip, sample), _apply(out, model_output)) if term is not None]
        total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return total if den is None else total / den

    def scale_input(self, sample: torch.Tensor) -> torch.Tensor:
        """c_in · x, what the network is fed."""
        return _apply(self.c_in, sample)


def vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, s) = (1/√(σ² + 1), σ/√(σ² + 1)): the VP coefficients of a VE σ, x_VP = α x_VE."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _ve_input_scale(sigma: torch.Tensor) -> Ratio:
    return Ratio(1.0, (sigma**2 + 1) ** 0.5)  # c_in = 1/√(σ² + 1), applied as diffusers does: x / √(σ² + 1)


def ve_model_input(sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c_in · x = x / √(σ² + 1): a VE sample brought to the unit-variance scale the network was trained on."""
    return _apply(_ve_input_scale(sigma), sample)


def ve_scalings(sigma: torch.Tensor, prediction_type: str, *, scheduler: str = "this scheduler") -> Scalings:
    """x₀ from F in k-diffusion's VE parameterisation x = x₀ + σ ε (the table above, left half)."""
    c_in = _ve_input_scale(sigma)
    if prediction_type == "epsilon":
        return Scalings(1.0, -sigma, c_in)
    if prediction_type == "v_prediction":
        return Scalings(Ratio(1.0, sigma**2 + 1), TensorFirst(-sigma / (sigma**2 + 1) ** 0.5), c_in)
    if prediction_type in ("sample", "original_sample"):
        return Scalings(0.0, 1.0, c_in)
    raise unknown_prediction_type(prediction_type, scheduler)


def vp_scalings(alpha: Coefficient, sigma: Coefficient, prediction_type: str, *,
                scheduler: str = "this scheduler") -> Scalings:
    """x₀ from F in the VP parameterisation x = α x₀ + s ε (the table above, right half)."""
    if prediction_type == "epsilon":
        return Scalings(Ratio(1.0, alpha), Ratio(-sigma, alpha))
    if prediction_type == "v_prediction":
        return Scalings(alpha, -sigma)
    if prediction_type == "sample":
        return Scalings(0.0, 1.0)
    raise unknown_prediction_type(prediction_type, scheduler)


def vp_noise_scalings(alpha: Coefficient, sigma: Coefficient, prediction_type: str, *,
                      scheduler: str = "this scheduler") -> Scalings:
    """ε = c_skip · x + c_out · F in the VP parameterisation: the table solved for ε instead of x₀
    (ε from x₀ is `vp_noise_scalings(α, s, "sample")`)."""
    if prediction_type == "epsilon":
        return Scalings(0.0, 1.0)
    if prediction_type == "v_prediction":
        return Scalings(sigma, alpha)
    if prediction_type == "sample":
        return Scalings(Ratio(1.0, sigma), Ratio(-alpha, sigma))
    raise unknown_prediction_type(prediction_type, scheduler)


def karras_noise_level(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = ¼ log σ, the noise level a continuous-time model is fed (Karras et al. 2022, Table 1)."""
    return 0.25 * sigma.log()


def karras_scalings(sigma: torch.Tensor, sigma_data: float = 1.0) -> Scalings:
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²),
    c_in = 1/√(σ² + σ_d²), c_noise = ¼ log σ, as plain tensors. With σ_d = 1 it is the VE v row with F = −v (the
    latent upscaler's denoiser)."""
    variance = sigma**2 + sigma_data**2
    c_in = variance**-0.5
    return Scalings(sigma_data**2 / variance, sigma * sigma_data * c_in, c_in, karras_noise_level(sigma))


def consistency_scalings(timestep, timestep_scaling: float, sigma_data: float = 0.5) -> Scalings:
    """The boundary condition of consistency models, applied to an x₀ estimate: D = c_skip · x + c_out · x̂₀ with
    c_skip = σ_d²/(t² + σ_d²), c_out = t/√(t² + σ_d²) at t = timestep · scaling (Song et al. 2023, Eq. 6;
    LCM, Luo et al. 2023, Sec. 4.2)."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return Scalings(c_skip, c_out)


class Denoiser:
    """A network that predicts ε, v or x₀ from (c_in · x, σ), wrapped as k-diffusion's D(x, σ) → x₀ in the VE
    parameterisation: what the functions in `sampling.py` call."""

    def __init__(self, model, prediction_type: str = "epsilon"):
        ve_scalings(torch.ones(()), prediction_type, scheduler="Denoiser")  # fails early on an unknown type
        self.model, self.prediction_type = model, prediction_type

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        scalings = ve_scalings(sigma, self.prediction_type, scheduler="Denoiser")
        return scalings.combine(x, self.model(scalings.scale_input(x), sigma))  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------- x₀ clipping


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
