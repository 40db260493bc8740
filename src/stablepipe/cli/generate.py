"""`stablepipe generate`: text-to-image."""

from __future__ import annotations

import argparse
from typing import Any

from stablepipe.cli.common import (
    UsageError,
    add_drawing_flags,
    generation_kwargs,
    seeds_for,
    write_images,
)
from stablepipe.cli.sdxl import add_refiner_flags, run_sdxl, wants_sdxl
from stablepipe.model_flags import load_pipeline_from_flags

SAFETY_LEVELS = ("WEAK", "MEDIUM", "STRONG", "MAX")  # stablepipe.pipelines.safe.SafetyConfig's presets


def register(commands) -> None:
    parser = commands.add_parser("generate", help="text-to-image", description="Make images from a text prompt.")
    parser.add_argument("prompt", nargs="?", help="what to draw (or from --from-png)")
    add_drawing_flags(parser)
    safe = parser.add_argument_group("safe latent diffusion")
    safe.add_argument("--safe", metavar="LEVEL", type=str.upper, choices=SAFETY_LEVELS,
                      help="steer away from unsafe content (Safe Latent Diffusion): WEAK, MEDIUM, STRONG or MAX")
    safe.add_argument("--safety-concept", help="with --safe: the text to steer away from (default: the SLD paper's)")
    add_refiner_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    seeds = seeds_for(args)
    if wants_sdxl(args):
        return run_sdxl(args, say, seeds)
    if args.safe or args.safety_concept:
        return run_safe(args, say, seeds)
    pipe = load_pipeline_from_flags(StableDiffusionPipeline, args, say)
    result = pipe(args.prompt, **generation_kwargs(args, seeds))
    return write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected)


def run_safe(args: argparse.Namespace, say, seeds: list[int]) -> dict[str, Any]:
    """`--safe LEVEL`: StableDiffusionPipelineSafe with that SafetyConfig preset (and `--safety-concept`)."""
    from stablepipe.pipelines.safe import SafetyConfig, StableDiffusionPipelineSafe

    if not args.safe:
        raise UsageError("--safety-concept needs --safe LEVEL (WEAK, MEDIUM, STRONG or MAX)")
    pipe = load_pipeline_from_flags(StableDiffusionPipelineSafe, args, say)
    if args.safety_concept:
        pipe.safety_concept = args.safety_concept
    result = pipe(args.prompt, **generation_kwargs(args, seeds), **SafetyConfig.preset(args.safe))
    report = write_images(result.images, args, seeds, pipe, flags=result.nsfw_content_detected)
    report["settings"].update(safe=args.safe, safety_concept=result.applied_safety_concept)
    return report
