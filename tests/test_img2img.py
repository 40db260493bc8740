"""Image-to-image: same folder, same seed, same image as diffusers; image formats; strength; errors; CLI."""

from __future__ import annotations

import json

import fixtures_image
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff
from fixtures_image import TOLERANCE, load_both, run_both, sample_image, seeded

import stablepipe

inpaint_folder, depth_folder = fixtures_image.inpaint_folder, fixtures_image.depth_folder  # session fixtures

IMG2IMG = "StableDiffusionImg2ImgPipeline"


def as_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1).float()  # (3, H, W) in [0, 1]


CASES = {
    "pndm": dict(scheduler=None, call=dict(prompt="a red circle", image=sample_image(), strength=0.7)),
    "ddim-eta-unguided": dict(
        scheduler="DDIMScheduler", call=dict(prompt="sea", image=sample_image(), eta=0.5, guidance_scale=1.0)
    ),
    "euler-batch": dict(
        scheduler="EulerDiscreteScheduler",
        call=dict(prompt=["a cat", "a dog"], image=[sample_image(), sample_image(seed=1)], num_images_per_prompt=2,
                  negative_prompt=["blur", "fog"], strength=0.6, num_inference_steps=4),
    ),
    "ancestral-generators": dict(
        scheduler="EulerAncestralDiscreteScheduler",
        call=dict(prompt="an owl", image=sample_image(40, 32), num_images_per_prompt=2, strength=1.0, seed=[1, 2]),
    ),
    "dpm-numpy": dict(
        scheduler="DPMSolverMultistepScheduler",
        call=dict(prompt="x", image=np.asarray(sample_image(), dtype=np.float32)[None] / 255.0, strength=0.9),
    ),
    "lms-tensor-list": dict(
        scheduler="LMSDiscreteScheduler",
        call=dict(prompt=["x", "y"], image=[as_tensor(sample_image()), as_tensor(sample_image(seed=2))]),
    ),
    "size-not-multiple": dict(scheduler=None, call=dict(prompt="x", image=sample_image(37, 45), strength=0.8)),
    "heun-second-order": dict(  # 2 model calls a step: the strength cut skips order x steps
        scheduler="HeunDiscreteScheduler",
        call=dict(prompt="x", image=sample_image(), strength=0.75, num_inference_steps=4),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_sd1_matches_diffusers(sd1_folder, case):
    spec = CASES[case]
    ours, theirs = load_both(IMG2IMG, sd1_folder, spec["scheduler"])
    call = dict(spec["call"])
    diff, images = run_both(ours, theirs, seed=call.pop("seed", 0), **call)
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    assert images.std() > 0.01


@pytest.mark.parametrize("scheduler", [None, "EulerDiscreteScheduler"])
def test_sd2_v_prediction_matches_diffusers(sd2_folder, scheduler):
    ours, theirs = load_both(IMG2IMG, sd2_folder, scheduler)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    diff, _ = run_both(ours, theirs, prompt=["a castle", "a ship"], image=sample_image(), strength=0.75,
                       num_images_per_prompt=2)
    assert diff < TOLERANCE


def test_latents_as_image_match_diffusers(sd1_folder):
    ours, theirs = load_both(IMG2IMG, sd1_folder)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    diff, images = run_both(ours, theirs, prompt="x", image=latents, strength=0.5, num_inference_steps=4)
    assert diff < TOLERANCE and images.shape == (1, 32, 32, 3)  # the tiny VAE upsamples x2


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    p = stablepipe.StableDiffusionImg2ImgPipeline.from_pretrained(sd1_folder)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, image, **kwargs):
    kwargs = {"prompt": "x", "num_inference_steps": 2, "output_type": "np", "generator": seeded(0), **kwargs}
    return pipe(image=image, **kwargs).images


def test_image_formats_are_converted(pipe):
    """Grayscale, RGBA, 16-bit, uint8 / uint16 arrays and (C, H, W) tensors give the RGB image's result."""
    rgb = sample_image()
    gray = rgb.convert("L")
    reference, from_gray = run(pipe, rgb), run(pipe, gray)
    assert max_diff(from_gray, run(pipe, gray.convert("RGB"))) == 0
    assert max_diff(from_gray, reference) > 1e-3  # the gray picture is another picture
    rgba = rgb.copy()
    rgba.putalpha(128)
    assert max_diff(run(pipe, rgba), reference) == 0
    sixteen = PIL.Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16") and max_diff(run(pipe, sixteen), from_gray) == 0
    pixels = np.array(rgb)
    assert max_diff(run(pipe, pixels), reference) < 1e-5  # uint8 (H, W, C)
    assert max_diff(run(pipe, pixels.astype(np.uint16) * 257), reference) < 1e-5
    assert max_diff(run(pipe, as_tensor(rgb)), reference) < 1e-5
    assert max_diff(run(pipe, torch.from_numpy(pixels).permute(2, 0, 1)), reference) < 1e-5  # uint8 tensor


def test_strength_sets_the_number_of_steps(pipe):
    pipe = stablepipe.StableDiffusionImg2ImgPipeline(
        **{**pipe.components, "scheduler": stablepipe.DDIMScheduler.from_config(pipe.scheduler.config)}
    )
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def count(p, i, t, tensors):
        seen.append(int(t))
        return {}

    run(pipe, sample_image(), strength=0.5, num_inference_steps=6, callback_on_step_end=count)
    assert len(seen) == 3  # int(6 * 0.5)
    assert seen == [int(t) for t in pipe.scheduler.timesteps[3:]]
    low = run(pipe, sample_image(), strength=0.3, num_inference_steps=10)
    high = run(pipe, sample_image(), strength=1.0, num_inference_steps=10)
    assert max_diff(low, high) > 0.05


def test_components_are_shared_and_unet_kind_is_checked(sd1_folder, inpaint_folder, depth_folder):
    text2img = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    img2img = stablepipe.StableDiffusionImg2ImgPipeline(**text2img.components)
    assert img2img.unet is text2img.unet
    assert img2img.unet.conv_in.weight.data_ptr() == text2img.unet.conv_in.weight.data_ptr()
    inpaint = stablepipe.StableDiffusionInpaintPipeline.from_pretrained(inpaint_folder)
    with pytest.raises(ValueError, match="inpainting UNet.*StableDiffusionInpaintPipeline"):
        stablepipe.StableDiffusionImg2ImgPipeline(**inpaint.components)
    with pytest.raises(ValueError, match="this UNet is a depth UNet.*belongs in StableDiffusionDepth2ImgPipeline"):
        stablepipe.StableDiffusionImg2ImgPipeline.from_pretrained(depth_folder)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=-0.1), r"strength must be a number in \[0, 1\], got -0.1"),
        (dict(strength=1.5), r"strength must be a number in \[0, 1\]"),
        (dict(strength="high"), r"strength must be a number in \[0, 1\]"),
        (dict(strength=0.2, num_inference_steps=4), "leaves no denoising step"),
        (dict(image=None), "no image given"),
        (dict(image="photo.png"), "image must be PIL images, numpy arrays or tensors"),
        (dict(image=sample_image(1, 1)), "it must be at least 2x2"),
        (dict(image=np.zeros((8, 8, 3), dtype=np.int32)), "dtype int32"),
        (dict(image=[sample_image()] * 3, prompt=["a", "b"]), "got 3 images for a batch of 2"),
        (dict(generator=[torch.Generator()] * 3), "3 generators for 1 images"),
        (dict(height=64), r"unknown arguments \['height'\]"),
        (dict(callback_on_step_end_tensor_inputs=["mask"]), "not available"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, kwargs, message):
    kwargs = {"image": sample_image(), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        run(pipe, **kwargs)


def test_cli_img2img(tmp_path, monkeypatch, capsys):
    from stablepipe.cli import main

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "in.png"
    sample_image(40, 24).convert("L").save(source)  # grayscale input is fine
    out = tmp_path / "out.png"
    args = ["img2img", "a boat", "--image", str(source), "--strength", "0.5", "--steps", "2", "--seed", "4", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    result = PIL.Image.open(out)
    assert result.size == (40, 24) and result.mode == "RGB"
    settings = json.loads(result.text["stablepipe"])
    assert settings["strength"] == 0.5 and settings["image"] == str(source) and settings["seed"] == 4
    assert main([*args, "--width", "32", "--height", "16", "--out", str(tmp_path / "small.png")]) == 0
    assert PIL.Image.open(tmp_path / "small.png").size == (32, 16)
    assert main([*args, "--strength", "2", "--out", str(tmp_path / "strength.png")]) == 2
    assert "strength must be a number in [0, 1]" in capsys.readouterr().err
    assert main(["img2img", "x", "--image", str(tmp_path / "missing.png"), "--quiet"]) == 2
    assert "missing.png" in capsys.readouterr().err
