"""Fixtures for the image pipelines: tiny inpainting (9-channel) and depth (5-channel + DPT) checkpoints
written by diffusers in the real folder layout, test images, and the run-both-libraries helpers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import SD1_SCHEDULER, SD1_UNET, SD2_UNET, VAE, max_diff, text_encoder_config

import stablepipe

TOLERANCE = 2e-3
DDIM_V = {**{k: v for k, v in SD1_SCHEDULER.items() if k != "skip_prk_steps"}, "prediction_type": "v_prediction"}
PNDM = {**SD1_SCHEDULER, "skip_prk_steps": True}


def tiny_dpt(seed: int = 0):
    """A tiny random DPT depth estimator (ViT, not hybrid) whose depth varies over the image, and its processor."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=8, is_hybrid=False, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16, head_in_index=-1,
    )
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config).eval()
    with torch.no_grad():  # the default init predicts a constant depth (all ReLU-zero); spread the weights
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.1)
        model.head.head[-2].bias.fill_(1.0)
    return model, DPTImageProcessor(size={"height": 32, "width": 32})


def write_image_folder(folder: Path, *, kind: str, seed: int = 0) -> Path:
    """Save a tiny diffusers inpainting ("inpaint": SD 1 layout, "inpaint-sd2": SD 2 layout, v-prediction) or
    depth ("depth": SD 2 layout, v-prediction, with a tiny DPT) pipeline to `folder`."""
    import diffusers
    from transformers import CLIPTextModel

    from stablepipe.builtin import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_tiny_tokenizer(scratch)
    unet_config = dict(SD1_UNET if kind == "inpaint" else SD2_UNET)
    unet_config["in_channels"] = {"inpaint": 9, "inpaint-sd2": 9, "depth": 5}[kind]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer)).eval()
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    if kind == "depth":
        depth_estimator, processor = tiny_dpt(seed + 3)
        scheduler = diffusers.DDIMScheduler(**DDIM_V)
        pipe = diffusers.StableDiffusionDepth2ImgPipeline(
            **common, scheduler=scheduler, depth_estimator=depth_estimator, feature_extractor=processor
        )
    else:
        scheduler = diffusers.PNDMScheduler(**PNDM)
        if kind == "inpaint-sd2":
            scheduler = diffusers.DDIMScheduler(**DDIM_V)
        pipe = diffusers.StableDiffusionInpaintPipeline(
            **common, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def inpaint_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("inpaint"), kind="inpaint")


@pytest.fixture(scope="session")
def inpaint_sd2_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("inpaint_sd2"), kind="inpaint-sd2")


@pytest.fixture(scope="session")
def depth_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("depth"), kind="depth")


# ---- inputs ------------------------------------------------------------------------------------------------


def sample_image(width: int = 32, height: int = 32, seed: int = 0) -> PIL.Image.Image:
    """A smooth RGB picture with some noise: gradients the VAE can see, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    return PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def sample_mask(width: int = 32, height: int = 32, box: tuple[int, int, int, int] = (8, 8, 24, 20)) -> PIL.Image.Image:
    """Black (keep) with a white rectangle (repaint) at `box` = (x1, y1, x2, y2)."""
    mask = PIL.Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


# ---- running both libraries ----------------------------------------------------------------------------------


def load_both(cls_name: str, folder, scheduler: str | None = None, **kwargs):
    """Our pipeline and diffusers' from the same folder, optionally with another scheduler class."""
    import diffusers

    ours = getattr(stablepipe, cls_name).from_pretrained(folder, **kwargs)
    theirs = getattr(diffusers, cls_name).from_pretrained(folder, **kwargs)
    if scheduler:
        ours.scheduler = getattr(stablepipe, scheduler).from_config(ours.scheduler.config)
        theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def seeded(generator_seed):
    if isinstance(generator_seed, list):
        return [torch.Generator().manual_seed(s) for s in generator_seed]
    return torch.Generator().manual_seed(generator_seed)


def run_both(ours, theirs, *, seed=0, **kwargs):
    """The same call on both pipelines with fresh generators; returns (max abs diff, our images)."""
    kwargs = {"num_inference_steps": 3, "output_type": "np", **kwargs}
    a = ours(generator=seeded(seed), **kwargs).images
    b = theirs(generator=seeded(seed), **kwargs).images
    a, b = (np.stack([np.asarray(i) / 255.0 for i in x]) if isinstance(x, list) else x for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return max_diff(a, b), a
