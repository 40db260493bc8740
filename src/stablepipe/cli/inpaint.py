"""`stablepipe inpaint PROMPT --image IN.png --mask MASK.png`: repaint the white part of the mask."""

from __future__ import annotations

import argparse
from typing import Any

from stablepipe.cli.common import (
    add_drawing_flags,
    add_image_flags,
    open_image_file,
    seeds_for,
    write_images,
)
from stablepipe.cli.img2img import image_kwargs
from stablepipe.model_flags import load_pipeline_from_flags


def register(commands) -> None:
    parser = commands.add_parser(
        "inpaint", help="inpainting",
        description="Repaint the white part of --mask in --image following a prompt (black is kept). Works with "
        "inpainting checkpoints (e.g. stable-diffusion-v1-5/stable-diffusion-inpainting) and plain ones.",
    )
    parser.add_argument("prompt", nargs="?", help="what to paint in the masked area (or from --from-png)")
    add_image_flags(parser)
    group = parser.add_argument_group("mask")
    group.add_argument("--mask", required=True, help="the mask: white = repaint, black = keep; the image's size")
    group.add_argument("--padding-mask-crop", type=int, default=None, metavar="PIXELS",
                       help="work on the masked region only (grown by PIXELS) at full resolution, paste it back")
    add_drawing_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.inpaint import StableDiffusionInpaintPipeline
    from stablepipe.pipelines.stages import check_size

    seeds = seeds_for(args)
    kwargs = image_kwargs(args, seeds)
    image, mask = open_image_file(args.image), open_image_file(args.mask, flag="--mask")
    width, height = args.width or image.width - image.width % 8, args.height or image.height - image.height % 8
    check_size(height, width)
    if args.padding_mask_crop is not None:
        kwargs["padding_mask_crop"] = args.padding_mask_crop
    pipe = load_pipeline_from_flags(StableDiffusionInpaintPipeline, args, say)
    result = pipe(args.prompt, image=image, mask_image=mask, height=height, width=width, **kwargs)
    extra = {"image": args.image, "mask": args.mask, "strength": kwargs.get("strength", 1.0),
             "padding_mask_crop": args.padding_mask_crop}
    return write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected, extra=extra)
