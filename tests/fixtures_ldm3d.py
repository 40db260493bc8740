"""Tiny random LDM3D checkpoints: text-to-RGB-D written by diffusers (Intel/ldm3d-4c layout, and the
original 6-channel one), and the RGB-D upscaler (Intel/ldm3d-sr layout) written by stablepipe, since
diffusers ships that one only as a community pipeline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import SD1_SCHEDULER, SD1_UNET, VAE, safety_components, text_encoder_config

RGBD_VAE = dict(VAE, in_channels=4, out_channels=4)
SR_UNET = dict(SD1_UNET, in_channels=8, num_class_embeds=1000, layers_per_block=1)
LOW_RES_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=True)


def tiny_text_parts(seed: int):
    from transformers import CLIPTextModel

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_tiny_tokenizer(scratch)
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModel(text_encoder_config(tokenizer)).eval()


def write_ldm3d_folder(folder: Path, *, channels: int = 4, safety: bool = False, seed: int = 0) -> Path:
    """Save a tiny diffusers StableDiffusionLDM3DPipeline (VAE decoding `channels` = 4 or 6) to `folder`."""
    import diffusers

    tokenizer, text_encoder = tiny_text_parts(seed + 2)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**SD1_UNET)
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**dict(VAE, in_channels=channels, out_channels=channels))
    checker, processor = safety_components(seed + 3) if safety else (None, None)
    pipe = diffusers.StableDiffusionLDM3DPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.PNDMScheduler(**SD1_SCHEDULER, skip_prk_steps=True),
        safety_checker=checker, feature_extractor=processor, image_encoder=None, requires_safety_checker=safety,
    )
    pipe.save_pretrained(folder)
    return folder


def write_ldm3d_sr_folder(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionUpscaleLDM3DPipeline: 4-channel VAE, UNet taking 4 latent + 4 image-latent
    channels with the noise level as a class label, DDPM low-res scheduler, as Intel/ldm3d-sr."""
    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.models.vae import AutoencoderKL
    from stablepipe.pipelines.ldm3d import StableDiffusionUpscaleLDM3DPipeline
    from stablepipe.schedulers import DDIMScheduler, DDPMScheduler

    tokenizer, text_encoder = tiny_text_parts(seed + 2)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SR_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**RGBD_VAE)
    pipe = StableDiffusionUpscaleLDM3DPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler(**SD1_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ldm3d_folder(tmp_path_factory) -> Path:
    return write_ldm3d_folder(tmp_path_factory.mktemp("ldm3d"))


@pytest.fixture(scope="session")
def ldm3d_safety_folder(tmp_path_factory) -> Path:
    return write_ldm3d_folder(tmp_path_factory.mktemp("ldm3dsafe"), safety=True)


@pytest.fixture(scope="session")
def ldm3d_sr_folder(tmp_path_factory) -> Path:
    return write_ldm3d_sr_folder(tmp_path_factory.mktemp("ldm3dsr"))
