"""Tiny checkpoints for the single-file tests: an SD 2.x-style folder whose text encoder is OpenCLIP-like
(GELU, so it is written in OpenCLIP's names), an SDXL folder whose two encoders differ in width (as the real
ones do: diffusers tells them apart by width), and original-layout files made with diffusers' own conversion.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import SD1_SCHEDULER, SD2_UNET, VAE, text_encoder_config
from fixtures_sdxl import BASE_UNET, SDXL_SCHEDULER


def write_sd2_openclip_folder(folder: Path, *, seed: int = 0) -> Path:
    import diffusers
    from transformers import CLIPTextModel

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_tiny_tokenizer(scratch)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**SD2_UNET)
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**VAE)
    torch.manual_seed(seed + 2)
    config = text_encoder_config(tokenizer)
    config.hidden_act = "gelu"
    text_encoder = CLIPTextModel(config).eval()
    scheduler = diffusers.DDIMScheduler.from_config(SD1_SCHEDULER, prediction_type="v_prediction")
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def write_sdxl_wide_folder(folder: Path, *, seed: int = 0) -> Path:
    """SDXL base with text_encoder 32 wide and text_encoder_2 48 wide (projection 32)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_tiny_tokenizer(Path(scratch) / "1")
        tokenizer_2 = write_tiny_tokenizer(Path(scratch) / "2")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**dict(BASE_UNET, cross_attention_dim=32 + 48))
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**VAE, force_upcast=True)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer)).eval()
    config_2 = text_encoder_config(tokenizer_2, hidden_size=48)
    config_2.hidden_act, config_2.projection_dim = "gelu", 32
    text_encoder_2 = CLIPTextModelWithProjection(config_2).eval()
    diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd2_openclip_folder(tmp_path_factory) -> Path:
    return write_sd2_openclip_folder(tmp_path_factory.mktemp("sd2openclip"), seed=5)


@pytest.fixture(scope="session")
def sdxl_wide_folder(tmp_path_factory) -> Path:
    return write_sdxl_wide_folder(tmp_path_factory.mktemp("sdxlwide"), seed=7)


# ---- original-layout files through diffusers' conversion, inverted ------------------------------------------


def diffusers_inverse(names_and_shapes: dict[str, tuple], convert) -> dict[str, tuple[str, int]]:
    """For each diffusers key, the original key (and first row) it comes from, per diffusers' `convert`.

    Every original tensor is filled with `tag * 1e6 + row`, converted by diffusers, and each result read
    back: so the mapping is diffusers', whatever names our exporter proposes for the original layout.
    """
    tagged = {}
    for tag, (key, shape) in enumerate(names_and_shapes.items(), start=1):
        rows = torch.arange(shape[0], dtype=torch.float64).reshape(-1, *([1] * (len(shape) - 1)))
        tagged[key] = (tag * 1e6 + rows).expand(shape).clone() if shape else torch.tensor(tag * 1e6)
    keys = list(names_and_shapes)
    inverse = {}
    for diffusers_key, tensor in convert(tagged).items():
        value = float(tensor.flatten()[0])
        inverse[diffusers_key] = (keys[int(value // 1e6) - 1], int(value % 1e6))
    return inverse


def place(inverse: dict[str, tuple[str, int]], shapes: dict[str, tuple], ours: dict[str, torch.Tensor]):
    """The original-layout state dict holding `ours` (diffusers' names) where diffusers reads it from."""
    out = {key: torch.zeros(shape) for key, shape in shapes.items()}
    for diffusers_key, (key, row) in inverse.items():
        tensor = ours[diffusers_key]
        target = out[key]
        out[key][row : row + tensor.shape[0]] = tensor.reshape(-1, *target.shape[1:]) if target.ndim else tensor
    return out
