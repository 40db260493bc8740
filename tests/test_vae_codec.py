"""vae_codec.py: the one VAE encode / decode, read from the VAE's config (scaling and shift factors, per-channel
latents_mean / latents_std, force_upcast), against the formulas and against diffusers' SDXL pipelines."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff

import stablepipe
from stablepipe.pipelines import vae_codec

pytest_plugins = ["fixtures_sdxl"]  # sdxl_folder
MEAN, STD = [0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 0.8, 1.2]


@pytest.fixture
def vae(sdxl_folder):
    return stablepipe.AutoencoderKL.from_pretrained(sdxl_folder / "vae")


def test_latent_scaling_from_the_config(vae):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s = vae.config.scaling_factor
    assert torch.equal(vae_codec.to_diffusion_latents(vae, z), z * s)
    vae.register_to_config(shift_factor=0.25)
    assert torch.equal(vae_codec.to_diffusion_latents(vae, z), (z - 0.25) * s)  # SD3's shift
    assert torch.allclose(vae_codec.from_diffusion_latents(vae, vae_codec.to_diffusion_latents(vae, z)), z, atol=1e-6)
    vae.register_to_config(latents_mean=MEAN, latents_std=STD)  # per channel, where the config has them
    mean, std = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    assert torch.equal(vae_codec.to_diffusion_latents(vae, z), (z - mean) * s / std)
    assert torch.allclose(vae_codec.from_diffusion_latents(vae, vae_codec.to_diffusion_latents(vae, z)), z, atol=1e-6)


@torch.no_grad()
def test_upcast_only_where_asked_and_forced(vae):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).half()
    vae.to(torch.float16)
    seen = []
    vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    vae_codec.decode_latents(vae, latents)  # SD 1/2 pipelines: the VAE's own dtype
    vae_codec.decode_latents(vae, latents, upcast=True)  # SDXL: float32, as its config says
    vae.register_to_config(force_upcast=False)
    vae_codec.decode_latents(vae, latents, upcast=True)
    assert seen == [torch.float16, torch.float32, torch.float16] and vae.dtype == torch.float16


@pytest.mark.parametrize("name", ["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"])
def test_sdxl_with_latent_statistics_matches_diffusers(sdxl_folder, name):
    """A VAE whose config has latents_mean / latents_std (as Playground v2.5's): encode and decode both use them."""
    import diffusers

    ours = getattr(stablepipe, name).from_pretrained(sdxl_folder)
    theirs = getattr(diffusers, name).from_pretrained(sdxl_folder, add_watermarker=False)
    picture = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    call = dict(prompt="a cat", num_inference_steps=3, output_type="np")
    if "Img2Img" in name:
        call.update(image=picture, strength=0.6)
    results = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
        pipe.vae.register_to_config(latents_mean=MEAN, latents_std=STD)
        results.append((plain, pipe(generator=torch.Generator().manual_seed(0), **call).images))
    (ours_plain, ours_stats), (_, theirs_stats) = results
    assert max_diff(ours_stats, theirs_stats) < 2e-3
    assert max_diff(ours_plain, ours_stats) > 1e-3  # the statistics are read
