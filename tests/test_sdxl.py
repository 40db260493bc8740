"""Stable Diffusion XL: same folders, same seeds, same images as diffusers, for text-to-image, the refiner,
img2img, inpainting and the base -> refiner ensemble; the float32 VAE; errors; the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff

import stablepipe
from stablepipe.pipelines import vae_codec
from stablepipe.pipelines.arguments import NonFiniteResultError

pytest_plugins = ["fixtures_sdxl"]  # sdxl_folder, sdxl_refiner_folder, sdxl_inpaint_folder

TOLERANCE = 2e-3
CPU = torch.device("cpu")


def load_both(name: str, folder, scheduler: str | None = None, **kwargs):
    """stablepipe's and diffusers' pipeline `name` from the same folder, optionally with another scheduler."""
    import diffusers

    ours = getattr(stablepipe, name).from_pretrained(folder, **kwargs)
    theirs = getattr(diffusers, name).from_pretrained(folder, add_watermarker=False, **kwargs)
    if scheduler:
        ours.scheduler = getattr(stablepipe, scheduler).from_config(ours.scheduler.config)
        theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def run_both(ours, theirs, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "np", **kwargs}
    a = ours(generator=torch.Generator().manual_seed(seed), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(seed), **kwargs).images
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return max_diff(a, b), a


@pytest.fixture(scope="module")
def picture():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def mask():
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[8:24, 4:20] = 255
    return PIL.Image.fromarray(pixels)


# ---- text-to-image -----------------------------------------------------------------------------------------

T2I_CASES = {
    "zeros-for-empty-negative": dict(scheduler=None, call=dict(prompt="a red circle")),
    "two-prompts-rescale": dict(scheduler=None, call=dict(
        prompt="a red circle", prompt_2="on the sea", negative_prompt="blue", negative_prompt_2="green",
        guidance_rescale=0.7,
    )),
    "batch-micro-conditioning": dict(scheduler="EulerAncestralDiscreteScheduler", call=dict(
        prompt=["a red circle", "an owl"], original_size=(64, 48),
        crops_coords_top_left=(4, 8), target_size=(32, 32), negative_original_size=(16, 16),
        negative_crops_coords_top_left=(2, 2), negative_target_size=(24, 24),
    )),
    "unguided-clip-skip": dict(scheduler="DDIMScheduler", call=dict(prompt="an owl", guidance_scale=1.0, clip_skip=1)),
    "nonsquare-dpm": dict(scheduler="DPMSolverMultistepScheduler", call=dict(prompt="an owl", height=48, width=32)),
}


@pytest.mark.parametrize("case", T2I_CASES)
def test_text_to_image_matches_diffusers(sdxl_folder, case):
    spec = T2I_CASES[case]
    ours, theirs = load_both("StableDiffusionXLPipeline", sdxl_folder, spec["scheduler"])
    diff, images = run_both(ours, theirs, **spec["call"])
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    assert images.std() > 0.01


def test_force_zeros_off_encodes_the_empty_negative_prompt(sdxl_folder):
    ours, theirs = load_both("StableDiffusionXLPipeline", sdxl_folder, force_zeros_for_empty_prompt=False)
    assert ours.force_zeros_for_empty_prompt is False
    diff, _ = run_both(ours, theirs, prompt="a cat", height=32, width=32)
    assert diff < TOLERANCE
    _, negative, _, negative_pooled = ours.encode_prompt("a cat", device=CPU)
    assert negative.abs().sum() > 0 and negative_pooled.abs().sum() > 0  # "" encoded, not zeros


def test_encode_prompt_matches_diffusers(sdxl_folder, sdxl_refiner_folder):
    ours, theirs = load_both("StableDiffusionXLPipeline", sdxl_folder)
    kwargs = dict(prompt=["a", "b"], prompt_2=["c", "d"], negative_prompt="x", negative_prompt_2=["y", "z"],
                  num_images_per_prompt=2, device=CPU)
    for a, b in zip(ours.encode_prompt(**kwargs), theirs.encode_prompt(**kwargs)):
        assert a.shape == b.shape and max_diff(a, b.detach()) == 0.0
    assert ours.encode_prompt(**kwargs)[0].shape == (4, 77, 64)  # both encoders' 32 features each
    ours_r, theirs_r = load_both("StableDiffusionXLImg2ImgPipeline", sdxl_refiner_folder)
    assert ours_r.text_encoder is None and ours_r.tokenizer is None
    kwargs = dict(prompt="a", prompt_2="ignored by the refiner", negative_prompt="n", device=CPU)
    for a, b in zip(ours_r.encode_prompt(**kwargs), theirs_r.encode_prompt(**kwargs)):
        assert a.shape == b.shape and max_diff(a, b.detach()) == 0.0


def test_prompt_embeds_input_matches_prompt(sdxl_folder):
    ours, _ = load_both("StableDiffusionXLPipeline", sdxl_folder)
    embeds, negative, pooled, negative_pooled = ours.encode_prompt("a dog", device=CPU, negative_prompt="cat")
    common = dict(num_inference_steps=2, output_type="np")
    a = ours("a dog", negative_prompt="cat", generator=torch.Generator().manual_seed(0), **common).images
    b = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
             negative_pooled_prompt_embeds=negative_pooled, generator=torch.Generator().manual_seed(0), **common).images
    assert max_diff(a, b) < 1e-6


# ---- image-to-image, the refiner, the ensemble ---------------------------------------------------------------


def test_refiner_img2img_matches_diffusers(sdxl_refiner_folder, picture):
    ours, theirs = load_both("StableDiffusionXLImg2ImgPipeline", sdxl_refiner_folder)
    assert ours.requires_aesthetics_score is True and ours.text_encoder is None
    diff, images = run_both(ours, theirs, prompt="a cat", image=picture, strength=0.6)
    assert diff < TOLERANCE and images.std() > 0.01
    batch = dict(prompt=["a cat", "a dog"], image=picture, strength=0.6, num_images_per_prompt=2,
                 negative_prompt="fog", aesthetic_score=7.5, negative_aesthetic_score=1.5)
    diff, _ = run_both(ours, theirs, **batch)
    assert diff < TOLERANCE
    common = dict(prompt="a cat", image=picture, strength=0.6, num_inference_steps=3, output_type="np")
    default = ours(generator=torch.Generator().manual_seed(0), **common).images
    low = ours(generator=torch.Generator().manual_seed(0), aesthetic_score=1.0, **common).images
    assert max_diff(default, low) > 1e-4  # the score reaches the UNet


def test_base_img2img_matches_diffusers(sdxl_folder, picture):
    ours, theirs = load_both("StableDiffusionXLImg2ImgPipeline", sdxl_folder, "EulerAncestralDiscreteScheduler")
    assert ours.requires_aesthetics_score is False
    diff, _ = run_both(ours, theirs, prompt="a cat", image=picture, strength=0.75, negative_prompt="dog",
                       original_size=(64, 64), negative_original_size=(16, 16))
    assert diff < TOLERANCE
    lists = dict(prompt="a cat", image=picture, strength=0.75, num_images_per_prompt=2, num_inference_steps=3,
                 output_type="np")
    a = ours(generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **lists).images
    b = theirs(generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **lists).images
    assert max_diff(a, b) < TOLERANCE


@pytest.mark.parametrize("scheduler", [None, "HeunDiscreteScheduler"])
def test_base_to_refiner_ensemble_matches_diffusers(sdxl_folder, sdxl_refiner_folder, scheduler):
    base, base_theirs = load_both("StableDiffusionXLPipeline", sdxl_folder, scheduler)
    refiner, refiner_theirs = load_both("StableDiffusionXLImg2ImgPipeline", sdxl_refiner_folder, scheduler)
    first = dict(prompt="a lion", num_inference_steps=4, denoising_end=0.8, output_type="latent")
    latents = base(generator=torch.Generator().manual_seed(0), **first).images
    latents_theirs = base_theirs(generator=torch.Generator().manual_seed(0), **first).images
    assert latents.shape == (1, 4, 16, 16) and max_diff(latents, latents_theirs) < 1e-4
    assert base.num_timesteps < len(base.scheduler.timesteps)  # the base stopped early
    second = dict(prompt="a lion", num_inference_steps=4, denoising_start=0.8, output_type="np")
    a = refiner(image=latents, generator=torch.Generator().manual_seed(1), **second).images
    b = refiner_theirs(image=latents_theirs, generator=torch.Generator().manual_seed(1), **second).images
    assert max_diff(a, b) < TOLERANCE and a.std() > 0.01
    # the refiner takes the rest; a second-order scheduler's refiner starts one (half-)step earlier, on a whole step
    overlap = 1 if scheduler else 0
    assert refiner.num_timesteps + base.num_timesteps == len(base.scheduler.timesteps) + overlap


# ---- inpainting ------------------------------------------------------------------------------------------------

INPAINT_CASES = {
    "base-default-strength": dict(folder="sdxl_folder", call=dict(prompt="a cat")),
    "base-full-strength-batch": dict(folder="sdxl_folder", call=dict(prompt="a cat", strength=1.0,
                                                                     num_images_per_prompt=2)),
    "inpaint-unet": dict(folder="sdxl_inpaint_folder", call=dict(prompt="a cat", strength=0.7, negative_prompt="dog")),
    "inpaint-unet-full-strength": dict(folder="sdxl_inpaint_folder", call=dict(prompt="a cat", strength=1.0)),
    "refiner": dict(folder="sdxl_refiner_folder", call=dict(prompt="a cat", strength=0.5)),
}


@pytest.mark.parametrize("case", INPAINT_CASES)
def test_inpaint_matches_diffusers(request, picture, mask, case):
    spec = INPAINT_CASES[case]
    ours, theirs = load_both("StableDiffusionXLInpaintPipeline", request.getfixturevalue(spec["folder"]))
    diff, images = run_both(ours, theirs, image=picture, mask_image=mask, **spec["call"])
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    assert images.std() > 0.01


def test_inpaint_padding_mask_crop_and_ensemble(sdxl_folder, sdxl_refiner_folder, picture, mask):
    ours, theirs = load_both("StableDiffusionXLInpaintPipeline", sdxl_folder, "EulerAncestralDiscreteScheduler")
    big_picture, big_mask = picture.resize((48, 40)), mask.resize((48, 40))
    crop = dict(prompt="a cat", image=big_picture, mask_image=big_mask, padding_mask_crop=2, output_type="pil")
    a = ours(generator=torch.Generator().manual_seed(0), num_inference_steps=3, **crop).images[0]
    b = theirs(generator=torch.Generator().manual_seed(0), num_inference_steps=3, **crop).images[0]
    assert a.size == (48, 40) and max_diff(np.asarray(a) / 255, np.asarray(b) / 255) <= 1 / 255
    refiner, refiner_theirs = load_both("StableDiffusionXLInpaintPipeline", sdxl_refiner_folder)
    first = dict(prompt="a cat", image=picture, mask_image=mask, num_inference_steps=5, denoising_end=0.8,
                 output_type="latent")
    latents = ours(generator=torch.Generator().manual_seed(0), **first).images
    latents_theirs = theirs(generator=torch.Generator().manual_seed(0), **first).images
    second = dict(prompt="a cat", mask_image=mask, num_inference_steps=5, denoising_start=0.8, output_type="np")
    a = refiner(image=latents, generator=torch.Generator().manual_seed(1), **second).images
    b = refiner_theirs(image=latents_theirs, generator=torch.Generator().manual_seed(1), **second).images
    assert max_diff(a, b) < TOLERANCE


# ---- IP-Adapters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"])
def test_ip_adapter_image_embeds_match_diffusers(sdxl_folder, picture, name):
    """SDXL adds the IP-Adapter's image embeds to its own added_cond_kwargs (text_embeds, time_ids)."""
    from test_ip_adapter import IMAGE_EMBED_DIM, plain_adapter

    ours, theirs = load_both(name, sdxl_folder)
    adapter = plain_adapter(theirs.unet, seed=3)
    for pipe in (ours, theirs):
        pipe.load_ip_adapter(adapter, subfolder=None, weight_name=None, image_encoder_folder=None)
    embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(4))]  # (negative, positive)
    call = dict(prompt=["a cat", "a dog"], ip_adapter_image_embeds=embeds)
    if name.endswith("Img2ImgPipeline"):
        call.update(image=picture, strength=0.7)
    diff, images = run_both(ours, theirs, **call)
    assert diff < TOLERANCE, f"max abs diff {diff}"
    _, without = run_both(ours, theirs, **{**call, "ip_adapter_image_embeds": [embeds[0] * 0]})
    assert max_diff(images, without) > 1e-3  # the image embeds reach the UNet


# ---- components, saving ------------------------------------------------------------------------------------------


def test_components_share_weights_and_save_for_diffusers(sdxl_refiner_folder, sdxl_folder, tmp_path, picture):
    import diffusers

    base = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    img2img = stablepipe.StableDiffusionXLImg2ImgPipeline(**base.components)
    assert img2img.unet is base.unet and img2img.text_encoder_2 is base.text_encoder_2
    assert set(base.components) == {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
                                    "scheduler", "image_encoder", "feature_extractor"}
    refiner = stablepipe.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_refiner_folder)
    refiner.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is True and index["text_encoder"] == [None, None]
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    refiner.set_progress_bar_config(disable=True)
    diff, _ = run_both(refiner, theirs, prompt="x", image=picture, strength=0.5)
    assert diff < TOLERANCE


# ---- the VAE in float32 -------------------------------------------------------------------------------------------


@pytest.fixture
def overflowing_vae(sdxl_folder):
    """The fixture's VAE with post_quant_conv scaled so that its activations overflow float16 (as the real SDXL
    VAE's do), but not float32: the decoder's first GroupNorm brings them back."""
    vae = stablepipe.AutoencoderKL.from_pretrained(sdxl_folder / "vae")
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(3e4)
        vae.post_quant_conv.bias.mul_(3e4)
    return vae


@torch.no_grad()
def test_force_upcast_decodes_float16_in_float32(overflowing_vae):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = vae_codec.decode_latents(overflowing_vae, latents, upcast=True)  # float32 throughout
    assert torch.isfinite(reference).all()
    overflowing_vae.to(torch.float16)
    seen = []
    overflowing_vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN warning
        images = vae_codec.decode_latents(overflowing_vae, latents.half(), upcast=True)
    assert seen == [torch.float32] and overflowing_vae.dtype == torch.float16  # upcast, then cast back
    assert torch.isfinite(images).all() and max_diff(images, reference) < 0.05  # only the fp16 latents' rounding


@torch.no_grad()
def test_float16_overflow_without_upcast_is_reported(overflowing_vae):
    overflowing_vae.to(torch.float16)
    overflowing_vae.register_to_config(force_upcast=False)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    with pytest.raises(NonFiniteResultError, match=r"NaN or infinite values for image\(s\) \[0, 1\].*upcast=False"):
        vae_codec.decode_latents(overflowing_vae, latents, upcast=True)


def test_float16_pipeline_gives_finite_images(sdxl_folder):
    pipe = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    out = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(out.images).all() and out.images.std() > 0.01 and pipe.vae.dtype == torch.float16


# ---- errors -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_pipe(sdxl_folder):
    pipe = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a", height=31), "height must be a positive multiple of 2"),
        (dict(prompt="a", prompt_2=["b", "c"]), "got 2 entries in `prompt_2` for 1 prompts"),
        (dict(prompt_embeds=torch.zeros(1, 77, 64)), "pass `pooled_prompt_embeds` too"),
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 64)), "either `prompt` or `prompt_embeds`"),
        (dict(prompt="a", denoising_end=1.5), "denoising_end must be a float between 0 and 1"),
        (dict(prompt="a", output_type="jpeg"), "output_type must be one of"),
        (dict(prompt="a", strength=0.5), r"unknown arguments \['strength'\]"),
        (dict(prompt="a", callback_on_step_end_tensor_inputs=["mask"]), "not available"),
    ],
)
def test_bad_input_is_a_clear_error(base_pipe, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        base_pipe(**{"num_inference_steps": 1, **kwargs})


def test_image_pipeline_errors(sdxl_folder, sdxl_refiner_folder, picture):
    img2img = stablepipe.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_folder)
    with pytest.raises(ValueError, match=r"denoising_start \(0.8\) must be smaller than denoising_end \(0.5\)"):
        img2img("a", image=picture, denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(ValueError, match="strength must be a number in"):
        img2img("a", image=picture, strength=1.5)
    img2img_class = stablepipe.StableDiffusionXLImg2ImgPipeline
    wrong = img2img_class.from_pretrained(sdxl_refiner_folder, requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="SDXL refiner: load it with requires_aesthetics_score=True"):
        wrong("a", image=picture)
    swapped = img2img_class.from_pretrained(sdxl_folder, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="SDXL base model: load it with requires_aesthetics_score=False"):
        swapped("a", image=picture)


def test_sd1_checkpoint_in_sdxl_pipeline_is_named(sd1_folder):
    pipe = stablepipe.StableDiffusionXLPipeline.from_pretrained(sd1_folder)
    assert pipe.text_encoder_2 is None
    with pytest.raises(ValueError, match="not an SDXL checkpoint; load it with StableDiffusionPipeline"):
        pipe("a", num_inference_steps=1)


def test_watermarker_request_warns(sdxl_folder):
    with pytest.warns(UserWarning, match="invisible watermark"):
        stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=True)


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli_generate_with_sdxl_and_refiner(sdxl_folder, sdxl_refiner_folder, tmp_path, capsys):
    from stablepipe.cli import main

    out = tmp_path / "lion.png"
    args = ["generate", "a lion", "--model", str(sdxl_folder), "--dtype", "float32", "--seed", "5", "--steps", "4",
            "--out", str(out), "--quiet", "--no-safety-checker"]
    assert main([*args, "--refiner", str(sdxl_refiner_folder), "--refiner-start", "0.75"]) == 0
    image = PIL.Image.open(out)
    settings = json.loads(image.text["stablepipe"])
    assert image.size == (32, 32) and settings["refiner"] == str(sdxl_refiner_folder)
    assert settings["refiner_start"] == 0.75 and settings["seed"] == 5
    base = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    refiner = stablepipe.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        sdxl_refiner_folder, vae=base.vae, text_encoder_2=base.text_encoder_2
    )
    common = dict(num_inference_steps=4, generator=[torch.Generator().manual_seed(5)])
    latents = base("a lion", denoising_end=0.75, output_type="latent", **common).images
    expected = refiner("a lion", image=latents, denoising_start=0.75, **common).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))  # the command is the documented recipe
    assert main([*args[:-4], "--out", str(tmp_path / "plain.png"), "--quiet"]) == 0  # SDXL without refiner
    assert PIL.Image.open(tmp_path / "plain.png").size == (32, 32)


def test_cli_refiner_errors(sdxl_folder, tmp_path, capsys):
    from stablepipe.cli import main
    from stablepipe.cli.sdxl import is_sdxl, model_index

    assert is_sdxl(model_index(sdxl_folder)) and not is_sdxl({"_class_name": "StableDiffusionPipeline"})
    assert main(["generate", "x", "--refiner", str(sdxl_folder), "--out", str(tmp_path)]) == 2
    assert "--refiner needs an SDXL --model" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(sdxl_folder), "--refiner-start", "1.5", "--out", str(tmp_path)]) == 2
    assert "--refiner-start must be between 0 and 1" in capsys.readouterr().err
