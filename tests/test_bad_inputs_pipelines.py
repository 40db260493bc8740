"""Bad input to the 13 pipelines: one row per case (pipeline, arguments -> a fragment of the clear error), so the
next careless or hostile call finds these classes of mistake closed (issue #19, items 4 and 6). Every row starts
from a call that works and changes one thing. Hypothesis property tests cover the argument checks themselves.

Errors must be ValueError or TypeError raised before any work, or NonFiniteResultError (a FloatingPointError)
for a result that came out NaN: never a black picture returned as if nothing happened.
"""

from __future__ import annotations

import math
import warnings

import fixtures_image
import numpy as np
import PIL.Image
import pytest
import torch
from fixtures_upscale import write_x2_folder, write_x4_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_variation import write_variation_folder

import stablepipe

pytest_plugins = ["fixtures_sdxl", "fixtures_image", "fixtures_ldm3d"]
CLEAR = (ValueError, TypeError, FloatingPointError)
NAN, INF = float("nan"), float("inf")

PICTURE = fixtures_image.sample_image()  # 32 x 32 RGB
MASK = fixtures_image.sample_mask()
SMALL = fixtures_image.sample_image(16, 16)
DEPTH16 = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 65536, (16, 16), dtype=np.uint16))

# pipeline key -> (class name, fixture folder, the arguments of a call that works)
PIPELINES = {
    "sd": ("StableDiffusionPipeline", "sd1_folder", dict(prompt="a")),
    "img2img": ("StableDiffusionImg2ImgPipeline", "sd1_folder", dict(prompt="a", image=PICTURE)),
    "inpaint": ("StableDiffusionInpaintPipeline", "inpaint_folder", dict(prompt="a", image=PICTURE, mask_image=MASK)),
    "depth2img": ("StableDiffusionDepth2ImgPipeline", "depth_folder", dict(prompt="a", image=PICTURE)),
    "variation": ("StableDiffusionImageVariationPipeline", "variation_folder", dict(image=PICTURE)),
    "safe": ("StableDiffusionPipelineSafe", "sd1_folder", dict(prompt="a")),
    "x4": ("StableDiffusionUpscalePipeline", "x4_folder", dict(prompt="a", image=SMALL)),
    "x2": ("StableDiffusionLatentUpscalePipeline", "x2_folder", dict(prompt="a", image=SMALL)),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl_folder", dict(prompt="a")),
    "sdxl_img2img": ("StableDiffusionXLImg2ImgPipeline", "sdxl_folder", dict(prompt="a", image=PICTURE, strength=0.5)),
    "sdxl_inpaint": ("StableDiffusionXLInpaintPipeline", "sdxl_folder", dict(prompt="a", image=PICTURE,
                                                                             mask_image=MASK)),
    "ldm3d": ("StableDiffusionLDM3DPipeline", "ldm3d_folder", dict(prompt="a", height=32, width=32)),
    "ldm3d_x4": ("StableDiffusionUpscaleLDM3DPipeline", "ldm3d_sr_folder", dict(prompt="a", rgb=SMALL, depth=DEPTH16,
                                                                                target_res=[32, 32])),
}
WITH_GUIDANCE_RESCALE = ("sd", "sdxl", "sdxl_img2img", "sdxl_inpaint")
WITH_ETA = ("sd", "img2img", "inpaint", "depth2img", "variation", "safe", "x4", "sdxl", "sdxl_img2img", "sdxl_inpaint",
            "ldm3d_x4")
WITH_IMAGES_PER_PROMPT = tuple(k for k in PIPELINES if k != "x2")
WITH_SIZE = ("sd", "inpaint", "variation", "safe", "sdxl", "sdxl_inpaint", "ldm3d")
WITH_CLIP_SKIP = ("sd", "img2img", "inpaint", "depth2img", "x4", "sdxl", "sdxl_img2img", "sdxl_inpaint", "ldm3d")
WITH_LATENTS = ("sd", "inpaint", "variation", "safe", "x4", "sdxl", "sdxl_img2img", "sdxl_inpaint")
WITH_EMBEDS = tuple(k for k in PIPELINES if k not in ("variation", "ldm3d"))
WITH_PICTURE = ("img2img", "inpaint", "depth2img", "variation", "x4", "x2", "sdxl_img2img", "sdxl_inpaint")
WITH_MASK = ("inpaint", "sdxl_inpaint")


def rows_for(keys, kwargs, fragment):
    return [(key, kwargs, fragment) for key in keys]


NAN_TENSOR = torch.full((1, 4, 4, 4), NAN)
ROWS = [
    # ---- item 4: non-finite numbers refused up front (NaN must not quietly mean "guidance off")
    *rows_for(PIPELINES, dict(guidance_scale=NAN), "guidance_scale must be a finite number"),
    *rows_for(PIPELINES, dict(guidance_scale=INF), "guidance_scale must be a finite number"),
    *rows_for(PIPELINES, dict(guidance_scale=-INF), "guidance_scale must be a finite number"),
    *rows_for(("sd", "sdxl"), dict(guidance_scale="7"), "guidance_scale must be a number"),
    *rows_for(WITH_GUIDANCE_RESCALE, dict(guidance_rescale=NAN), "guidance_rescale must be a finite number"),
    *rows_for(("sd", "sdxl"), dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
    *rows_for(("img2img", "depth2img", "sdxl_img2img", "inpaint"), dict(strength=NAN), "strength must be"),
    *rows_for(WITH_ETA, dict(eta=NAN), "eta must be a finite number"),
    *rows_for(("sd", "sdxl"), dict(eta=-0.5), r"eta must be in \[0, 1\]"),
    *rows_for(("x4", "ldm3d_x4"), dict(noise_level=NAN), "noise_level must be a finite number"),
    *rows_for(("sdxl_img2img",), dict(aesthetic_score=INF), "aesthetic_score must be a finite number"),
    *rows_for(("safe",), dict(sld_guidance_scale=NAN), "sld_guidance_scale must be a finite number"),
    *rows_for(("sdxl", "x4"), dict(cross_attention_kwargs={"scale": NAN}), r"cross_attention_kwargs\['scale'\]"),
    *rows_for(("sdxl",), dict(denoising_end=NAN), "denoising_end must be a float between 0 and 1"),
    # NaN inside given tensors and pictures
    *rows_for(WITH_EMBEDS, dict(prompt=None, prompt_embeds=torch.full((1, 77, 32), NAN)), "prompt_embeds holds NaN"),
    *rows_for(("sd", "inpaint", "sdxl"), dict(latents=NAN_TENSOR), "latents holds NaN"),
    *rows_for(("img2img", "x4", "sdxl_img2img"), dict(image=torch.full((1, 3, 32, 32), NAN)), "image holds 3072 NaN"),
    *rows_for(("img2img",), dict(image=np.full((32, 32, 3), INF, dtype=np.float32)), "image holds 3072 NaN"),
    *rows_for(WITH_MASK, dict(mask_image=torch.full((1, 1, 32, 32), NAN)), "mask_image holds 1024 NaN"),
    *rows_for(("inpaint",), dict(masked_image_latents=NAN_TENSOR), "masked_image_latents holds NaN"),
    *rows_for(("depth2img",), dict(depth_map=torch.full((1, 32, 32), NAN)), "depth_map holds 1024 NaN"),
    *rows_for(("ldm3d_x4",), dict(rgb=torch.full((1, 3, 16, 16), NAN)), "rgb holds 768 NaN"),
    # a result that overflows is an error, not a black picture (1e30 is finite: accepted, as in diffusers)
    *rows_for(("sd", "sdxl", "img2img"), dict(guidance_scale=1e30), "the denoising loop produced NaN"),
    # ---- item 6: bounds up front
    *rows_for(PIPELINES, dict(num_inference_steps=10**9), "exceeds the 1000 timesteps"),
    *rows_for(("sd", "img2img", "sdxl"), dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    *rows_for(("sd", "x4"), dict(num_inference_steps=True), "num_inference_steps must be an integer"),
    *rows_for(WITH_IMAGES_PER_PROMPT, dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1"),
    *rows_for(("sd", "img2img", "depth2img"), dict(num_images_per_prompt=-1), "num_images_per_prompt must be"),
    *rows_for(WITH_SIZE, dict(height=0), "height must be a positive integer"),
    *rows_for(WITH_SIZE, dict(width=0), "width must be a positive integer"),
    *rows_for(("sd", "sdxl", "ldm3d"), dict(width=100000), "larger than 16384 pixels"),
    *rows_for(("sd",), dict(height=8192, width=8192, num_images_per_prompt=20), "pixels in one call"),
    *rows_for(WITH_CLIP_SKIP, dict(clip_skip=100), "clip_skip=100 skips every layer"),
    *rows_for(WITH_CLIP_SKIP, dict(clip_skip=-1), "clip_skip must be an integer >= 0"),
    *rows_for(PIPELINES, dict(generator="seed"), r"generator must be a torch.Generator.*manual_seed"),
    *rows_for(("sd",), dict(generator=[0, 1]), "generator must be a torch.Generator"),
    *rows_for(WITH_MASK, dict(mask_image=np.full((32, 32), 255.0, dtype=np.float32)), r"mask_image has float values"),
    *rows_for(WITH_MASK, dict(mask_image=torch.full((1, 1, 32, 32), -0.5)), r"mask_image has float values"),
    *rows_for(WITH_PICTURE, dict(image=np.full((32, 32, 3), 200.0, dtype=np.float32)), "divide by 255"),
    *rows_for(("img2img", "sdxl_img2img", "inpaint"), dict(image=torch.rand(32, 32)), "2-D tensor"),
    *rows_for(WITH_LATENTS, dict(latents=np.zeros((1, 4, 4, 4))), "latents must be a torch.Tensor"),
    *rows_for(("sdxl_img2img",), dict(latents=torch.zeros(1, 4, 6, 6)), "`latents` has shape"),
    # custom schedules where the scheduler cannot take them (PNDM here), refused as diffusers refuses them
    *rows_for(("sd", "img2img", "inpaint", "ldm3d"), dict(sigmas=[14.6, 3.0, 0.0]), "does not take custom `sigmas`"),
    *rows_for(("sd", "img2img"), dict(timesteps=[999, 500, 1]), "does not take custom `timesteps`"),
]


@pytest.fixture(scope="module")
def variation_folder(tmp_path_factory):
    return write_variation_folder(tmp_path_factory.mktemp("bad-variation"), safety=False)


@pytest.fixture(scope="module")
def x4_folder(tmp_path_factory):
    return write_x4_folder(tmp_path_factory.mktemp("bad-x4"))


@pytest.fixture(scope="module")
def x2_folder(tmp_path_factory):
    return write_x2_folder(tmp_path_factory.mktemp("bad-x2"))


@pytest.fixture(scope="module")
def pipes(request):
    """Pipelines by key, each loaded on first use and kept for the module."""
    loaded = {}

    def get(key: str):
        if key not in loaded:
            name, folder, _ = PIPELINES[key]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe = getattr(stablepipe, name).from_pretrained(request.getfixturevalue(folder))
            pipe.set_progress_bar_config(disable=True)
            loaded[key] = pipe
        return loaded[key]

    return get


def call(pipe, key: str, **changes):
    kwargs = {**PIPELINES[key][2], "num_inference_steps": 2, "output_type": "np", **changes}
    return pipe(**kwargs)


@pytest.mark.parametrize("key, changes, fragment", ROWS, ids=[f"{r[0]}-{'-'.join(r[1])}" for r in ROWS])
def test_bad_input_is_a_clear_error(pipes, key, changes, fragment):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CLEAR, match=fragment):
            call(pipes(key), key, **changes)


@pytest.mark.parametrize("key", ["sd", "sdxl", "ldm3d"])
def test_the_unchanged_call_works(pipes, key):
    """The rows' starting call is valid: without the one change it draws finite pictures."""
    out = call(pipes(key), key)
    images = out.rgb if key == "ldm3d" else out.images
    assert np.isfinite(images).all() and images.std() > 0.01


@pytest.mark.parametrize("key", ["sd", "img2img", "sdxl"])
def test_large_but_finite_guidance_is_accepted_up_front(pipes, key):
    """1e30 is a finite number, as diffusers takes it: refused only when the result overflows (rows above)."""
    from stablepipe.pipelines import arguments

    arguments.check_arguments(pipes(key), {**PIPELINES[key][2], "guidance_scale": 1e30, "num_inference_steps": 2})


# ---- property tests of the argument checks -----------------------------------------------------------------


class Tiny:
    """Stands in for a pipeline where the checks read only the scheduler's training steps."""

    scheduler = stablepipe.DDIMScheduler()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["guidance_scale", "eta", "guidance_rescale", "noise_level", "aesthetic_score"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6), st.booleans(),
                       st.text(max_size=3), st.none()))
def test_real_arguments_are_accepted_exactly_when_finite_and_in_range(name, value):
    from stablepipe.pipelines import arguments

    bound = arguments.REAL_ARGUMENTS[name]
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
          and (bound.low is None or value >= bound.low) and (bound.high is None or value <= bound.high))
    try:
        arguments.check_arguments(Tiny(), {name: value})
    except (ValueError, TypeError) as error:
        assert not ok and name in str(error)
    else:
        assert ok


@settings(max_examples=150, deadline=None)
@given(steps=st.one_of(st.integers(-5, 3000), st.floats(allow_nan=True), st.booleans()),
       images=st.one_of(st.integers(-3, 8), st.floats(-2, 8)))
def test_counts_are_positive_integers_within_the_schedule(steps, images):
    from stablepipe.pipelines import arguments

    def good(x, most):
        return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= most

    try:
        arguments.check_arguments(Tiny(), {"num_inference_steps": steps, "num_images_per_prompt": images})
    except ValueError as error:
        assert not (good(steps, 1000) and good(images, 10**9))
        assert "num_inference_steps" in str(error) or "num_images_per_prompt" in str(error)
    else:
        assert good(steps, 1000) and good(images, 10**9)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=16))
def test_tensors_are_refused_exactly_when_not_finite(values):
    from stablepipe.pipelines import arguments

    tensor = torch.tensor(values)
    finite = all(math.isfinite(v) for v in values)
    try:
        arguments.check_arguments(Tiny(), {"prompt_embeds": tensor, "latents": tensor})
    except ValueError as error:
        assert not finite and "NaN or infinite" in str(error)
    else:
        assert finite


def test_float16_vae_overflow_is_an_error_saying_what_to_do(sd1_folder):
    """A float16 VAE whose activations overflow (as SD VAEs can) gives NonFiniteResultError, not a black picture."""
    from stablepipe.pipelines.arguments import NonFiniteResultError

    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.vae.post_quant_conv.weight.mul_(3e4)
        pipe.vae.post_quant_conv.bias.mul_(3e4)
    pipe.vae.to(torch.float16)
    with pytest.raises(NonFiniteResultError, match=r"VAE decoder.*image\(s\) \[0\].*float16 overflowed in the VAE: use "
                                                   r"torch_dtype=torch.bfloat16 or torch.float32"):
        call(pipe, "sd", guidance_scale=1.0)
    pipe.vae.to(torch.float32)
    out = call(pipe, "sd", guidance_scale=1.0, output_type="latent")  # the loop itself was fine
    assert torch.isfinite(out.images).all()
