"""`stablepipe variation IMAGE`: new images like a given one (Stable Diffusion image variations)."""

from __future__ import annotations

import argparse
from typing import Any

from stablepipe.cli.common import (
    UsageError,
    add_drawing_flags,
    generation_kwargs,
    open_image_file,
    seeds_for,
    with_builtin,
    write_images,
)
from stablepipe.model_flags import load_pipeline_from_flags


def register(commands) -> None:
    parser = commands.add_parser(
        "variation", help="variations of an image",
        description="Make new images like IMAGE, conditioned on its CLIP image embedding "
        "(e.g. --model lambdalabs/sd-image-variations-diffusers).",
    )
    parser.add_argument("image", help="the picture to make variations of (PNG, JPEG, ...)")
    add_drawing_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.variation import StableDiffusionImageVariationPipeline

    for flag, value in (("--negative-prompt", args.negative_prompt), ("--clip-skip", args.clip_skip)):
        if value is not None:
            raise UsageError(f"variation takes no {flag}: it is conditioned on the image, not on text")
    image = open_image_file(args.image, flag="IMAGE")
    seeds = seeds_for(args)
    model_args = with_builtin(args, "variation", "variation model", say)
    pipe = load_pipeline_from_flags(StableDiffusionImageVariationPipeline, model_args, say)
    result = pipe(image.convert("RGB"), **generation_kwargs(args, seeds))
    flags = result.nsfw_content_detected
    return write_images(result.images, args, seeds, pipe, flags=flags, extra={"image": args.image})
