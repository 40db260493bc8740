"""What every `stablepipe` subcommand shares: flags, loading, seeds, writing PNGs with their settings."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


# ---- shared flags ----------------------------------------------------------------------------------------


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="Hub repo id or local diffusers folder (default: the built-in tiny model)")
    group.add_argument("--variant", help="weight variant to load, e.g. fp16")
    group.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="auto: bfloat16 + channels-last on CPUs with native bfloat16, else float32; CUDA: float16")
    group.add_argument("--no-safety-checker", action="store_true", help="do not run the safety checker")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--negative-prompt", default=None, help="what the image should not show")
    group.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    group.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    group.add_argument("--scheduler", default=None, help='sampler by its usual name, e.g. "DPM++ 2M Karras"; "list" lists them')
    group.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed and saved)")
    group.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8")
    group.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8")
    group.add_argument("--num-images", type=int, default=1, help="how many images to make")
    group.add_argument("--clip-skip", type=int, default=None, help="use the CLIP layer this many from the end")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default="outputs", help="a folder, or a .png path (default: ./outputs)")
    group.add_argument("--json", action="store_true", help="print the written files and settings as JSON")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    """--image and --strength, for the commands that start from a picture (img2img, inpaint, depth2img)."""
    group = parser.add_argument_group("input image")
    group.add_argument("--image", required=True, help="the picture to start from (PNG, JPEG ...; any mode)")
    group.add_argument("--strength", type=float, default=None,
                       help="how much of the picture to repaint, 0..1 (default: the pipeline's)")


# ---- input images ------------------------------------------------------------------------------------------


def open_image_file(path: str, *, flag: str = "--image"):
    """The picture at `path` as a PIL image in its own mode (the pipelines convert it), or a one-line error."""
    import PIL.Image

    if not Path(path).is_file():
        raise UsageError(f"{flag}: no image file at {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    except (PIL.UnidentifiedImageError, OSError) as err:
        raise UsageError(f"{flag}: {path} is not an image PIL can read ({err})") from None


def resize_to_flags(image, args: argparse.Namespace):
    """The input picture resized (Lanczos) to --width x --height when given (a side not given keeps the
    picture's size); unchanged otherwise."""
    import PIL.Image

    from stablepipe.pipelines.stages import check_size

    check_size(args.height or 8, args.width or 8)  # the flags given must be multiples of 8
    size = (args.width or image.width, args.height or image.height)
    return image if size == image.size else image.resize(size, resample=PIL.Image.Resampling.LANCZOS)


# ---- running -----------------------------------------------------------------------------------------------


def cached_folder(name: str, build) -> Path:
    """The folder `name` in the stablepipe cache, made by `build(folder)` on first use (built in a staging
    folder and renamed, so a half-built model is never found; a concurrent builder's result wins)."""
    import os
    import shutil

    from stablepipe.builtin import cache_dir

    folder = cache_dir() / name
    if not (folder / "model_index.json").is_file():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def pick_device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":  # bfloat16 on CPUs with native bfloat16, float16 on CUDA (pipelines/memory.py)
        from stablepipe.pipelines.memory import fast_dtype

        return torch.device(device), fast_dtype(device)
    return torch.device(device), getattr(torch, dtype)


def load_pipeline(cls, args: argparse.Namespace, say) -> Any:
    """The pipeline named by --model, or the built-in tiny one, on --device in --dtype."""
    import torch
    import transformers

    from stablepipe.builtin import builtin_model_path

    transformers.utils.logging.disable_progress_bar()  # the command shows its own progress
    model = args.model
    if model is None:
        say("No --model given: using the built-in tiny model (random weights, the picture is noise).")
        model = builtin_model_path()
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    extra = {}
    if args.no_safety_checker and "safety_checker" in cls.component_names():  # SDXL has none
        extra["safety_checker"] = None
        if "requires_safety_checker" in cls._config_keys:  # depth2img and the upscalers have no such setting
            extra["requires_safety_checker"] = False
    pipe = cls.from_pretrained(model, torch_dtype=dtype, variant=args.variant, revision=args.revision, **extra)
    if args.scheduler:
        from stablepipe.schedulers.names import scheduler_from_name

        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=args.quiet or args.json)
    pipe.to(device)
    if args.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        pipe.enable_channels_last()  # the CPU fast path (benchmarks/RESULTS.md: float32 gains less, costs memory)
    return pipe


def seeds_for(args: argparse.Namespace) -> list[int]:
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    first = args.seed if args.seed is not None else random.randrange(2**32)
    return [first + i for i in range(args.num_images)]


def generation_kwargs(args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    import torch

    kwargs = {
        "negative_prompt": args.negative_prompt, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
        "width": args.width, "height": args.height, "clip_skip": args.clip_skip,
        "generator": [torch.Generator().manual_seed(s) for s in seeds],
        "num_images_per_prompt": len(seeds),
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def output_paths(out: str, seeds: list[int], suffix: str = "") -> list[Path]:
    """Where each image goes: `--out x.png` for one image (x-0.png, x-1.png ... for several), else a folder."""
    target = Path(out)
    if target.suffix.lower() == ".png":
        if len(seeds) == 1:
            return [target.with_name(target.stem + suffix + ".png")]
        return [target.with_name(f"{target.stem}-{i}{suffix}.png") for i in range(len(seeds))]
    existing = len(list(target.glob("*.png"))) if target.is_dir() else 0
    return [target / f"{existing + i:05d}-{seed}{suffix}.png" for i, seed in enumerate(seeds)]


def save_png(image, path: Path, settings: dict[str, Any]) -> None:
    """Write a PNG with the settings as text chunks: `parameters` in AUTOMATIC1111's format, and JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    a1111 = settings.get("prompt") or ""
    if settings.get("negative_prompt"):
        a1111 += f"\nNegative prompt: {settings['negative_prompt']}"
    keys = ("steps", "scheduler", "guidance", "seed", "width", "height", "model")
    a1111 += "\n" + ", ".join(f"{k.capitalize()}: {settings[k]}" for k in keys if settings.get(k) is not None)
    info.add_text("parameters", a1111)
    info.add_text("stablepipe", json.dumps(settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def write_images(
    images, args: argparse.Namespace, seeds: list[int], pipe, *, flags=None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Save the images as PNGs with their settings (plus `extra` ones, e.g. the input image and strength)."""
    width, height = images[0].size
    settings = {
        "command": args.command, "prompt": getattr(args, "prompt", None), "negative_prompt": args.negative_prompt,
        "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler or type(pipe.scheduler).__name__,
        "width": width, "height": height, "model": str(args.model or "builtin"), **(extra or {}),
    }
    files = []
    for index, (image, path, seed) in enumerate(zip(images, output_paths(args.out, seeds), seeds)):
        save_png(image, path, {**settings, "seed": seed})
        files.append({"path": str(path), "seed": seed, "nsfw": bool(flags[index]) if flags else False})
    return {"files": files, "settings": settings}
