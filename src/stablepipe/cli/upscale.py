"""`stablepipe upscale --x4 | --x2 IMAGE`: text-guided super-resolution (x4 upscaler, x2 latent upscaler)."""

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
from stablepipe.cli.ldm3d import add_upscale_flags as add_ldm3d_flags
from stablepipe.cli.ldm3d import run_upscale as run_ldm3d_upscale
from stablepipe.model_flags import load_pipeline_from_flags


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
    add_drawing_flags(parser)
    parser.set_defaults(run=run)


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
    model_args = with_builtin(args, args.kind, f"{args.kind} upscaler", say)
    model_args = argparse.Namespace(**{**vars(model_args), "no_safety_checker": False})  # set below, per pipeline
    if args.kind == "x4":
        pipe = load_pipeline_from_flags(StableDiffusionUpscalePipeline, model_args, say)
        if args.no_safety_checker:
            pipe.safety_checker = None
        result = pipe(args.prompt, image=image, **kwargs)
    else:  # the x2 pipeline has no num_images_per_prompt: one prompt and image per seed
        pipe = load_pipeline_from_flags(StableDiffusionLatentUpscalePipeline, model_args, say)
        n = kwargs.pop("num_images_per_prompt")
        result = pipe([args.prompt] * n, image=[image] * n, **kwargs)
    extra = {"image": args.image, "upscaler": args.kind, "tile": args.tile, "noise_level": kwargs.get("noise_level")}
    return write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected, extra=extra)
