"""`stablepipe depth2img PROMPT --image IN.png`: repaint a picture keeping its depth (SD 2 depth model)."""

from __future__ import annotations

import argparse
from typing import Any

from stablepipe.cli.common import (
    UsageError,
    add_drawing_flags,
    add_image_flags,
    open_image_file,
    resize_to_flags,
    seeds_for,
    write_images,
)
from stablepipe.cli.img2img import image_kwargs
from stablepipe.model_flags import load_pipeline_from_flags

DEPTH_MODEL = "stabilityai/stable-diffusion-2-depth"


def register(commands) -> None:
    parser = commands.add_parser(
        "depth2img", help="depth-to-image",
        description=f"Repaint a picture following a prompt while keeping its depth layout (needs a depth model, "
        f"e.g. --model {DEPTH_MODEL}). The depth comes from the model's DPT estimator, or from --depth-map.",
    )
    parser.add_argument("prompt", help="what the new picture should show")
    add_image_flags(parser)
    parser.add_argument_group("depth").add_argument(
        "--depth-map", help="a depth image (e.g. a 16-bit PNG, brighter = nearer) to use instead of estimating it"
    )
    add_drawing_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.depth2img import StableDiffusionDepth2ImgPipeline

    if args.model is None:
        raise UsageError(f"depth2img needs a depth model (a 5-channel UNet): pass --model {DEPTH_MODEL}")
    seeds = seeds_for(args)
    kwargs = image_kwargs(args, seeds)
    image = resize_to_flags(open_image_file(args.image), args)
    if args.depth_map:
        kwargs["depth_map"] = open_image_file(args.depth_map, flag="--depth-map")
    model_args = argparse.Namespace(**{**vars(args), "no_safety_checker": False})  # depth2img has no checker
    pipe = load_pipeline_from_flags(StableDiffusionDepth2ImgPipeline, model_args, say)
    result = pipe(args.prompt, image=image, **kwargs)
    extra = {"image": args.image, "depth_map": args.depth_map, "strength": kwargs.get("strength", 0.8)}
    return write_images(result.images, args, seeds, pipe, extra=extra)
