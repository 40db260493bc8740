"""`stablepipe ldm3d PROMPT [--pano]`: an RGB image and its depth map from text (LDM3D); and the RGB-D
upscaler behind `stablepipe upscale --ldm3d RGB DEPTH` (cli/upscale.py calls `add_upscale_flags` and
`run_upscale` from here).

Every picture is written twice: the RGB image as NAME.png and its depth as NAME-depth.png, a 16-bit
grayscale PNG (0..65535), both with the settings in their text chunks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
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
from stablepipe.output_files import save_png


def register(commands) -> None:
    parser = commands.add_parser(
        "ldm3d", help="RGB + depth from text (LDM3D)",
        description="Make an image and its depth map (a 16-bit PNG) from PROMPT with LDM3D, e.g. --model "
        "Intel/ldm3d-4c; 360-degree panoramas with --pano --model Intel/ldm3d-pano.",
    )
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--pano", action="store_true",
                        help="a 360-degree panorama: twice as wide as high by default (1024x512 with "
                        "Intel/ldm3d-pano), its left and right edges joining")  # fmt: skip
    add_drawing_flags(parser)
    parser.set_defaults(run=run)


# ---- writing RGB + depth ---------------------------------------------------------------------------------------


def write_rgbd(result, args: argparse.Namespace, seeds: list[int], pipe, *, extra: dict[str, Any]) -> dict[str, Any]:
    """RGB images as the usual PNGs, each depth map beside its image as NAME-depth.png (16-bit grayscale)."""
    report = write_images(result.rgb, args, seeds, pipe, flags=result.nsfw_content_detected, extra=extra,
                          companions=("-depth",))
    files = []
    for entry, depth in zip(report["files"], result.depth):
        path = Path(entry["path"])
        depth_path = path.with_name(f"{path.stem}-depth.png")
        save_png(depth, depth_path, {**report["settings"], "seed": entry["seed"], "depth_of": path.name},
                 overwrite=args.overwrite)
        files += [{**entry, "kind": "rgb", "depth": str(depth_path)},
                  {**entry, "kind": "depth", "path": str(depth_path), "rgb": str(path)}]  # fmt: skip
    report["files"] = files
    return report


# ---- stablepipe ldm3d ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, say) -> dict[str, Any]:
    from stablepipe.pipelines.ldm3d import StableDiffusionLDM3DPipeline

    seeds = seeds_for(args)
    kwargs = generation_kwargs(args, seeds)
    model_args = with_builtin(args, "ldm3d", "LDM3D model", say)
    pipe = load_pipeline_from_flags(StableDiffusionLDM3DPipeline, model_args, say)
    if args.pano:
        height = kwargs.setdefault("height", pipe.default_size(None, None)[0])
        kwargs.setdefault("width", 2 * height)
        kwargs["circular_padding"] = True
    result = pipe(args.prompt, **kwargs)
    return write_rgbd(result, args, seeds, pipe, extra={"pano": args.pano})


# ---- stablepipe upscale --ldm3d RGB DEPTH ----------------------------------------------------------------------


def add_upscale_flags(parser: argparse.ArgumentParser, kind) -> None:
    """`upscale`'s --ldm3d choice (in its mutually exclusive `kind` group), the DEPTH file and --pano."""
    kind.add_argument("--ldm3d", dest="kind", action="store_const", const="ldm3d",
                      help="RGB + depth (StableDiffusionUpscaleLDM3DPipeline, e.g. --model Intel/ldm3d-sr): "
                      "give IMAGE and its DEPTH map")  # fmt: skip
    parser.add_argument("depth", nargs="?", help="--ldm3d only: the depth map of IMAGE (a 16-bit or 8-bit PNG)")
    parser.add_argument("--pano", action="store_true", help="--ldm3d only: a 360-degree panorama; keep its "
                        "left and right edges joined")  # fmt: skip


def upscale_size(args: argparse.Namespace, rgb) -> list[int]:
    """[height, width]: --height / --width, else twice the input (Intel/ldm3d-sr: 512 -> 1024)."""
    height, width = args.height or 2 * rgb.height, args.width or 2 * rgb.width
    if args.width is None and args.height is not None:
        width = round(rgb.width * height / rgb.height / 8) * 8
    if args.height is None and args.width is not None:
        height = round(rgb.height * width / rgb.width / 8) * 8
    return [height, width]


def run_upscale(args: argparse.Namespace, say) -> dict[str, Any]:
    """`stablepipe upscale --ldm3d RGB DEPTH`: both to --width x --height (default: twice the input)."""
    from stablepipe.pipelines.ldm3d import StableDiffusionUpscaleLDM3DPipeline

    if args.depth is None:
        raise UsageError("--ldm3d needs the depth map too: stablepipe upscale --ldm3d RGB DEPTH")
    for flag, value in (("--tile", args.tile), ("--tile-overlap", args.tile_overlap), ("--clip-skip", args.clip_skip)):
        if value is not None:
            raise UsageError(f"--ldm3d takes no {flag}")
    rgb, depth = open_image_file(args.image, flag="IMAGE"), open_image_file(args.depth, flag="DEPTH")
    if rgb.size != depth.size:
        say(f"note: the depth map is {depth.width}x{depth.height} and the image {rgb.width}x{rgb.height}; "
            "both are resized to the output size")
    seeds = seeds_for(args)
    kwargs = {k: v for k, v in generation_kwargs(args, seeds).items() if k not in ("width", "height")}
    kwargs.update(target_res=upscale_size(args, rgb), circular_padding=args.pano)
    if args.noise_level is not None:
        kwargs["noise_level"] = args.noise_level
    model_args = with_builtin(args, "ldm3d-sr", "LDM3D upscaler", say)
    pipe = load_pipeline_from_flags(StableDiffusionUpscaleLDM3DPipeline, model_args, say)
    result = pipe(args.prompt, rgb=rgb, depth=depth, **kwargs)
    extra = {"image": args.image, "depth": args.depth, "upscaler": "ldm3d", "noise_level": args.noise_level}
    return write_rgbd(result, args, seeds, pipe, extra=extra)
