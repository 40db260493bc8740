"""The x4 upscaler: same folder, same seed, same image as diffusers; tiling (UNet and VAE); errors."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff
from fixtures_upscale import X4_VAE, load_both, low_res_images, text_parts, write_x4_folder

import stablepipe
from stablepipe.pipelines.upscale import TiledUNet, TileSpec, vae_tiling

TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def x4_folder(tmp_path_factory):
    return write_x4_folder(tmp_path_factory.mktemp("x4"))


@pytest.fixture(scope="module")
def x4_pipes(x4_folder):
    return load_both("StableDiffusionUpscalePipeline", x4_folder)


def run(pipe, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def as_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]


CASES = {
    "guided-noise-20": dict(prompt="a red circle", image=low_res_images(1, 16)),
    "batch-negative-n2-noise-60": dict(
        prompt=["a red circle", "a ship"], image=low_res_images(2, 16, seed=1), negative_prompt=["blue", "fog"],
        num_images_per_prompt=2, noise_level=60,
    ),
    "unguided-noise-0": dict(prompt="a cat", image=low_res_images(1, 16), guidance_scale=1.0, noise_level=0),
    "noise-99-numpy-nonsquare": dict(
        prompt="a cat", image=low_res_images(1, 24)[:, :, :, :16].permute(0, 2, 3, 1).numpy(), noise_level=99,
        negative_prompt="blurry",
    ),
    "pil-floored-bicubic-n3": dict(prompt="an owl", image=as_pil(low_res_images(1, 18))[0], num_images_per_prompt=3),
}


@pytest.mark.parametrize("case", CASES)
def test_x4_matches_diffusers(x4_pipes, case):
    ours, theirs = x4_pipes
    a, b = run(ours, **CASES[case]), run(theirs, **CASES[case])
    assert a.shape == b.shape and a.shape[1] == 4 * (16 if "pil" in case else a.shape[1] // 4)
    assert max_diff(a, b) < TOLERANCE, f"{case}: max abs diff {max_diff(a, b)}"
    assert a.std() > 0.01


def test_x4_matches_diffusers_with_euler_and_latent_output(x4_pipes):
    ours, theirs = x4_pipes
    ours.scheduler = stablepipe.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    import diffusers

    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    try:
        kwargs = dict(prompt="a cat", image=low_res_images(1, 16), output_type="latent", noise_level=30)
        a, b = run(ours, **kwargs), run(theirs, **kwargs)
    finally:
        ours.scheduler = stablepipe.DDIMScheduler.from_config(ours.scheduler.config)
        theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    assert a.shape == (1, 4, 16, 16) and max_diff(a, b) < 1e-4


def test_noise_level_changes_the_result(x4_pipes):
    ours, _ = x4_pipes
    image = low_res_images(1, 16)
    low = run(ours, prompt="a cat", image=image, noise_level=0)
    high = run(ours, prompt="a cat", image=image, noise_level=90)
    assert max_diff(low, high) > 0.01


def test_components_config_and_saving(x4_pipes, tmp_path):
    import diffusers

    ours, _ = x4_pipes
    assert ours.max_noise_level == 350 and ours.vae_scale_factor == 4
    again = stablepipe.StableDiffusionUpscalePipeline(**ours.components, max_noise_level=120)
    assert again.unet is ours.unet and again.low_res_scheduler is ours.low_res_scheduler
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["max_noise_level"] == 350
    reloaded = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", image=low_res_images(1, 16), num_inference_steps=1)
    assert max_diff(run(ours, **kwargs), run(reloaded, **kwargs)) < TOLERANCE


def test_legacy_callback_and_return_tuple(x4_pipes):
    ours, _ = x4_pipes
    seen = []
    images, flags = ours(
        "a cat", low_res_images(1, 16), num_inference_steps=3, output_type="np", return_dict=False,
        callback=lambda step, t, latents: seen.append((step, latents.shape)), callback_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert [s for s, _ in seen] == [0, 2] and seen[0][1] == (1, 4, 16, 16)
    assert images.shape == (1, 64, 64, 3) and flags is None


BAD_INPUTS = {
    "noise above max": (dict(noise_level=351), "above this pipeline's max_noise_level=350"),
    "negative noise": (dict(noise_level=-1), "noise_level must be an integer"),
    "noise without class embedding": (dict(noise_level=100), "no class embedding"),
    "too small": (dict(image=torch.rand(1, 3, 2, 2)), "too small"),
    "latents given": (dict(image=torch.rand(1, 4, 16, 16)), "not latents"),
    "five channels": (dict(image=torch.rand(1, 5, 16, 16)), "1, 3 or 4 color channels"),
    "image batch": (dict(image=torch.rand(3, 3, 16, 16), prompt=["a", "b"]), "3 images for 2 prompts"),
    "no image": (dict(image=None), "no image given"),
    "tile not multiple": (dict(tile_size=10), "tile_size must be a positive multiple of 4"),
    "overlap too big": (dict(tile_size=16, tile_overlap=16), "tile_overlap must be"),
    "overlap alone": (dict(tile_overlap=4), "needs tile_size"),
    "callback steps": (dict(callback_steps=0), "callback_steps"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_fail_before_any_model_runs(x4_pipes, monkeypatch, case):
    ours, _ = x4_pipes
    kwargs, match = BAD_INPUTS[case]

    def boom(*args, **kw):
        raise AssertionError("the text encoder ran before the inputs were checked")

    monkeypatch.setattr(ours.text_encoder, "forward", boom)
    with pytest.raises(ValueError, match=match):
        ours(**{"prompt": "a cat", "image": low_res_images(1, 16), **kwargs})


def test_a_text_to_image_unet_is_refused(x4_pipes):
    ours, _ = x4_pipes
    unet = stablepipe.UNet2DConditionModel(block_out_channels=(32, 64), cross_attention_dim=32, layers_per_block=1,
                                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                           mid_block_type=None)  # fmt: skip
    with pytest.raises(ValueError, match="7 .*input channels.*StableDiffusionPipeline"):
        stablepipe.StableDiffusionUpscalePipeline(**{**ours.components, "unet": unet})


# ---- tiling ------------------------------------------------------------------------------------------------


def test_one_tile_covering_the_image_is_exactly_the_untiled_result(x4_pipes):
    ours, _ = x4_pipes
    kwargs = dict(prompt="a cat", image=low_res_images(1, 16))
    assert max_diff(run(ours, **kwargs), run(ours, tile_size=16, **kwargs)) == 0.0


def test_tile_spans_cover_the_axis_and_blend_to_one():
    spans = TileSpec(16, 5).spans(37)
    assert [(s.start, s.stop) for s, _ in spans] == [(0, 16), (11, 27), (21, 37)]
    total = torch.zeros(37)
    for s, weights in spans:
        total[s] += weights
    assert total.min() >= 1.0 and spans[0][1][0] == 1.0 and spans[1][1][0] < 0.2  # ramps only on shared sides


def test_tiled_unet_reproduces_a_pointwise_model_exactly():
    """Blending must be a partition of unity: a model without spatial context gives the untiled answer."""
    conv = torch.nn.Conv2d(7, 4, 1)

    def model(sample, t, encoder_hidden_states, return_dict=False, class_labels=None):
        return (conv(sample) * (1 + class_labels.float()[:, None, None, None]),)

    sample, labels = torch.randn(2, 7, 37, 23), torch.tensor([1, 2])
    with torch.no_grad():
        whole = model(sample, 0, None, class_labels=labels)[0]
        tiled = TiledUNet(model, TileSpec(16, 5))(sample, 0, encoder_hidden_states=None, class_labels=labels)[0]
    assert tiled.shape == (2, 4, 37, 23) and max_diff(whole, tiled) < 1e-5


@pytest.fixture(scope="module")
def local_x4():
    """A tiny x4 pipeline whose UNet and VAE have no self-attention, so that tiling only cuts local context
    (what the real upscaler's tiling relies on)."""
    tokenizer, text_encoder = text_parts(2)
    torch.manual_seed(0)
    unet = stablepipe.UNet2DConditionModel(
        block_out_channels=(32, 32), layers_per_block=1, in_channels=7, out_channels=4, mid_block_type=None,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, only_cross_attention=True, num_class_embeds=100,
    )
    vae = stablepipe.AutoencoderKL(**{**X4_VAE, "mid_block_add_attention": False})
    pipe = stablepipe.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=stablepipe.DDPMScheduler(),
        scheduler=stablepipe.DDIMScheduler(prediction_type="v_prediction"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiled_upscale_is_close_to_untiled(local_x4):
    """32 px input, 2 steps, tiles of 24 overlapping by 12 (UNet and VAE decode tiled): the image differs from the
    untiled one by a mean of 0.045 and at most 0.47 (images in [0, 1]) on this random model, against 0.155 between
    two seeds (GroupNorm statistics per tile are most of the difference). Asserted: mean < 0.06, max < 0.6, mean
    under 1/2.5 of the seed gap, and bigger tiles closer than smaller ones."""
    kwargs = dict(prompt="a cat", image=low_res_images(1, 32))
    whole, other_seed = run(local_x4, **kwargs), run(local_x4, seed=1, **kwargs)
    fine, coarse = run(local_x4, tile_size=24, tile_overlap=12, **kwargs), run(local_x4, tile_size=16, **kwargs)
    error, seed_gap = np.abs(fine - whole), np.abs(other_seed - whole).mean()
    assert error.mean() < 0.06 and error.max() < 0.6 and error.mean() < seed_gap / 2.5
    assert error.mean() < np.abs(coarse - whole).mean()  # bigger tiles: closer to untiled


# ---- the VAE's tiled decode / encode -------------------------------------------------------------------------


def test_vae_tiling_matches_diffusers_tiling(x4_folder):
    import diffusers

    ours = stablepipe.AutoencoderKL.from_pretrained(x4_folder / "vae")
    theirs = diffusers.AutoencoderKL.from_pretrained(x4_folder / "vae")
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(1, 4, 20, 14, generator=g), torch.rand(1, 3, 72, 40, generator=g) * 2 - 1
    with torch.no_grad():
        untiled = ours.decode(z).sample
        for vae in (ours, theirs):
            vae.enable_tiling()
        assert max_diff(ours.decode(z).sample, theirs.decode(z).sample) < 1e-5
        assert max_diff(ours.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.mean) < 1e-5
        assert max_diff(ours.decode(z).sample, untiled) > 1e-3  # 20 > 8 latent pixels: it did tile
    ours.disable_tiling()
    assert not ours.use_tiling


def test_vae_tiling_context_restores_the_vae_settings(x4_pipes):
    vae = x4_pipes[0].vae
    before = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    with vae_tiling(vae, TileSpec(8, 2)):
        assert vae.use_tiling and vae.tile_latent_min_size == 8 and vae.tile_sample_min_size == 32
        assert vae.tile_overlap_factor == 0.25
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == before
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.enable_tiling(tile_sample_min_size=30)


# ---- command line ------------------------------------------------------------------------------------------


def test_cli_upscale_x4_and_x2_with_the_builtin_models(tmp_path, monkeypatch, capsys):
    from stablepipe.cli import main

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "in.png"
    as_pil(low_res_images(1, 64))[0].save(source)
    args = ["--prompt", "a cat", "--steps", "2", "--seed", "1", "--json"]
    assert main(["upscale", "--x4", str(source), *args, "--tile", "48", "--noise-level", "30",
                 "--out", str(tmp_path / "x4.png")]) == 0  # fmt: skip
    written = json.loads(capsys.readouterr().out)["files"]
    image = PIL.Image.open(written[0]["path"])
    settings = json.loads(image.text["stablepipe"])
    assert image.size == (256, 256) and settings["upscaler"] == "x4" and settings["tile"] == 48
    assert settings["noise_level"] == 30 and settings["seed"] == 1
    assert main(["upscale", "--x2", str(source), *args, "--num-images", "2", "--out", str(tmp_path)]) == 0
    written = json.loads(capsys.readouterr().out)["files"]
    assert [PIL.Image.open(f["path"]).size for f in written] == [(128, 128)] * 2 and written[1]["seed"] == 2
    assert main(["upscale", "--x2", str(source), "--noise-level", "3"]) == 2
    assert "--noise-level is for --x4 only" in capsys.readouterr().err
