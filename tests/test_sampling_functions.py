"""The plain sampler functions (schedulers/sampling.py) against the scheduler classes, and the denoiser's table.

Each case runs a scheduler class's full loop (scale_model_input, network, step) and the matching function on the
same toy network wrapped as a denoiser D(x, σ), from the same noise and with the same generator draws. The σ
samplers work in the same VE frame as their functions and give the same numbers bit for bit; DPM-Solver++(2M)
steps the VP sample α x, so it agrees to rounding.
"""

from __future__ import annotations

import pytest
import torch

import stablepipe.schedulers as ours
from stablepipe.schedulers import sampling
from stablepipe.schedulers.denoiser import (
    Denoiser,
    karras_scalings,
    ve_model_input,
    ve_scalings,
    vp_alpha_sigma,
    vp_noise_scalings,
    vp_scalings,
)

SHAPE = (2, 4, 8, 8)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def network(model_input: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A fixed linear function of the network input and σ standing in for a UNet (roughly an ε-predictor)."""
    return (0.8 + 0.01 * sigma) * model_input + 0.1 * model_input.roll(1, dims=-1) - 0.02 * sigma


def class_loop(scheduler, noise: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The loop a pipeline runs, with the network told the σ of each evaluation."""
    kwargs = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)]
        model_output = network(scheduler.scale_model_input(x, t), sigma)
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    return x


# (function, scheduler class, draws noise?, the same bits?)
SAMPLERS = [
    pytest.param(sampling.sample_euler, "EulerDiscreteScheduler", False, True, id="euler"),
    pytest.param(sampling.sample_euler_ancestral, "EulerAncestralDiscreteScheduler", True, True, id="euler_a"),
    pytest.param(sampling.sample_heun, "HeunDiscreteScheduler", False, True, id="heun"),
    pytest.param(sampling.sample_lms, "LMSDiscreteScheduler", False, True, id="lms"),
    pytest.param(sampling.sample_dpmpp_2m, "DPMSolverMultistepScheduler", False, False, id="dpmpp_2m"),
]
CONFIGS = [
    pytest.param({}, 10, id="default"),
    pytest.param({**SD, "use_karras_sigmas": True}, 12, id="SD-karras"),
    pytest.param({**SD, "timestep_spacing": "trailing"}, 7, id="SD-trailing"),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("config, steps", CONFIGS)
@pytest.mark.parametrize("function, cls_name, seeded, bitwise", SAMPLERS)
def test_function_matches_scheduler_class(function, cls_name, seeded, bitwise, config, steps, prediction_type):
    cls = getattr(ours, cls_name)
    if "use_karras_sigmas" in config and "use_karras_sigmas" not in cls.init_keys():
        pytest.skip(f"{cls_name} has no Karras sigmas")
    scheduler = cls.from_config({**config, "prediction_type": prediction_type})
    scheduler.set_timesteps(steps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    seed = 7 if seeded else None
    from_class = class_loop(scheduler, noise, seed)

    sigmas = torch.unique_consecutive(scheduler.sigmas)  # two-stage classes list inner σ twice
    x = noise * scheduler.init_noise_sigma
    if isinstance(scheduler, ours.DPMSolverMultistepScheduler):
        x = x / vp_alpha_sigma(sigmas[0])[0]  # the solver steps x_VP = α x_VE
    kwargs = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    from_function = function(Denoiser(network, prediction_type), x, sigmas, **kwargs)

    assert torch.isfinite(from_class).all() and (from_class - noise).abs().max() > 0.1  # the loop did something
    if bitwise:
        assert torch.equal(from_function, from_class)
    else:
        assert (from_function - from_class).abs().max() < 1e-5 * max(1.0, from_class.abs().max().item())  # float32


def test_ancestral_draws_follow_the_generator():
    """Other seeds give other pictures: the function uses the generator it is given, not the global RNG."""
    scheduler = ours.EulerAncestralDiscreteScheduler.from_config(SD)
    scheduler.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    denoiser = Denoiser(network)
    runs = [sampling.sample_euler_ancestral(denoiser, x, scheduler.sigmas, generator=torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and (runs[0] - runs[2]).abs().max() > 1e-3


def _known_state(dtype=torch.float64):
    """A clean sample, its noise and one VE σ with the matching VP (α, s)."""
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(SHAPE, generator=generator, dtype=dtype), torch.randn(SHAPE, generator=generator, dtype=dtype)
    sigma = torch.tensor(2.5, dtype=dtype)
    return x0, eps, sigma, *vp_alpha_sigma(sigma)


def test_ve_table_recovers_x0():
    """x = x₀ + σ ε; each prediction type's target, put through its scalings, gives x₀ back."""
    x0, eps, sigma, alpha, s = _known_state()
    x = x0 + sigma * eps
    targets = {"epsilon": eps, "v_prediction": alpha * eps - s * x0, "sample": x0}  # v: Salimans & Ho 2022
    for prediction_type, target in targets.items():
        recovered = ve_scalings(sigma, prediction_type).combine(x, target)
        assert (recovered - x0).abs().max() < 1e-12, prediction_type
    assert torch.allclose(ve_model_input(x, sigma), alpha * x, rtol=1e-12, atol=0)  # c_in x is the VP sample


def test_vp_table_recovers_x0_and_eps():
    """x = α x₀ + s ε; x₀ and ε from each prediction type."""
    x0, eps, _, alpha, s = _known_state()
    x = alpha * x0 + s * eps
    targets = {"epsilon": eps, "v_prediction": alpha * eps - s * x0, "sample": x0}
    for prediction_type, target in targets.items():
        assert (vp_scalings(alpha, s, prediction_type).combine(x, target) - x0).abs().max() < 1e-12
        assert (vp_noise_scalings(alpha, s, prediction_type).combine(x, target) - eps).abs().max() < 1e-12


def test_karras_scalings_are_the_v_row_with_f_equal_minus_v():
    x0, eps, sigma, alpha, s = _known_state()
    x = x0 + sigma * eps
    c_skip, c_out, c_in, c_noise = karras_scalings(sigma)
    assert (c_skip * x + c_out * -(alpha * eps - s * x0) - x0).abs().max() < 1e-12
    assert torch.allclose(c_in, alpha) and torch.allclose(c_noise, sigma.log() / 4)


def test_denoiser_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="'flow'.*epsilon, v_prediction, sample"):
        Denoiser(network, "flow")
