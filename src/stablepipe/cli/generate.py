"""`stablepipe generate`: text-to-image."""

from __future__ import annotations

import argparse
from typing import Any

from stablepipe.cli.common import (
    add_generation_flags,
    add_model_flags,
    add_output_flags,
    generation_kwargs,
    load_pipeline,
    seeds_for,
    write_images,
)


def register(commands) -> None:
    parser = commands.add_parser("generate", help="text-to-image", description="Make images from a text prompt.")
    parser.add_argument("prompt", help="what to draw")
    add_model_flags(parser)
    add_generation_flags(parser)
    add_output_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    seeds = seeds_for(args)
    pipe = load_pipeline(StableDiffusionPipeline, args, say)
    result = pipe(args.prompt, **generation_kwargs(args, seeds))
    return write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected)
