"""Tiny random SDXL checkpoints written by diffusers in the real folder layout: a base model (two CLIP text
encoders, a text_time UNet), a refiner (text_encoder_2 only, aesthetic-score UNet) and a 9-channel inpainting
UNet. Shapes follow diffusers' own SDXL tests, scaled down."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import VAE, text_encoder_config

BASE_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), norm_num_groups=1,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + text_encoder_2's projection_dim
    cross_attention_dim=64,  # 32 + 32: both text encoders' hidden states
)
REFINER_UNET = dict(
    BASE_UNET, cross_attention_dim=32,  # text_encoder_2 only
    projection_class_embeddings_input_dim=5 * 8 + 32,  # original size, crop, aesthetic score
)
INPAINT_UNET = dict(BASE_UNET, in_channels=9)
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
    timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
)


def tiny_text_encoders(seed: int):
    """(tokenizer, CLIPTextModel, tokenizer_2, CLIPTextModelWithProjection), hidden size 32 each."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_tiny_tokenizer(Path(scratch) / "1")
        tokenizer_2 = write_tiny_tokenizer(Path(scratch) / "2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(tokenizer_2)).eval()
    return tokenizer, text_encoder, tokenizer_2, text_encoder_2


def write_sdxl_folder(folder: Path, *, kind: str = "base", seed: int = 0) -> Path:
    """Save a tiny diffusers SDXL pipeline: kind "base", "refiner" (requires_aesthetics_score, text_encoder_2
    only) or "inpaint" (a 9-channel UNet)."""
    import diffusers

    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = tiny_text_encoders(seed + 2)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**{"base": BASE_UNET, "refiner": REFINER_UNET, "inpaint": INPAINT_UNET}[kind])
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**VAE, force_upcast=True)
    scheduler = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    common = dict(vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    if kind == "refiner":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            **common, text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False,
        )
    elif kind == "inpaint":
        pipe = diffusers.StableDiffusionXLInpaintPipeline(
            **common, text_encoder=text_encoder, tokenizer=tokenizer, add_watermarker=False
        )
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            **common, text_encoder=text_encoder, tokenizer=tokenizer, add_watermarker=False
        )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl"), kind="base")


@pytest.fixture(scope="session")
def sdxl_refiner_folder(tmp_path_factory) -> Path:
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl_refiner"), kind="refiner", seed=10)


@pytest.fixture(scope="session")
def sdxl_inpaint_folder(tmp_path_factory) -> Path:
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl_inpaint"), kind="inpaint", seed=20)
