"""`stablepipe variation IMAGE`: new images like a given one (Stable Diffusion image variations)."""

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

BUILTIN_VARIATION_NAME = "builtin-tiny-variation-v1"


def register(commands) -> None:
    parser = commands.add_parser(
        "variation", help="variations of an image",
        description="Make new images like IMAGE, conditioned on its CLIP image embedding "
        "(e.g. --model lambdalabs/sd-image-variations-diffusers).",
    )
    parser.add_argument("image", help="the picture to make variations of (PNG, JPEG, ...)")
    add_model_flags(parser)
    add_generation_flags(parser)
    add_output_flags(parser)
    parser.set_defaults(run=run)


def build_builtin_variation(folder: Path, *, seed: int = 0) -> Path:
    """The tiny random model's VAE, UNet and scheduler with a random 32 px CLIP image encoder (random
    weights: the picture is noise), saved in the lambdalabs/sd-image-variations-diffusers layout."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from stablepipe.builtin import random_model_path
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline
    from stablepipe.pipelines.variation import StableDiffusionImageVariationPipeline

    text = StableDiffusionPipeline.from_pretrained(random_model_path(), requires_safety_checker=False)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=4, projection_dim=text.unet.config.cross_attention_dim,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionImageVariationPipeline(
        vae=text.vae, image_encoder=CLIPVisionModelWithProjection(config).eval(), unet=text.unet,
        scheduler=text.scheduler, feature_extractor=processor, requires_safety_checker=False,
    )
    return pipe.save_pretrained(folder)


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.variation import StableDiffusionImageVariationPipeline

    for flag, value in (("--negative-prompt", args.negative_prompt), ("--clip-skip", args.clip_skip)):
        if value is not None:
            raise UsageError(f"variation takes no {flag}: it is conditioned on the image, not on text")
    image = open_image_file(args.image, flag="IMAGE")
    seeds = seeds_for(args)
    model_args = args
    if args.model is None:
        say("No --model given: using the built-in tiny variation model (random weights, the picture is noise).")
        folder = cached_folder(BUILTIN_VARIATION_NAME, build_builtin_variation)
        model_args = argparse.Namespace(**{**vars(args), "model": str(folder)})
    pipe = load_pipeline(StableDiffusionImageVariationPipeline, model_args, say)
    result = pipe(image.convert("RGB"), **generation_kwargs(args, seeds))
    flags = result.nsfw_content_detected
    return write_images(result.images, args, seeds, pipe, flags=flags, extra={"image": args.image})
