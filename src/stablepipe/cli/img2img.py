"""`stablepipe img2img PROMPT --image IN.png`: repaint a picture following a prompt."""

from __future__ import annotations

import argparse
from typing import Any

from stablepipe.cli.common import (
    add_drawing_flags,
    add_image_flags,
    generation_kwargs,
    open_image_file,
    resize_to_flags,
    seeds_for,
    write_images,
)
from stablepipe.model_flags import load_pipeline_from_flags


def register(commands) -> None:
    parser = commands.add_parser(
        "img2img", help="image-to-image",
        description="Repaint a picture following a text prompt; --strength says how much (0: keep, 1: all).",
    )
    parser.add_argument("prompt", nargs="?", help="what the new picture should show (or from --from-png)")
    add_image_flags(parser)
    add_drawing_flags(parser)
    parser.set_defaults(run=run)


def image_kwargs(args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    """The pipeline arguments of the image commands: the shared ones, one image per seed, and --strength
    (the size comes from the input picture, resized to --width / --height by the command)."""
    from stablepipe.pipelines.image_stages import check_strength

    kwargs = {k: v for k, v in generation_kwargs(args, seeds).items() if k not in ("width", "height")}
    if args.strength is not None:
        check_strength(args.strength)
        kwargs["strength"] = args.strength
    return {**kwargs, "num_images_per_prompt": len(seeds)}


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.img2img import StableDiffusionImg2ImgPipeline

    seeds = seeds_for(args)
    kwargs = image_kwargs(args, seeds)
    image = resize_to_flags(open_image_file(args.image), args)
    pipe = load_pipeline_from_flags(StableDiffusionImg2ImgPipeline, args, say)
    result = pipe(args.prompt, image=image, **kwargs)
    extra = {"image": args.image, "strength": kwargs.get("strength", 0.8)}
    return write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected, extra=extra)
