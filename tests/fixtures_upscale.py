"""Tiny random upscalers written by diffusers in the real folder layouts (x4: stable-diffusion-x4-upscaler,
x2: sd-x2-latent-upscaler), with the configs of diffusers' own fast tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from conftest import text_encoder_config

X4_UNET = dict(
    block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=32, in_channels=7, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False), num_class_embeds=100,
)
X4_VAE = dict(
    block_out_channels=(32, 32, 64), in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.08333,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
X2_UNET = dict(
    act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
    time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32, in_channels=8,
    down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    mid_block_type=None, only_cross_attention=False, out_channels=5, resnet_time_scale_shift="scale_shift",
    time_embedding_type="fourier", timestep_post_act="gelu",
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
)
X2_VAE = dict(
    block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def text_parts(seed: int):
    from transformers import CLIPTextModel

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_tiny_tokenizer(scratch)
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModel(text_encoder_config(tokenizer)).eval()


def write_x4_folder(folder: Path, *, seed: int = 0, unet: dict | None = None, vae: dict | None = None) -> Path:
    """A tiny diffusers StableDiffusionUpscalePipeline (DDIM v-prediction, DDPM low-res noise), saved."""
    import diffusers

    tokenizer, text_encoder = text_parts(seed + 2)
    torch.manual_seed(seed)
    unet_model = diffusers.UNet2DConditionModel(**(unet or X4_UNET))
    torch.manual_seed(seed + 1)
    vae_model = diffusers.AutoencoderKL(**(vae or X4_VAE))
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet_model,
        low_res_scheduler=diffusers.DDPMScheduler(), scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=350,
    )
    pipe.save_pretrained(folder)
    return folder


def write_x2_folder(folder: Path, *, seed: int = 0) -> Path:
    """A tiny diffusers StableDiffusionLatentUpscalePipeline (K-block UNet, Euler predicting the sample), saved."""
    import diffusers

    tokenizer, text_encoder = text_parts(seed + 2)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**X2_UNET)
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**X2_VAE)
    pipe = diffusers.StableDiffusionLatentUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(prediction_type="sample"),
    )
    pipe.save_pretrained(folder)
    return folder


def load_both(cls_name: str, folder: Path):
    import diffusers

    import stablepipe

    ours = getattr(stablepipe, cls_name).from_pretrained(folder)
    theirs = getattr(diffusers, cls_name).from_pretrained(folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def low_res_images(batch: int, size: int, *, seed: int = 5) -> torch.Tensor:
    """(batch, 3, size, size) in [0, 1]: a smooth gradient plus noise, so upscaling has structure to follow."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    smooth = (ramp[None, :] * ramp[:, None])[None, None].expand(batch, 3, size, size)
    return (0.7 * smooth + 0.3 * torch.rand(batch, 3, size, size, generator=g)).contiguous()
