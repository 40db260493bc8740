"""`stablepipe variation IMAGE`: new images like a given one (Stable Diffusion image variations)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from stablepipe.cli.common import (
    UsageError,
    add_generation_flags,
    add_model_flags,
    add_output_flags,
    generation_kwargs,
    load_pipeline,
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


def open_image(path: str):
    """The file at `path` as an RGB PIL image, or a one-line error."""
    import PIL.Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except PIL.UnidentifiedImageError:
        raise UsageError(f"{path} is not an image PIL can read") from None


def build_builtin_variation(folder: Path, *, seed: int = 0) -> Path:
    """The built-in tiny model's VAE, UNet and scheduler with a random 32 px CLIP image encoder (random
    weights: the picture is noise), saved in the lambdalabs/sd-image-variations-diffusers layout."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from stablepipe.builtin import builtin_model_path
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline
    from stablepipe.pipelines.variation import StableDiffusionImageVariationPipeline

    text = StableDiffusionPipeline.from_pretrained(builtin_model_path(), requires_safety_checker=False)
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


def builtin_variation_path() -> Path:
    """The built-in variation model's folder, built on first use in the stablepipe cache."""
    from stablepipe.builtin import cache_dir

    folder = cache_dir() / BUILTIN_VARIATION_NAME
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_builtin_variation(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.variation import StableDiffusionImageVariationPipeline

    for flag, value in (("--negative-prompt", args.negative_prompt), ("--clip-skip", args.clip_skip)):
        if value is not None:
            raise UsageError(f"variation takes no {flag}: it is conditioned on the image, not on text")
    image = open_image(args.image)
    seeds = seeds_for(args)
    model_args = args
    if args.model is None:
        say("No --model given: using the built-in tiny variation model (random weights, the picture is noise).")
        model_args = argparse.Namespace(**{**vars(args), "model": str(builtin_variation_path())})
    pipe = load_pipeline(StableDiffusionImageVariationPipeline, model_args, say)
    kwargs = {**generation_kwargs(args, seeds), "num_images_per_prompt": len(seeds)}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("negative_prompt", "clip_skip")}
    result = pipe(image, **kwargs)
    report = write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected)
    report["settings"]["image"] = args.image
    return report
