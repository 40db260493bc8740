"""`stablepipe upscale --x4 | --x2 IMAGE`: text-guided super-resolution (x4 upscaler, x2 latent upscaler)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stablepipe.cli.common import (
    UsageError,
    add_generation_flags,
    add_model_flags,
    add_output_flags,
    cached_folder,
    generation_kwargs,
    load_pipeline,
    open_image_file,
    seeds_for,
    write_images,
)
from stablepipe.cli.ldm3d import add_upscale_flags as add_ldm3d_flags
from stablepipe.cli.ldm3d import run_upscale as run_ldm3d_upscale

BUILTIN_NAMES = {"x4": "builtin-tiny-x4-upscaler-v1", "x2": "builtin-tiny-x2-latent-upscaler-v1"}


def register(commands) -> None:
    parser = commands.add_parser(
        "upscale", help="upscale an image 4x or 2x",
        description="Upscale IMAGE with the x4 upscaler (--x4, e.g. --model stabilityai/stable-diffusion-x4-upscaler) "
        "or the x2 latent upscaler (--x2, e.g. --model stabilityai/sd-x2-latent-upscaler), guided by --prompt.",
    )
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--x4", dest="kind", action="store_const", const="x4", help="4x (StableDiffusionUpscalePipeline)")
    kind.add_argument("--x2", dest="kind", action="store_const", const="x2",
                      help="2x in latent space (StableDiffusionLatentUpscalePipeline)")
    parser.add_argument("image", help="the picture to upscale (PNG, JPEG, ...)")
    add_ldm3d_flags(parser, kind)  # --ldm3d IMAGE DEPTH [--pano]: LDM3D's RGB + depth upscaler, see cli/ldm3d.py
    parser.add_argument("--prompt", default="", help="what the picture shows (guides the detail; default: none)")
    group = parser.add_argument_group("upscaling")
    group.add_argument("--tile", type=int, default=None, metavar="SIZE",
                       help="upscale in tiles of SIZE input pixels (blended seams) to cap memory on large images")
    group.add_argument("--tile-overlap", type=int, default=None, metavar="PX", help="tile overlap (default SIZE/4)")
    group.add_argument("--noise-level", type=int, default=None,
                       help="--x4 only: noise added to the input, 0..350 (default 20); more noise, more invention")
    add_model_flags(parser)
    add_generation_flags(parser)
    add_output_flags(parser)
    parser.set_defaults(run=run)


# ---- the built-in tiny upscalers (random weights) --------------------------------------------------------------


def tiny_text_parts():
    """The tiny random model's tokenizer and text encoder (hidden size 64)."""
    from stablepipe.builtin import random_model_path
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    text = StableDiffusionPipeline.from_pretrained(random_model_path(), requires_safety_checker=False)
    return text.tokenizer, text.text_encoder


def build_builtin_x4(folder: Path, *, seed: int = 0) -> Path:
    """A tiny x4 upscaler in the stabilityai/stable-diffusion-x4-upscaler layout: 7-channel UNet with 1000 noise-
    level classes, a 3-level VAE (scaling factor 0.08333), DDPM low-res noise and a v-prediction DDIM sampler."""
    import torch

    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.models.vae import AutoencoderKL
    from stablepipe.pipelines.upscale import StableDiffusionUpscalePipeline
    from stablepipe.schedulers import DDIMScheduler, DDPMScheduler

    tokenizer, text_encoder = tiny_text_parts()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16, num_class_embeds=1000,
    )
    vae = AutoencoderKL(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16, scaling_factor=0.08333)
    betas = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear"}
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, low_res_scheduler=DDPMScheduler(**betas),
        scheduler=DDIMScheduler(**betas, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
    )
    return pipe.save_pretrained(folder)


def build_builtin_x2(folder: Path, *, seed: int = 0) -> Path:
    """A tiny x2 latent upscaler in the stabilityai/sd-x2-latent-upscaler layout: K-block UNet with Fourier time
    features and (noise level, pooled text) conditioning, a 4-level VAE, Euler predicting the clean sample."""
    import torch

    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.models.vae import AutoencoderKL
    from stablepipe.pipelines.latent_upscale import StableDiffusionLatentUpscalePipeline
    from stablepipe.schedulers import EulerDiscreteScheduler

    tokenizer, text_encoder = tiny_text_parts()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=8, out_channels=5, act_fn="gelu", norm_num_groups=None, conv_in_kernel=1,
        conv_out_kernel=1, block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=64, time_cond_proj_dim=128 + 64, time_embedding_type="fourier", timestep_post_act="gelu",
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        mid_block_type=None, up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",),
    )
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16)
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(prediction_type="sample"),
    )
    return pipe.save_pretrained(folder)


def builtin_upscaler_path(kind: str) -> Path:
    """The built-in tiny upscaler's folder ("x4" or "x2"), built on first use in the stablepipe cache."""
    return cached_folder(BUILTIN_NAMES[kind], build_builtin_x4 if kind == "x4" else build_builtin_x2)


# ---- running -----------------------------------------------------------------------------------------------


def upscale_kwargs(args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    """The pipeline arguments: the shared generation ones (less size and clip skip), tiling, noise level."""
    for flag, value in (("--width", args.width), ("--height", args.height), ("--clip-skip", args.clip_skip)):
        if value is not None:
            raise UsageError(f"upscale takes no {flag}: the output size is the input's times 4 (--x4) or 2 (--x2)")
    if args.noise_level is not None and args.kind != "x4":
        raise UsageError("--noise-level is for --x4 only: the x2 latent upscaler adds no noise to its input")
    if args.tile_overlap is not None and args.tile is None:
        raise UsageError("--tile-overlap needs --tile SIZE")
    kwargs = generation_kwargs(args, seeds)
    extra = {"tile_size": args.tile, "tile_overlap": args.tile_overlap, "noise_level": args.noise_level}
    return {**kwargs, **{k: v for k, v in extra.items() if v is not None}}


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.latent_upscale import StableDiffusionLatentUpscalePipeline
    from stablepipe.pipelines.upscale import StableDiffusionUpscalePipeline

    if args.kind == "ldm3d":  # RGB + depth: see cli/ldm3d.py
        return run_ldm3d_upscale(args, say)
    if args.depth is not None or args.pano:
        raise UsageError("a DEPTH file and --pano are for --ldm3d only")
    seeds = seeds_for(args)
    kwargs = upscale_kwargs(args, seeds)
    image = open_image_file(args.image, flag="IMAGE").convert("RGB")
    model_args = argparse.Namespace(**{**vars(args), "no_safety_checker": False})  # set below, per pipeline
    if args.model is None:
        say(f"No --model given: using the built-in tiny {args.kind} upscaler (random weights, the picture is noise).")
        model_args.model = str(builtin_upscaler_path(args.kind))
    if args.kind == "x4":
        pipe = load_pipeline(StableDiffusionUpscalePipeline, model_args, say)
        if args.no_safety_checker:
            pipe.safety_checker = None
        result = pipe(args.prompt, image=image, **kwargs)
    else:  # the x2 pipeline has no num_images_per_prompt: one prompt and image per seed
        pipe = load_pipeline(StableDiffusionLatentUpscalePipeline, model_args, say)
        n = kwargs.pop("num_images_per_prompt")
        result = pipe([args.prompt] * n, image=[image] * n, **kwargs)
    extra = {"image": args.image, "upscaler": args.kind, "tile": args.tile, "noise_level": kwargs.get("noise_level")}
    return write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected, extra=extra)
