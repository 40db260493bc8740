"""What every `stablepipe` subcommand shares: flags, seeds, writing PNGs with their settings.

Loading the pipeline the model flags name is `stablepipe.model_flags` (batch jobs use it too); writing files
without replacing one by surprise is `stablepipe.output_files` (the web app uses it too).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from stablepipe.model_flags import call_default, lora_hashes, model_settings
from stablepipe.output_files import output_paths, save_png

DTYPES = ("auto", "float32", "float16", "bfloat16")


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


# ---- shared flags ----------------------------------------------------------------------------------------


def add_model_flags(parser: argparse.ArgumentParser, *, model_files: bool = True) -> None:
    """--model and how to load it; with `model_files`, also --config (single files), --lora, --embedding and
    --prompt-weighting (the commands that load one pipeline through `model_flags.load_pipeline_from_flags`)."""
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
    group.add_argument("--from-png", metavar="FILE",
                       help="take the prompt and settings from a PNG's infotext (stablepipe's or AUTOMATIC1111's) "
                            "to draw the same picture; flags given as well override the file's values")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default="outputs", help="a folder, or a .png path (default: ./outputs); new "
                                                          "names in a folder never reuse an existing one")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    group.add_argument("--json", action="store_true", help="print the written files and settings as JSON")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def add_drawing_flags(parser: argparse.ArgumentParser) -> None:
    """The model, generation and output groups, in that order: what every command that draws with one pipeline
    takes (generate, img2img, inpaint, depth2img, variation, upscale, ldm3d)."""
    add_model_flags(parser)
    add_generation_flags(parser)
    add_output_flags(parser)


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    """--image and --strength, for the commands that start from a picture (img2img, inpaint, depth2img)."""
    group = parser.add_argument_group("input image")
    group.add_argument("--image", required=True, help="the picture to start from (PNG, JPEG ...; any mode)")
    group.add_argument("--strength", type=float, default=None,
                       help="how much of the picture to repaint, 0..1 (default: the pipeline's)")


# ---- the built-in tiny models (random weights, see builtin.py) ---------------------------------------------------


def with_builtin(args: argparse.Namespace, kind: str, what: str, say) -> argparse.Namespace:
    """`args` as they are when --model is given; else a copy whose --model is the built-in tiny model of `kind`
    (a key of `builtin.BUILTIN_MODELS`, built on first use), saying so as `what` ("variation model")."""
    if args.model is not None:
        return args
    from stablepipe.builtin import builtin_path

    say(f"No --model given: using the built-in tiny {what} (random weights, the picture is noise).")
    return argparse.Namespace(**{**vars(args), "model": str(builtin_path(kind))})


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


# ---- checks, seeds, settings -----------------------------------------------------------------------------------


MAX_SIDE = 8192  # pixels: far beyond what the models were trained at; larger sides only exhaust memory


def check_size_flags(args: argparse.Namespace) -> None:
    """--width / --height positive and at most MAX_SIDE, before any model is loaded."""
    for flag in ("width", "height"):
        value = getattr(args, flag, None)
        if value is not None and not 8 <= value <= MAX_SIDE:
            raise UsageError(f"--{flag} {value}: give 8 to {MAX_SIDE} pixels, a multiple of 8 (the model's own "
                             "size, e.g. 512, draws best)")


MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes (A1111's seeds are 32-bit, well within)


def seeds_for(args: argparse.Namespace) -> list[int]:
    """One seed per image from --seed; a random first seed (recorded in the PNGs) when none or -1 is given."""
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    if args.seed is not None and args.seed + args.num_images - 1 > MAX_SEED:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED} (or -1 for a random one), got {args.seed}")
    if args.seed is not None and args.seed < -1:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED}, or -1 for a random one; got {args.seed}")
    first = args.seed if args.seed is not None and args.seed >= 0 else random.randrange(2**32)
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


def write_images(
    images, args: argparse.Namespace, seeds: list[int], pipe, *, flags=None, extra: dict[str, Any] | None = None,
    companions: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Save the images as PNGs with their settings (plus `extra` ones, e.g. the input image and strength): the
    effective ones, the pipeline's defaults where no flag was given."""
    width, height = images[0].size
    guidance = args.guidance if args.guidance is not None else call_default(pipe, "guidance_scale")
    settings = {
        "command": args.command, "prompt": getattr(args, "prompt", None), "negative_prompt": args.negative_prompt,
        "steps": args.steps or call_default(pipe, "num_inference_steps"), "guidance": guidance,
        "scheduler": args.scheduler or type(pipe.scheduler).__name__, "width": width, "height": height,
        "clip_skip": args.clip_skip, **model_settings(pipe, args.model), **(extra or {}),
    }
    for key in ("lora", "embedding"):  # what else shaped the picture, when given
        if getattr(args, key, None):
            settings[key] = list(getattr(args, key))
    if getattr(args, "lora", None):
        settings["lora_hashes"] = lora_hashes(args.lora)
    if getattr(args, "prompt_weighting", False):
        settings["prompt_weighting"] = True
    if getattr(args, "from_png", None):  # where the settings came from, and what of the file was not applied
        settings["from_png"] = str(args.from_png)
        settings.update({"png_not_applied": args.png_not_applied} if getattr(args, "png_not_applied", None) else {})
    files = []
    paths = output_paths(args.out, seeds, overwrite=args.overwrite, companions=companions)
    for index, (image, path, seed) in enumerate(zip(images, paths, seeds)):
        save_png(image, path, {**settings, "seed": seed}, overwrite=args.overwrite)
        files.append({"path": str(path), "seed": seed, "nsfw": bool(flags[index]) if flags else False})
    return {"files": files, "settings": settings}
