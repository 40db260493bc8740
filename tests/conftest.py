"""Fixtures: tiny random Stable Diffusion checkpoints written by diffusers, in the real folder layout.

The folders are made once per session. Every test loads them through the real loading code, stablepipe's
and (for parity) diffusers'.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models: threads cost more than they give
torch.set_num_threads(int(os.environ.get("STABLEPIPE_TEST_THREADS", "1")))

SD1_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, norm_num_groups=32, attention_head_dim=8,
)
SD2_UNET = dict(
    SD1_UNET, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
)
VAE = dict(
    block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
)
SD1_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1,
)


def text_encoder_config(tokenizer, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )


def safety_components(seed: int = 0):
    """A tiny CLIP safety checker and its image processor, as diffusers builds them."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=4),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def write_sd_folder(folder: Path, *, kind: str = "sd1", safety: bool = False, seed: int = 0) -> Path:
    """Save a tiny diffusers StableDiffusionPipeline to `folder` and return it."""
    import diffusers
    from transformers import CLIPTextModel

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_tiny_tokenizer(scratch)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**(SD2_UNET if kind == "sd2" else SD1_UNET))
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer)).eval()
    if kind == "sd2":
        scheduler = diffusers.DDIMScheduler(**SD1_SCHEDULER, prediction_type="v_prediction")
    else:
        scheduler = diffusers.PNDMScheduler(**SD1_SCHEDULER, skip_prk_steps=True)
    checker, processor = safety_components(seed + 3) if safety else (None, None)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=checker, feature_extractor=processor, requires_safety_checker=safety,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory) -> Path:
    return write_sd_folder(tmp_path_factory.mktemp("sd1"), kind="sd1")


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory) -> Path:
    return write_sd_folder(tmp_path_factory.mktemp("sd2"), kind="sd2")


@pytest.fixture(scope="session")
def sd1_safety_folder(tmp_path_factory) -> Path:
    return write_sd_folder(tmp_path_factory.mktemp("sd1safe"), kind="sd1", safety=True)


def max_diff(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
