"""Inpainting: 9-channel and 4-channel UNets match diffusers (batches, strength, padding_mask_crop,
masked_image_latents, latents); masks in every format; all-black / all-white masks; errors; CLI."""

from __future__ import annotations

import json

import fixtures_image
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff
from fixtures_image import TOLERANCE, load_both, run_both, sample_image, sample_mask, seeded

import stablepipe
from stablepipe.pipelines import image_stages, vae_codec

inpaint_folder, inpaint_sd2_folder, depth_folder = (  # session fixtures used here
    fixtures_image.inpaint_folder, fixtures_image.inpaint_sd2_folder, fixtures_image.depth_folder
)
INPAINT = "StableDiffusionInpaintPipeline"
IMAGE, MASK = sample_image(), sample_mask()

NINE_CHANNEL_CASES = {
    "pndm-full-strength": dict(scheduler=None, call=dict(prompt="a cat", image=IMAGE, mask_image=MASK)),
    "euler-strength": dict(
        scheduler="EulerDiscreteScheduler",
        call=dict(prompt="a cat", image=IMAGE, mask_image=MASK, strength=0.7, num_inference_steps=4),
    ),
    "ddim-batch": dict(
        scheduler="DDIMScheduler",
        call=dict(prompt=["a cat", "a dog"], image=[IMAGE, sample_image(seed=1)], mask_image=MASK,
                  num_images_per_prompt=2, strength=0.8, num_inference_steps=4, eta=0.5),
    ),
    "ancestral-generators-size": dict(
        scheduler="EulerAncestralDiscreteScheduler",
        call=dict(prompt="x", image=sample_image(48, 40), mask_image=sample_mask(48, 40), height=24, width=40,
                  num_images_per_prompt=2, seed=[3, 4]),
    ),
    "padding-mask-crop": dict(
        scheduler=None,
        call=dict(prompt="x", image=sample_image(48, 40), mask_image=sample_mask(48, 40, (30, 4, 40, 12)),
                  padding_mask_crop=2, output_type="pil"),
    ),
    "tensors-unguided": dict(
        scheduler="LMSDiscreteScheduler",
        call=dict(prompt="x", image=torch.from_numpy(np.asarray(IMAGE) / 255.0).permute(2, 0, 1).float(),
                  mask_image=torch.from_numpy(np.asarray(MASK) / 255.0)[None].float(), guidance_scale=1.0),
    ),
    "given-latents": dict(
        scheduler=None,
        call=dict(prompt="x", image=IMAGE, mask_image=MASK, strength=0.6, num_inference_steps=5,
                  latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))),
    ),
}


def check_parity(folder, spec):
    ours, theirs = load_both(INPAINT, folder, spec["scheduler"])
    call = dict(spec["call"])
    diff, images = run_both(ours, theirs, seed=call.pop("seed", 0), **call)
    assert diff < TOLERANCE, f"max abs diff {diff}"
    assert images.std() > 0.01
    return images


@pytest.mark.parametrize("case", NINE_CHANNEL_CASES)
def test_inpainting_unet_matches_diffusers(inpaint_folder, case):
    check_parity(inpaint_folder, NINE_CHANNEL_CASES[case])


FOUR_CHANNEL_CASES = {
    "pndm": dict(scheduler=None, call=dict(prompt="a cat", image=IMAGE, mask_image=MASK)),
    "ancestral-batch": dict(  # a stochastic sampler: the generator must be in step after the skipped encode
        scheduler="EulerAncestralDiscreteScheduler",
        call=dict(prompt=["a", "b"], image=IMAGE, mask_image=MASK, num_images_per_prompt=2, strength=0.9),
    ),
    "ddim-eta-strength": dict(
        scheduler="DDIMScheduler",
        call=dict(prompt="x", image=IMAGE, mask_image=MASK, strength=0.6, num_inference_steps=5, eta=0.7, seed=[1]),
    ),
    "kdpm2-ancestral-second-order": dict(
        scheduler="KDPM2AncestralDiscreteScheduler",
        call=dict(prompt="x", image=IMAGE, mask_image=MASK, strength=0.75, num_inference_steps=4),
    ),
    "all-white-mask": dict(
        scheduler=None, call=dict(prompt="x", image=IMAGE, mask_image=sample_mask(box=(0, 0, 32, 32)))
    ),
}


@pytest.mark.parametrize("case", FOUR_CHANNEL_CASES)
def test_plain_unet_matches_diffusers(sd1_folder, case):
    check_parity(sd1_folder, FOUR_CHANNEL_CASES[case])


def test_sd2_inpainting_v_prediction_and_masked_image_latents(inpaint_sd2_folder):
    ours, theirs = load_both(INPAINT, inpaint_sd2_folder)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    masked = image_stages.preprocess_image(IMAGE) * (image_stages.preprocess_mask(MASK) < 0.5)
    with torch.no_grad():
        latents = vae_codec.encode_images(ours.vae, masked, generator=seeded(9))  # (1, 4, 16, 16)
    diff, _ = run_both(ours, theirs, prompt="a castle", image=IMAGE, mask_image=MASK, masked_image_latents=latents)
    assert diff < TOLERANCE
    plain, _ = run_both(ours, theirs, prompt="a castle", image=IMAGE, mask_image=MASK)
    assert plain < TOLERANCE


@pytest.fixture(scope="module")
def pipes(inpaint_folder, sd1_folder):
    loaded = {}
    for name, folder in (("nine", inpaint_folder), ("four", sd1_folder)):
        loaded[name] = stablepipe.StableDiffusionInpaintPipeline.from_pretrained(folder, requires_safety_checker=False)
        loaded[name].set_progress_bar_config(disable=True)
    return loaded


def run(pipe, **kwargs):
    kwargs = {"prompt": "x", "image": IMAGE, "mask_image": MASK, "num_inference_steps": 2, "output_type": "np",
              "generator": seeded(0), **kwargs}
    return pipe(**kwargs).images


def test_mask_formats_give_the_same_result(pipes):
    pipe = pipes["nine"]
    reference = run(pipe)
    gray = np.array(MASK)
    for mask in (MASK.convert("RGB"), MASK.convert("1"), gray, gray > 127, gray.astype(np.uint16) * 257,
                 torch.from_numpy(gray / 255.0)[None].float(), torch.from_numpy(gray)[None, None]):
        assert max_diff(run(pipe, mask_image=mask), reference) == 0, type(mask)
    assert max_diff(run(pipe, mask_image=sample_mask(box=(0, 0, 16, 32))), reference) > 1e-3


def test_all_black_mask_keeps_the_image(pipes):
    """4-channel UNet: the known area is everything, so the result is the image's own latents, decoded."""
    pipe, black = pipes["four"], sample_mask(box=(0, 0, 0, 0))
    result = run(pipe, mask_image=black, output_type="pt")
    with torch.no_grad():
        expected = vae_codec.encode_images(pipe.vae, image_stages.preprocess_image(IMAGE), generator=seeded(0))
        decoded = (pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert max_diff(result, decoded) < 1e-5
    cropped = pipe(prompt="x", image=IMAGE, mask_image=black, padding_mask_crop=4, num_inference_steps=2).images[0]
    assert np.array_equal(np.asarray(cropped), np.asarray(IMAGE))  # nothing to repaint: the image comes back


def test_callback_sees_the_mask(pipes):
    seen = {}

    def callback(pipe, i, t, tensors):
        seen.update({k: tuple(v.shape) for k, v in tensors.items()})
        return {}

    run(pipes["nine"], callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "mask", "masked_image_latents"])
    assert seen == {"latents": (1, 4, 16, 16), "mask": (2, 1, 16, 16), "masked_image_latents": (2, 4, 16, 16)}


def test_components_are_shared_and_unet_kind_is_checked(sd1_folder, inpaint_folder, depth_folder):
    text2img = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    inpaint = stablepipe.StableDiffusionInpaintPipeline(**text2img.components)
    assert inpaint.vae.encoder.conv_in.weight.data_ptr() == text2img.vae.encoder.conv_in.weight.data_ptr()
    assert not inpaint.inpainting_unet
    nine = stablepipe.StableDiffusionInpaintPipeline.from_pretrained(inpaint_folder)
    assert nine.inpainting_unet and nine.unet.config.in_channels == 9
    depth_unet = stablepipe.UNet2DConditionModel.from_pretrained(depth_folder / "unet")
    with pytest.raises(ValueError, match="this UNet is a depth UNet.*belongs in StableDiffusionDepth2ImgPipeline"):
        stablepipe.StableDiffusionInpaintPipeline(**{**nine.components, "unet": depth_unet})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_image=sample_mask(32, 24)), r"mask_image is 32x24 but image is 32x32"),
        (dict(mask_image=[MASK] * 2, image=[IMAGE] * 3), "got 2 masks for 3 images"),
        (dict(mask_image=None), "no mask given"),
        (dict(strength=1.2), r"strength must be a number in \[0, 1\]"),
        (dict(strength=0.1, num_inference_steps=5), "leaves no denoising step"),
        (dict(height=21), "height must be a positive multiple of"),
        (dict(padding_mask_crop=2, image=np.asarray(IMAGE)), "padding_mask_crop works on one PIL image"),
        (dict(padding_mask_crop=2, output_type="pil"), None),
        (dict(padding_mask_crop=2, output_type="np"), "output_type must be 'pil'"),
        (dict(padding_mask_crop=-1), "padding_mask_crop must be a number of pixels >= 0"),
        (dict(masked_image_latents=torch.zeros(1, 4, 8, 8)), r"masked_image_latents must be a tensor \(B, 4, 16, 16\)"),
        (dict(image=torch.zeros(1, 4, 16, 16)), "pass `masked_image_latents` too"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), r"`latents` has shape \(1, 4, 8, 8\), expected \(1, 4, 16, 16\)"),
        (dict(generator=[torch.Generator()] * 2), "2 generators for 1 images"),
        (dict(callback_on_step_end_tensor_inputs=["depth_mask"]), "not available"),
    ],
)
def test_bad_input_is_a_clear_error(pipes, kwargs, message):
    if message is None:  # the valid neighbour of the bad cases
        assert len(run(pipes["nine"], **kwargs)) == 1
        return
    with pytest.raises((ValueError, TypeError), match=message):
        run(pipes["nine"], **kwargs)


def test_cli_inpaint(tmp_path, monkeypatch, capsys):
    from stablepipe.cli import main

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path / "cache"))
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    sample_image(40, 24).save(image)
    sample_mask(40, 24, (20, 4, 36, 20)).convert("RGB").save(mask)
    out = tmp_path / "out.png"
    args = ["inpaint", "a boat", "--image", str(image), "--mask", str(mask), "--steps", "2", "--seed", "4", "--quiet"]
    assert main([*args, "--padding-mask-crop", "2", "--out", str(out)]) == 0
    result = PIL.Image.open(out)
    assert result.size == (40, 24)
    settings = json.loads(result.text["stablepipe"])
    assert settings["mask"] == str(mask) and settings["padding_mask_crop"] == 2 and settings["strength"] == 1.0
    kept = np.asarray(result)[:, :16]  # left of the mask: the picture, untouched
    assert np.array_equal(kept, np.asarray(PIL.Image.open(image))[:, :16])
    PIL.Image.new("L", (16, 16)).save(tmp_path / "small.png")
    assert main([*args[:4], "--mask", str(tmp_path / "small.png"), "--steps", "1", "--quiet"]) == 2
    assert "mask_image is 16x16 but image is 40x24" in capsys.readouterr().err


def test_image_and_mask_processors_match_diffusers(inpaint_folder):
    """`pipe.image_processor` / `pipe.mask_processor` give what diffusers' give, and what a call uses: the
    pipeline fed their tensors (and latents made from them) paints the same picture as from PIL images."""
    ours, theirs = load_both("StableDiffusionInpaintPipeline", inpaint_folder)
    image, mask = sample_image(40, 48), sample_mask(40, 48)
    pixels = ours.image_processor.preprocess(image)
    torch.testing.assert_close(pixels, theirs.image_processor.preprocess(image))
    torch.testing.assert_close(ours.mask_processor.preprocess(mask), theirs.mask_processor.preprocess(mask))
    decoded = torch.rand(2, 3, 8, 8) * 2 - 1
    for output_type in ("np", "pt"):
        torch.testing.assert_close(torch.as_tensor(ours.image_processor.postprocess(decoded, output_type)),
                                   torch.as_tensor(theirs.image_processor.postprocess(decoded, output_type)))
    assert [np.asarray(p).tolist() for p in ours.image_processor.postprocess(decoded)] == [
        np.asarray(p).tolist() for p in theirs.image_processor.postprocess(decoded)]
    assert np.array_equal(np.asarray(ours.numpy_to_pil(np.full((1, 2, 2, 3), 0.5))[0]), np.full((2, 2, 3), 128))
    image, mask = sample_image(), sample_mask()  # at the pipeline's own size, so nothing is resized
    from_pil = run(ours, image=image, mask_image=mask)
    pixels, mask_values = ours.image_processor.preprocess(image), ours.mask_processor.preprocess(mask)
    from_tensors = run(ours, image=pixels, mask_image=mask_values)
    assert max_diff(from_pil, from_tensors) < 1e-6
