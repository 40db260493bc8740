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


def add_model_flags(parser: argparse.ArgumentParser, *, model_files: bool = True) -> None:
    """--model and how to load it; with `model_files`, also --config (single files), --lora, --embedding and
    --prompt-weighting (the commands that load one pipeline through `load_pipeline`)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="Hub repo id, local diffusers folder, or single .safetensors/.ckpt file "
                                        "(default: the built-in model)")
    group.add_argument("--variant", help="weight variant to load, e.g. fp16")
    group.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="auto: bfloat16 + channels-last on CPUs with native bfloat16, else float32; CUDA: float16")
    group.add_argument("--no-safety-checker", action="store_true", help="do not run the safety checker")
    if not model_files:
        return
    group.add_argument("--config", help="for a single-file --model of an unknown kind: a diffusers folder or Hub id "
                                         "describing it")
    group.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA file, folder or Hub id (kohya / AUTOMATIC1111 or diffusers layout), scale 1 by "
                            "default; repeat for several")
    group.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                       help="a textual-inversion embedding (.pt / .safetensors), used in prompts as TOKEN (default: "
                            "the file's own token or its name); repeat for several")
    group.add_argument("--prompt-weighting", action="store_true",
                       help="read AUTOMATIC1111's prompt syntax, (word:1.3) (word) [word] BREAK, and prompts longer "
                            "than 77 tokens")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--negative-prompt", default=None, help="what the image should not show")
    group.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    group.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    group.add_argument("--scheduler", default=None,
                       help='sampler by its usual name, e.g. "DPM++ 2M Karras"; "list" lists them')
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

    from stablepipe.builtin import builtin_model_note, builtin_model_path

    transformers.utils.logging.disable_progress_bar()  # the command shows its own progress
    model = args.model
    if model is None:
        say(f"No --model given: using {builtin_model_note()}.")
        model = builtin_model_path()
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    extra = {}
    if args.no_safety_checker and "safety_checker" in cls.component_names():  # SDXL has none
        extra["safety_checker"] = None
        if "requires_safety_checker" in cls._config_keys:  # depth2img and the upscalers have no such setting
            extra["requires_safety_checker"] = False
    if is_single_file(model):
        if args.variant:
            raise UsageError("--variant is for diffusers folders and Hub repos, not single files")
        config = getattr(args, "config", None)
        pipe = cls.from_single_file(model, config=config, torch_dtype=dtype, revision=args.revision, **extra)
    elif getattr(args, "config", None):
        raise UsageError("--config describes a single-file --model (.safetensors / .ckpt); drop it for folders")
    else:
        pipe = cls.from_pretrained(model, torch_dtype=dtype, variant=args.variant, revision=args.revision, **extra)
    add_adapters(pipe, args)
    if getattr(args, "scheduler", None):
        from stablepipe.schedulers.names import scheduler_from_name

        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=args.quiet or args.json)
    pipe.to(device)
    if args.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        pipe.enable_channels_last()  # the CPU fast path (benchmarks/RESULTS.md: float32 gains less, costs memory)
    return pipe


def is_single_file(model: str | Path) -> bool:
    """A .safetensors / .ckpt / .pt / .bin file, local or a Hub file URL, rather than a folder or repo id."""
    text = str(model)
    return text.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")) and not Path(text).is_dir()


def split_option(value: str, flag: str) -> tuple[str, str | None]:
    """"path:extra" -> (path, extra); a Windows drive letter or a URL scheme is not taken for the separator."""
    head, sep, tail = value.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail or len(head) == 1:
        return value, None
    if not tail:
        raise UsageError(f"{flag} {value!r}: nothing after ':'")
    return head, tail


def add_adapters(pipe, args: argparse.Namespace) -> None:
    """--lora, --embedding and --prompt-weighting on a loaded pipeline."""
    names, scales = [], []
    for i, value in enumerate(getattr(args, "lora", [])):
        source, scale = split_option(value, "--lora")
        try:
            scales.append(float(scale) if scale is not None else 1.0)
        except ValueError:
            raise UsageError(f"--lora {value!r}: the scale after ':' must be a number, e.g. {source}:0.8") from None
        names.append(f"lora_{i}")
        pipe.load_lora_weights(source, adapter_name=names[-1])
    if names:
        pipe.set_adapters(names, scales)
    for value in getattr(args, "embedding", []):
        source, token = split_option(value, "--embedding")
        pipe.load_textual_inversion(source, token=token)
    pipe.prompt_weighting = bool(getattr(args, "prompt_weighting", False))


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
    for key in ("lora", "embedding"):  # what else shaped the picture, when given
        if getattr(args, key, None):
            settings[key] = list(getattr(args, key))
    if getattr(args, "prompt_weighting", False):
        settings["prompt_weighting"] = True
    files = []
    for index, (image, path, seed) in enumerate(zip(images, output_paths(args.out, seeds), seeds)):
        save_png(image, path, {**settings, "seed": seed})
        files.append({"path": str(path), "seed": seed, "nsfw": bool(flags[index]) if flags else False})
    return {"files": files, "settings": settings}
