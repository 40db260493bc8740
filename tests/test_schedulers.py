"""Schedulers against diffusers (the reference): schedules, full sampling loops, configs, names.

Every case builds our scheduler and diffusers' from the same config, runs the same toy denoiser from the same
initial noise with the same seeded generators, and compares. LMS and beta sigmas need scipy on the diffusers
side, DPMSolverSDEScheduler needs torchsde; those cases are skipped where the reference cannot run.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import math

import numpy as np
import pytest
import torch

import stablepipe.schedulers as ours
from stablepipe.schedulers import schedules

diffusers = pytest.importorskip("diffusers")

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="diffusers needs scipy for this reference")
needs_torchsde = pytest.mark.skipif(not HAS_TORCHSDE, reason="diffusers needs torchsde for this reference")

# The scheduler config of Stable Diffusion 1.x checkpoints.
SD = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "trained_betas": None,
}
SHAPE = (2, 4, 8, 8)


def case(cls: str, steps: int = 10, marks=(), id: str | None = None, set_kwargs=None, step_kwargs=None, **config):
    """One parametrized case: class name, config, step count and extra arguments."""
    is_sd = all(config.get(k, object()) == v for k, v in SD.items())
    shown = [f"{k}={v}" for k, v in config.items() if not (is_sd and k in SD)]
    name = id or "-".join([cls.replace("Scheduler", ""), str(steps), *(["SD"] if is_sd else []), *shown])
    return pytest.param(cls, config, steps, set_kwargs or {}, step_kwargs or {}, marks=marks, id=name)


CASES = [
    # DDPM
    case("DDPMScheduler", 10),
    case("DDPMScheduler", 10, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    case("DDPMScheduler", 7, prediction_type="sample", timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"),
    case("DDPMScheduler", 8, thresholding=True, variance_type="fixed_large", sample_max_value=2.0),
    case("DDPMScheduler", 6, variance_type="fixed_small_log", beta_schedule="sigmoid"),
    case("DDPMScheduler", 0, id="DDPM-custom-timesteps", set_kwargs={"timesteps": [999, 800, 500, 260, 90, 3]}),
    # DDIM
    case("DDIMScheduler", 10, **SD),
    case("DDIMScheduler", 9, id="DDIM-eta", step_kwargs={"eta": 0.7}, **SD),
    case("DDIMScheduler", 8, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    case("DDIMScheduler", 7, timestep_spacing="linspace", prediction_type="sample", set_alpha_to_one=False),
    case("DDIMScheduler", 6, id="DDIM-thresholding-clipped-eps", thresholding=True,
         step_kwargs={"use_clipped_model_output": True, "eta": 0.3}),
    # PNDM
    case("PNDMScheduler", 10, **SD),
    case("PNDMScheduler", 12, skip_prk_steps=False),
    case("PNDMScheduler", 9, prediction_type="v_prediction", timestep_spacing="trailing", skip_prk_steps=True),
    case("PNDMScheduler", 8, timestep_spacing="linspace", skip_prk_steps=False, set_alpha_to_one=True),
    # LMS
    case("LMSDiscreteScheduler", 10, marks=needs_scipy, **SD),
    case("LMSDiscreteScheduler", 12, marks=needs_scipy, use_karras_sigmas=True, **SD),
    case("LMSDiscreteScheduler", 9, marks=needs_scipy, use_exponential_sigmas=True, prediction_type="v_prediction"),
    case("LMSDiscreteScheduler", 8, marks=needs_scipy, use_beta_sigmas=True, timestep_spacing="trailing"),
    case("LMSDiscreteScheduler", 6, marks=needs_scipy, prediction_type="sample", timestep_spacing="leading"),
    # Euler
    case("EulerDiscreteScheduler", 10),
    case("EulerDiscreteScheduler", 15, **SD),
    case("EulerDiscreteScheduler", 12, use_karras_sigmas=True, **SD),
    case("EulerDiscreteScheduler", 9, use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
    case("EulerDiscreteScheduler", 9, marks=needs_scipy, use_beta_sigmas=True),
    case("EulerDiscreteScheduler", 8, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    case("EulerDiscreteScheduler", 10, prediction_type="v_prediction", timestep_spacing="trailing",
         rescale_betas_zero_snr=True),
    case("EulerDiscreteScheduler", 7, prediction_type="v_prediction", timestep_type="continuous"),
    case("EulerDiscreteScheduler", 7, prediction_type="sample", interpolation_type="log_linear"),
    case("EulerDiscreteScheduler", 10, id="Euler-churn", step_kwargs={"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 8.0},
         **SD),
    case("EulerDiscreteScheduler", 0, id="Euler-custom-timesteps", set_kwargs={"timesteps": [999, 750, 400, 120, 10]}),
    case("EulerDiscreteScheduler", 0, id="Euler-custom-sigmas",
         set_kwargs={"sigmas": [14.6, 7.0, 3.1, 1.2, 0.4, 0.05, 0.0]}, **SD),
    # Euler ancestral
    case("EulerAncestralDiscreteScheduler", 10, **SD),
    case("EulerAncestralDiscreteScheduler", 9, timestep_spacing="linspace", prediction_type="v_prediction"),
    case("EulerAncestralDiscreteScheduler", 8, timestep_spacing="trailing", prediction_type="v_prediction",
         rescale_betas_zero_snr=True),
    # Heun
    case("HeunDiscreteScheduler", 10),
    case("HeunDiscreteScheduler", 8, use_karras_sigmas=True, **SD),
    case("HeunDiscreteScheduler", 7, use_exponential_sigmas=True, prediction_type="v_prediction",
         timestep_spacing="trailing"),
    case("HeunDiscreteScheduler", 6, prediction_type="sample", clip_sample=True, timestep_spacing="leading",
         beta_schedule="exp"),
    case("HeunDiscreteScheduler", 0, id="Heun-custom-timesteps", set_kwargs={"timesteps": [999, 700, 300, 20]}),
    # DPM2
    case("KDPM2DiscreteScheduler", 10),
    case("KDPM2DiscreteScheduler", 8, use_karras_sigmas=True, **SD),
    case("KDPM2DiscreteScheduler", 7, use_exponential_sigmas=True, prediction_type="v_prediction"),
    case("KDPM2DiscreteScheduler", 6, timestep_spacing="trailing"),
    case("KDPM2AncestralDiscreteScheduler", 10, **SD),
    case("KDPM2AncestralDiscreteScheduler", 8, use_karras_sigmas=True, **SD),
    case("KDPM2AncestralDiscreteScheduler", 7, prediction_type="v_prediction", timestep_spacing="trailing"),
    # DPM-Solver multistep
    case("DPMSolverMultistepScheduler", 10),
    case("DPMSolverMultistepScheduler", 20, use_karras_sigmas=True, **SD),
    case("DPMSolverMultistepScheduler", 12, solver_order=3, **SD),
    case("DPMSolverMultistepScheduler", 18, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    case("DPMSolverMultistepScheduler", 6, solver_order=1),
    case("DPMSolverMultistepScheduler", 15, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **SD),
    case("DPMSolverMultistepScheduler", 9, algorithm_type="sde-dpmsolver++", solver_order=3,
         solver_type="heun"),
    case("DPMSolverMultistepScheduler", 10, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
         solver_type="heun"),
    case("DPMSolverMultistepScheduler", 11, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
         solver_order=3, thresholding=True),
    case("DPMSolverMultistepScheduler", 8, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
    case("DPMSolverMultistepScheduler", 10, prediction_type="v_prediction", timestep_spacing="trailing",
         rescale_betas_zero_snr=True, euler_at_final=True),
    case("DPMSolverMultistepScheduler", 9, prediction_type="sample", thresholding=True, sample_max_value=1.5),
    case("DPMSolverMultistepScheduler", 10, use_lu_lambdas=True),
    case("DPMSolverMultistepScheduler", 10, use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1),
    case("DPMSolverMultistepScheduler", 10, marks=needs_scipy, use_beta_sigmas=True),
    case("DPMSolverMultistepScheduler", 10, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    case("DPMSolverMultistepScheduler", 0, id="DPMMulti-custom-timesteps",
         set_kwargs={"timesteps": [999, 850, 600, 300, 100, 20]}),
    # DPM-Solver singlestep
    case("DPMSolverSinglestepScheduler", 10),
    case("DPMSolverSinglestepScheduler", 13, solver_order=3, **SD),
    case("DPMSolverSinglestepScheduler", 12, solver_order=3, solver_type="heun", final_sigmas_type="sigma_min",
         lower_order_final=False),
    case("DPMSolverSinglestepScheduler", 9, solver_order=1),
    case("DPMSolverSinglestepScheduler", 11, use_karras_sigmas=True, **SD),
    case("DPMSolverSinglestepScheduler", 10, algorithm_type="sde-dpmsolver++", solver_type="heun"),
    case("DPMSolverSinglestepScheduler", 8, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
         prediction_type="v_prediction"),
    case("DPMSolverSinglestepScheduler", 0, id="DPMSingle-custom-timesteps",
         set_kwargs={"timesteps": [999, 800, 600, 400, 200, 50]}),
    # DEIS
    case("DEISMultistepScheduler", 10),
    case("DEISMultistepScheduler", 12, solver_order=3, **SD),
    case("DEISMultistepScheduler", 8, use_karras_sigmas=True, prediction_type="v_prediction"),
    case("DEISMultistepScheduler", 16, solver_order=3, timestep_spacing="trailing", prediction_type="sample"),
    # UniPC
    case("UniPCMultistepScheduler", 10),
    case("UniPCMultistepScheduler", 12, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min", **SD),
    case("UniPCMultistepScheduler", 9, predict_x0=False, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    case("UniPCMultistepScheduler", 11, use_karras_sigmas=True, final_sigmas_type="sigma_min", **SD),
    case("UniPCMultistepScheduler", 16, solver_order=3, lower_order_final=False, disable_corrector=[0, 3],
         final_sigmas_type="sigma_min"),
    case("UniPCMultistepScheduler", 8, use_exponential_sigmas=True, timestep_spacing="trailing",
         rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    # LCM
    case("LCMScheduler", 4),
    case("LCMScheduler", 8, prediction_type="v_prediction", original_inference_steps=100),
    case("LCMScheduler", 3, id="LCM-strength", set_kwargs={"strength": 0.6}),
    case("LCMScheduler", 0, id="LCM-custom-timesteps", set_kwargs={"timesteps": [999, 759, 499, 259]}),
    # DPM-SDE: deterministic part here; the torchsde noise is compared in test_parity_numerics.py
    case("DPMSolverSDEScheduler", 8, marks=needs_torchsde, id="DPMSDE-no-noise", step_kwargs={"s_noise": 0.0}),
    case("DPMSolverSDEScheduler", 7, marks=needs_torchsde, id="DPMSDE-karras-no-noise", use_karras_sigmas=True,
         step_kwargs={"s_noise": 0.0}, **SD),
]


@functools.cache
def _reference(cls_name: str, config_json: str):
    return getattr(diffusers, cls_name).from_config(json.loads(config_json))


def build(cls_name: str, config: dict):
    """Our scheduler and diffusers' from the same config (diffusers' as a copy of a cached one: some of its
    constructors take a second)."""
    reference = copy.deepcopy(_reference(cls_name, json.dumps(config, sort_keys=True)))
    return getattr(ours, cls_name).from_config(config), reference


def set_both(mine, ref, steps: int, set_kwargs: dict) -> None:
    args = {"num_inference_steps": steps} if steps else {}
    mine.set_timesteps(**args, **set_kwargs)
    ref.set_timesteps(**args, **set_kwargs)


def toy_model(sample: torch.Tensor, timestep) -> torch.Tensor:
    """A smooth, deterministic stand-in for a UNet. Its input is the scaled sample (about unit variance);
    returning mostly that input is roughly what an ε-predictor does at high noise, which keeps loops bounded."""
    t = float(timestep) / 1000.0
    return 0.9 * sample + 0.15 * math.cos(3.0 * t) * torch.tanh(sample.roll(1, dims=-1)) + 0.02 * t


def sample_loop(scheduler, step_kwargs: dict, seed: int = 1234, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A full denoising loop as a pipeline runs it: noise × init_noise_sigma, scale, model, step; the latents and
    the model's output in `dtype`."""
    latents = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma).to(dtype)
    kwargs = dict(step_kwargs)
    if "generator" in inspect.signature(scheduler.step).parameters and "s_noise" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(toy_model(model_input, t).to(dtype), t, latents, **kwargs).prev_sample
    return latents


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize(("cls_name", "config", "steps", "set_kwargs", "step_kwargs"), CASES)
def test_schedule_matches_diffusers(cls_name, config, steps, set_kwargs, step_kwargs):
    mine, ref = build(cls_name, config)
    set_both(mine, ref, steps, set_kwargs)
    assert mine.timesteps.dtype == ref.timesteps.dtype
    torch.testing.assert_close(mine.timesteps.double(), ref.timesteps.double(), rtol=1e-6, atol=1e-6)
    if hasattr(ref, "sigmas"):
        torch.testing.assert_close(mine.sigmas.double(), ref.sigmas.double(), rtol=1e-6, atol=1e-6)
    assert float(mine.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert mine.order == ref.order


@pytest.mark.parametrize(("cls_name", "config", "steps", "set_kwargs", "step_kwargs"), CASES)
def test_sampling_loop_matches_diffusers(cls_name, config, steps, set_kwargs, step_kwargs):
    mine, ref = build(cls_name, config)
    set_both(mine, ref, steps, set_kwargs)
    ours_out, ref_out = sample_loop(mine, step_kwargs), sample_loop(ref, step_kwargs)
    assert ours_out.abs().max() > 1e-3  # the loop did something
    assert max_diff(ours_out, ref_out) < 1e-5 * max(1.0, ref_out.abs().max().item())  # float32 at |x| > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(("cls_name", "config", "steps", "set_kwargs", "step_kwargs"), CASES)
def test_sampling_loop_is_bitwise_diffusers(cls_name, config, steps, set_kwargs, step_kwargs, dtype):
    """Every step rounds in diffusers' order of operations, so the same loop gives the same bits, in float16 too
    (where PyTorch's CPU kernels round c · t and t · c differently: schedulers/denoiser.py)."""
    if cls_name == "LMSDiscreteScheduler":
        pytest.skip("LMS weights are integrated exactly here and by scipy's quadrature in diffusers (1e-7 apart)")
    mine, ref = build(cls_name, config)
    set_both(mine, ref, steps, set_kwargs)
    ours_out, ref_out = sample_loop(mine, step_kwargs, dtype=dtype), sample_loop(ref, step_kwargs, dtype=dtype)
    assert ours_out.dtype == ref_out.dtype and ours_out.abs().max() > 1e-3
    assert torch.equal(ours_out, ref_out)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 13, 25, 50])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(
    "cls_name",
    ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
     "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
     "DPMSolverMultistepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler"],
)
def test_spacing_matches_diffusers(cls_name, spacing, steps):
    config = {**SD, "timestep_spacing": spacing}
    if cls_name in ("PNDMScheduler",) and steps < 4:
        config["skip_prk_steps"] = True
    mine, ref = build(cls_name, config)
    mine.set_timesteps(steps)
    ref.set_timesteps(steps)
    torch.testing.assert_close(mine.timesteps.double(), ref.timesteps.double(), rtol=1e-6, atol=1e-6)
    if hasattr(ref, "sigmas"):
        torch.testing.assert_close(mine.sigmas.double(), ref.sigmas.double(), rtol=1e-6, atol=1e-6)


def test_cosine_karras_timesteps_stay_fractional():
    """With squaredcos_cap_v2, DPM-Solver keeps Karras timesteps unrounded before the integer cast."""
    mine, ref = build("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True})
    set_both(mine, ref, 10, {})
    assert torch.equal(mine.timesteps, ref.timesteps)
    torch.testing.assert_close(mine.sigmas, ref.sigmas, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls_name", sorted(ours.SCHEDULER_CLASSES))
def test_add_noise_matches_diffusers(cls_name):
    if cls_name == "LMSDiscreteScheduler" and not HAS_SCIPY or cls_name == "DPMSolverSDEScheduler" and not HAS_TORCHSDE:
        pytest.skip("reference needs scipy / torchsde")
    mine, ref = build(cls_name, SD)
    steps = 4 if cls_name == "LCMScheduler" else 10
    set_both(mine, ref, steps, {})
    original = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    timesteps = ref.timesteps[torch.tensor([1, 3])]
    expected = ref.add_noise(original, noise, timesteps)
    assert max_diff(mine.add_noise(original, noise, timesteps), expected) < 1e-6
    assert max_diff(expected, original) > 0.1
    if not hasattr(ref, "set_begin_index"):
        return  # DDPM-style add_noise indexes by timestep; there is no position to set
    mine.set_begin_index(2)  # img2img: the position comes from begin_index, not the timesteps
    ref.set_begin_index(2)
    assert max_diff(mine.add_noise(original, noise, timesteps), ref.add_noise(original, noise, timesteps)) < 1e-6


@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDIMScheduler"])
def test_get_velocity_matches_diffusers(cls_name):
    mine, ref = build(cls_name, SD)
    sample, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    timesteps = torch.tensor([10, 700])
    assert max_diff(mine.get_velocity(sample, noise, timesteps), ref.get_velocity(sample, noise, timesteps)) < 1e-6


@pytest.mark.parametrize("cls_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                      "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_img2img_begin_index_matches_diffusers(cls_name):
    """Starting part way (strength 0.6) with set_begin_index, as the img2img pipelines do."""
    mine, ref = build(cls_name, SD)
    set_both(mine, ref, 10, {})
    start = 4 * mine.order
    outputs = []
    for scheduler in (mine, ref):
        scheduler.set_begin_index(start)
        latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        generator = torch.Generator().manual_seed(6)
        for t in scheduler.timesteps[start:]:
            kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            model_input = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(toy_model(model_input, t), t, latents, **kwargs).prev_sample
        outputs.append(latents)
    assert max_diff(*outputs) < 1e-5


def test_step_tuple_and_outputs():
    euler = ours.EulerDiscreteScheduler.from_config(SD)
    euler.set_timesteps(5)
    t = euler.timesteps[0]
    sample = torch.randn(SHAPE)
    prev, x0 = euler.step(toy_model(sample, t), t, sample, return_dict=False)
    assert prev.shape == x0.shape == SHAPE
    dpm = ours.DPMSolverMultistepScheduler.from_config(SD)
    dpm.set_timesteps(5)
    assert len(dpm.step(toy_model(sample, dpm.timesteps[0]), dpm.timesteps[0], sample, return_dict=False)) == 1
    lcm = ours.LCMScheduler()
    lcm.set_timesteps(4)
    out = lcm.step(toy_model(sample, lcm.timesteps[0]), lcm.timesteps[0], sample, generator=torch.Generator())
    assert out.denoised is not None and out.pred_original_sample is None and len(out.to_tuple()) == 2


# ---------------------------------------------------------------------------------------------- custom lists


@pytest.mark.parametrize("cls_name", ["DDIMScheduler", "PNDMScheduler", "EulerAncestralDiscreteScheduler",
                                      "KDPM2DiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler"])
def test_custom_timesteps_rejected_clearly(cls_name):
    scheduler = getattr(ours, cls_name)()
    with pytest.raises(ValueError, match="does not take custom `timesteps`"):
        scheduler.set_timesteps(timesteps=[999, 500, 10])
    with pytest.raises(ValueError, match="does not take custom `sigmas`"):
        scheduler.set_timesteps(sigmas=[10.0, 1.0, 0.0])


def test_custom_lists_validated():
    with pytest.raises(ValueError, match="exactly one"):
        ours.EulerDiscreteScheduler().set_timesteps(10, timesteps=[999, 10])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        ours.EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 10])
    with pytest.raises(ValueError, match="descending"):
        ours.DDPMScheduler().set_timesteps(timesteps=[10, 999])
    with pytest.raises(ValueError, match="only one of"):
        ours.EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


# ---------------------------------------------------------------------------------------------- configs


def test_from_config_round_trip_between_classes():
    euler = ours.EulerDiscreteScheduler.from_config(SD, timestep_spacing="trailing")
    dpm = ours.DPMSolverMultistepScheduler.from_config(euler.config, use_karras_sigmas=True)
    back = ours.EulerDiscreteScheduler.from_config(dpm.config)
    assert dpm.config.beta_schedule == "scaled_linear" and dpm.config.timestep_spacing == "trailing"
    assert dpm.config.skip_prk_steps is True  # a PNDM key, kept though DPM does not use it
    assert back.config.interpolation_type == euler.config.interpolation_type
    assert back.config.use_karras_sigmas is True  # both classes take this key
    for key, value in euler.config.items():
        if key not in ("_class_name", "_use_default_values", "use_karras_sigmas"):
            assert back.config[key] == value, key


def test_carried_keys_do_not_change_behaviour():
    """A key another class declares (rescale_betas_zero_snr) is kept but not used by a class that lacks it."""
    heun = ours.HeunDiscreteScheduler.from_config({**SD, "rescale_betas_zero_snr": True})
    plain = ours.HeunDiscreteScheduler.from_config(SD)
    assert heun.config.rescale_betas_zero_snr is True
    torch.testing.assert_close(heun.alphas_cumprod, plain.alphas_cumprod)


def test_config_matches_diffusers_keys():
    for name, cls in ours.SCHEDULER_CLASSES.items():
        if name == "DPMSolverSDEScheduler" and not HAS_TORCHSDE or name == "LMSDiscreteScheduler" and not HAS_SCIPY:
            continue
        ref_keys = set(getattr(diffusers, name)().config) - {"_use_default_values"}
        ref_keys -= {k for k in ref_keys if "flow" in k or k in ("use_dynamic_shifting", "time_shift_type",
                                                                  "shift_terminal")}
        private = {"_class_name", "_use_default_values", "_diffusers_version"}
        assert set(cls().config) - private == ref_keys - private, name


def test_save_and_from_pretrained(tmp_path):
    scheduler = ours.DPMSolverMultistepScheduler.from_config(SD, use_karras_sigmas=True)
    path = scheduler.save_pretrained(tmp_path / "scheduler")
    saved = json.loads(path.read_text())
    assert path.name == "scheduler_config.json" and saved["_class_name"] == "DPMSolverMultistepScheduler"
    loaded = ours.DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler", solver_order=3)
    assert loaded.config.use_karras_sigmas is True and loaded.config.solver_order == 3
    ref = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    loaded.set_timesteps(12)
    ref.set_timesteps(12)
    torch.testing.assert_close(loaded.sigmas, ref.sigmas)
    # and a folder written by diffusers loads too
    diffusers.EulerDiscreteScheduler.from_config(SD).save_pretrained(tmp_path / "ref")
    assert ours.EulerDiscreteScheduler.from_pretrained(tmp_path / "ref").config.steps_offset == 1


def test_compatibles_and_class_lookup():
    scheduler = ours.PNDMScheduler.from_config(SD)
    assert set(scheduler.compatibles) == set(ours.SCHEDULER_CLASSES.values())
    for cls in scheduler.compatibles:
        assert cls.from_config(scheduler.config).config.num_train_timesteps == 1000
    assert ours.get_scheduler_class("EulerDiscreteScheduler") is ours.EulerDiscreteScheduler
    with pytest.raises(ValueError, match="unknown scheduler class 'FancyScheduler'.*PNDMScheduler"):
        ours.get_scheduler_class("FancyScheduler")


def test_package_exports_schedulers():
    import stablepipe

    assert stablepipe.EulerDiscreteScheduler is ours.EulerDiscreteScheduler
    assert stablepipe.UniPCMultistepScheduler is ours.UniPCMultistepScheduler


# ---------------------------------------------------------------------------------------------- names


NAME_EXPECTATIONS = {
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": False}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
}


@pytest.mark.parametrize("name", sorted(NAME_EXPECTATIONS))
def test_a1111_names(name):
    cls_name, options = NAME_EXPECTATIONS[name]
    karras_config = {**SD, "use_karras_sigmas": True}  # a previous "Karras" choice must not leak
    scheduler = ours.scheduler_from_name(name, karras_config)
    assert type(scheduler).__name__ == cls_name
    for key, value in options.items():
        assert scheduler.config[key] == value, key
    assert scheduler.config.beta_schedule == "scaled_linear"  # the pipeline's own config is kept


def test_names_are_case_insensitive_and_comfyui_aliases_work():
    assert isinstance(ours.scheduler_from_name("dpm++ 2m karras"), ours.DPMSolverMultistepScheduler)
    assert isinstance(ours.scheduler_from_name("euler_ancestral"), ours.EulerAncestralDiscreteScheduler)
    assert isinstance(ours.scheduler_from_name("dpmpp_sde"), ours.DPMSolverSDEScheduler)
    assert ours.scheduler_from_name("Euler", SD, timestep_spacing="trailing").config.timestep_spacing == "trailing"
    names = ours.list_scheduler_names()
    assert {"Euler a", "DPM++ 2M Karras", "UniPC", "LCM", "dpmpp_2m"} <= set(names)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown scheduler name 'Euler b'.*DPM\+\+ 2M Karras.*UniPC"):
        ours.scheduler_from_name("Euler b")


# ---------------------------------------------------------------------------------------------- schedule math


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
def test_betas_match_diffusers(schedule):
    mine = ours.DDPMScheduler(beta_schedule=schedule)
    ref = diffusers.DDPMScheduler(beta_schedule=schedule)
    assert torch.equal(mine.betas, ref.betas)
    assert torch.equal(mine.alphas_cumprod, ref.alphas_cumprod)


def test_trained_betas_and_zero_snr():
    betas = np.linspace(0.001, 0.03, 50)
    mine = ours.DDIMScheduler(num_train_timesteps=50, trained_betas=betas.tolist(), rescale_betas_zero_snr=True)
    ref = diffusers.DDIMScheduler(num_train_timesteps=50, trained_betas=betas.tolist(), rescale_betas_zero_snr=True)
    assert torch.equal(mine.alphas_cumprod, ref.alphas_cumprod)
    assert mine.alphas_cumprod[-1] == 0  # zero terminal SNR


def test_karras_sigmas_formula():
    sigmas = schedules.karras_sigmas(0.1, 10.0, 5, rho=7.0)
    assert sigmas[0] == pytest.approx(10.0) and sigmas[-1] == pytest.approx(0.1)
    middle = (10.0 ** (1 / 7) + 0.5 * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    assert sigmas[2] == pytest.approx(middle)
    assert np.all(np.diff(sigmas) < 0)


def test_beta_quantile_inverts_the_cdf():
    assert schedules.beta_ppf(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-12)  # symmetric
    assert schedules.beta_ppf(0.3, 1.0, 1.0) == pytest.approx(0.3, abs=1e-12)  # Beta(1, 1) is uniform
    for q in (0.01, 0.2, 0.77, 0.999):
        assert schedules.beta_cdf(schedules.beta_ppf(q, 0.6, 0.6), 0.6, 0.6) == pytest.approx(q, abs=1e-12)


def test_beta_quantile_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for q in (0.0, 1e-4, 0.1, 0.37, 0.5, 0.93, 1.0):
        assert schedules.beta_ppf(q, 0.6, 0.6) == pytest.approx(scipy_stats.beta.ppf(q, 0.6, 0.6), abs=1e-12)


def test_lms_coefficients_integrate_lagrange_basis():
    from stablepipe.schedulers.lms import lms_coefficient

    nodes = [3.0, 2.0, 1.5]
    # the weights integrate any quadratic exactly: ∫ p over [2, 1] for p = x², sampled at the nodes
    weights = [lms_coefficient(nodes, j, 2.0, 1.0) for j in range(3)]
    assert sum(w * n**2 for w, n in zip(weights, nodes)) == pytest.approx((1.0**3 - 2.0**3) / 3)
    assert sum(weights) == pytest.approx(-1.0)


def test_lms_of_order_one_is_euler():
    """Without scipy on the reference side this still checks LMS: its first-order step is Euler's."""
    lms, euler = ours.LMSDiscreteScheduler.from_config(SD), ours.EulerDiscreteScheduler.from_config(SD)
    outputs = []
    for scheduler, kwargs in ((lms, {"order": 1}), (euler, {})):
        scheduler.set_timesteps(12)
        outputs.append(sample_loop(scheduler, kwargs))
    assert max_diff(*outputs) < 1e-5 and outputs[0].abs().max() > 0.1
    lms.set_timesteps(12)
    assert max_diff(sample_loop(lms, {}), outputs[1]) > 1e-3  # order 4 differs from Euler


def test_euler_get_velocity_matches_diffusers():
    mine, ref = build("EulerDiscreteScheduler", SD)
    set_both(mine, ref, 10, {})
    sample, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    timesteps = ref.timesteps[torch.tensor([2, 7])]
    assert max_diff(mine.get_velocity(sample, noise, timesteps), ref.get_velocity(sample, noise, timesteps)) < 1e-6


# ---------------------------------------------------------------------------------------------- DPM-SDE noise


def test_brownian_tree_increments_are_brownian():
    torch.manual_seed(0)
    tree = ours.BrownianTree((20000,), 0.1, 10.0, generator=torch.Generator().manual_seed(7))
    w1, w5, w9 = tree(1.0), tree(5.0), tree(9.0)
    assert (w5 - w1).var().item() == pytest.approx(4.0, rel=0.05)  # Var[W(t) − W(s)] = t − s
    assert ((w5 - w1) * (w9 - w5)).mean().item() == pytest.approx(0.0, abs=0.1)  # independent increments
    assert torch.equal(tree(5.0), w5)  # revisiting a point gives the same value
    # a point inside a known interval is a bridge draw: consistent with both ends
    w3 = tree(3.0)
    assert (w3 - w1).var().item() == pytest.approx(2.0, rel=0.05)
    assert (w5 - w3).var().item() == pytest.approx(2.0, rel=0.05)
    assert tree.normalized_increment(9.0, 1.0).std().item() == pytest.approx(1.0, rel=0.03)


def test_dpm_sde_noise_statistics_and_seeds():
    scheduler = ours.DPMSolverSDEScheduler.from_config(SD, use_karras_sigmas=True)
    shape = (1, 4, 64, 64)

    def first_stage(seed):
        scheduler.set_timesteps(8)
        t = scheduler.timesteps[0]
        generator = torch.Generator().manual_seed(seed)
        return scheduler.step(torch.zeros(shape), t, torch.zeros(shape), generator=generator).prev_sample

    a, b, c = first_stage(1), first_stage(1), first_stage(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # from x = 0 with x₀ = 0, only the injected noise remains: σ_up of the step to the log-σ midpoint
    sigma, sigma_next = scheduler.sigmas[0].double(), scheduler.sigmas[1].double()
    _, sigma_up = schedules.ancestral_step(sigma, (sigma * sigma_next).sqrt())
    assert a.std().item() == pytest.approx(float(sigma_up), rel=0.05)
    assert a.mean().item() == pytest.approx(0.0, abs=0.05 * float(sigma_up))
