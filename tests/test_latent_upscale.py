"""The x2 latent upscaler: its K-block UNet against diffusers' (model level), the pipeline on images and on
latents, chained after text-to-image, tiling, errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff
from fixtures_upscale import X2_UNET, load_both, low_res_images, write_x2_folder

import stablepipe
from stablepipe.pipelines.latent_upscale import karras_scalings

TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def x2_folder(tmp_path_factory):
    return write_x2_folder(tmp_path_factory.mktemp("x2"))


@pytest.fixture(scope="module")
def x2_pipes(x2_folder):
    return load_both("StableDiffusionLatentUpscalePipeline", x2_folder)


def run(pipe, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


# ---- the UNet with K-blocks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (16, 24)])
def test_k_block_unet_matches_diffusers(x2_folder, size):
    import diffusers

    ours = stablepipe.UNet2DConditionModel.from_pretrained(x2_folder / "unet")  # strict: every key and shape
    theirs = diffusers.UNet2DConditionModel.from_pretrained(x2_folder / "unet").eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert [type(b).__name__ for b in ours.down_blocks] == list(X2_UNET["down_block_types"])
    assert ours.up_blocks[0].attentions[0].attn1 is not None  # "first" up block: self-attention, as diffusers
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 8, *size, generator=g), torch.randn(2, 7, 32, generator=g)
    cond, t = torch.randn(2, 160, generator=g), torch.tensor(-0.4)
    with torch.no_grad():
        a = ours(sample, t, context, timestep_cond=cond).sample
        b = theirs(sample, t, encoder_hidden_states=context, timestep_cond=cond).sample
    assert a.shape == (2, 5, *size) and max_diff(a, b) < 1e-4 and a.std() > 0.01


def test_karras_scalings_preserve_unit_variance():
    sigma = torch.tensor([0.03, 1.0, 14.6])
    c_skip, c_out, c_in, c_noise = karras_scalings(sigma)
    assert torch.allclose(c_skip + c_out**2, torch.ones(3))  # sigma_data = 1: D(x) has unit variance
    assert torch.allclose(c_in, (sigma**2 + 1) ** -0.5) and torch.allclose(c_noise, sigma.log() / 4)


# ---- the pipeline --------------------------------------------------------------------------------------------


def pil(size: int) -> PIL.Image.Image:
    pixels = low_res_images(1, size, seed=3)[0].permute(1, 2, 0).numpy()
    return PIL.Image.fromarray((pixels * 255).round().astype(np.uint8))


CASES = {
    "image-guided": dict(prompt="a red circle", image=low_res_images(1, 64)),
    "latents-batch-negatives": dict(
        prompt=["a red circle", "a ship"], image=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)),
        negative_prompt=["blue", "fog"],
    ),
    "latents-guidance-0": dict(
        prompt="a cat", image=torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(7)), guidance_scale=0,
    ),
    "pil-unguided": dict(prompt="an owl", image=pil(96), guidance_scale=1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_x2_matches_diffusers(x2_pipes, case):
    ours, theirs = x2_pipes
    a, b = run(ours, **CASES[case]), run(theirs, **CASES[case])
    assert a.shape == b.shape and max_diff(a, b) < TOLERANCE, f"{case}: max abs diff {max_diff(a, b)}"
    assert a.std() > 0.01


def test_x2_with_prompt_embeds_and_pooled(x2_pipes):
    ours, theirs = x2_pipes
    embeds = theirs.encode_prompt(["a cat"], "cpu", True, ["dog"])
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    kwargs = dict(zip(names, embeds), image=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
    assert max_diff(run(ours, **kwargs), run(theirs, **kwargs)) < TOLERANCE
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=embeds[0], image=kwargs["image"])


def test_chain_text_to_image_latents_into_the_x2_upscaler(sd1_folder, x2_pipes):
    """The README example: text-to-image with output_type="latent", then the latent upscaler on those latents."""
    import diffusers

    up_ours, up_theirs = x2_pipes
    sd_ours = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    sd_theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder)
    results = []
    for sd, up in ((sd_ours, up_ours), (sd_theirs, up_theirs)):
        sd.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(33)
        low_res = sd("an astronaut", num_inference_steps=2, height=32, width=32, generator=generator,
                     output_type="latent").images  # fmt: skip
        results.append(up("an astronaut", image=low_res, num_inference_steps=2, guidance_scale=0,
                          generator=generator, output_type="np").images)  # fmt: skip
    assert low_res.shape == (1, 4, 16, 16) and results[0].shape == (1, 256, 256, 3)
    assert max_diff(*results) < TOLERANCE


def test_output_sizes(x2_pipes):
    ours, _ = x2_pipes
    latents = run(ours, prompt="a cat", image=torch.randn(1, 4, 8, 12), output_type="latent")
    assert latents.shape == (1, 4, 16, 24)  # twice the input latents
    # 72 px: floored to 64 (a multiple of 32, so that the UNet halves evenly; diffusers fails inside its UNet)
    assert run(ours, prompt="a cat", image=pil(72), num_inference_steps=1).shape == (1, 128, 128, 3)


def test_tiling(x2_pipes):
    ours, _ = x2_pipes
    image = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    kwargs = dict(prompt="a cat", image=image, num_inference_steps=1)
    whole = run(ours, **kwargs)
    assert max_diff(whole, run(ours, tile_size=128, **kwargs)) == 0.0  # one tile: exactly untiled
    tiled, other_seed = run(ours, tile_size=64, tile_overlap=32, **kwargs), run(ours, seed=1, **kwargs)
    assert tiled.shape == whole.shape == (1, 256, 256, 3)
    assert np.abs(tiled - whole).mean() < np.abs(other_seed - whole).mean()


BAD_INPUTS = {
    "too small": (dict(image=torch.rand(1, 3, 32, 32)), "too small"),
    "too small latents": (dict(image=torch.randn(1, 4, 4, 4)), "too small"),
    "odd latents": (dict(image=torch.randn(1, 4, 8, 10)), "multiple of 4"),
    "five channels": (dict(image=torch.rand(1, 5, 64, 64)), "1, 3 or 4 color channels"),
    "image batch": (dict(image=torch.rand(3, 3, 64, 64), prompt=["a", "b"]), "3 images for 2 prompts"),
    "tile not multiple": (dict(tile_size=48), "tile_size must be a positive multiple of 64"),
    "negatives batch": (dict(prompt=["a", "b"], image=torch.rand(2, 3, 64, 64), negative_prompt=["x"]), "negative"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_fail_before_any_model_runs(x2_pipes, monkeypatch, case):
    ours, _ = x2_pipes
    kwargs, match = BAD_INPUTS[case]

    def boom(*args, **kw):
        raise AssertionError("the text encoder ran before the inputs were checked")

    monkeypatch.setattr(ours.text_encoder, "forward", boom)
    with pytest.raises(ValueError, match=match):
        ours(**{"prompt": "a cat", "image": low_res_images(1, 64), **kwargs})


def test_wrong_scheduler_and_unet_are_refused(x2_pipes):
    ours, _ = x2_pipes
    epsilon = stablepipe.StableDiffusionLatentUpscalePipeline(
        **{**ours.components, "scheduler": stablepipe.EulerDiscreteScheduler(prediction_type="epsilon")}
    )
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        epsilon("a cat", image=low_res_images(1, 64))
    unet = stablepipe.UNet2DConditionModel(block_out_channels=(32, 64), cross_attention_dim=32, layers_per_block=1,
                                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                           mid_block_type=None)  # fmt: skip
    with pytest.raises(ValueError, match="8 input channels"):
        stablepipe.StableDiffusionLatentUpscalePipeline(**{**ours.components, "unet": unet})


def test_sigmas_by_timestep_pairs_by_position_and_refuses_ambiguous_timesteps():
    from stablepipe.pipelines.latent_upscale import sigmas_by_timestep

    scheduler = stablepipe.EulerDiscreteScheduler(prediction_type="sample")
    scheduler.set_timesteps(4)
    table = sigmas_by_timestep(scheduler)
    assert list(table) == scheduler.timesteps.tolist()
    assert all(torch.equal(table[t], s) for t, s in zip(scheduler.timesteps.tolist(), scheduler.sigmas, strict=False))

    class Repeating:  # a second-order schedule repeats timesteps; a different sigma at the same t is ambiguous
        timesteps = torch.tensor([999.0, 500.0, 500.0])
        sigmas = torch.tensor([14.6, 2.0, 1.5, 0.0])

    with pytest.raises(ValueError, match="timestep 500.0 two different sigmas"):
        sigmas_by_timestep(Repeating())
    Repeating.sigmas = torch.tensor([14.6, 2.0, 2.0, 0.0])  # repeated with the same sigma: fine
    assert len(sigmas_by_timestep(Repeating())) == 2
