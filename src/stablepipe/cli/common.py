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
    checked = check_device(device)
    if dtype == "auto":  # bfloat16 on CPUs with native bfloat16, float16 on CUDA (pipelines/memory.py)
        from stablepipe.pipelines.memory import fast_dtype

        return checked, fast_dtype(device)
    return checked, getattr(torch, dtype)


def check_device(device: str):
    """--device as a torch.device this machine has, or a UsageError saying what it has."""
    import torch

    try:
        checked = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device name; use auto, cpu, cuda, cuda:1, mps ...") from None
    kind = checked.type
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    if kind != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        no_cuda = kind == "cuda" and not torch.version.cuda
        built = f" (this torch {torch.__version__} is built without CUDA)" if no_cuda else ""
        raise UsageError(f"--device {device}: no {kind} device is available here{built}; use --device cpu")
    if kind == "cuda" and checked.index is not None and checked.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return checked


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
    set_scheduler(pipe, args)
    check_clip_skip(pipe, getattr(args, "clip_skip", None))
    pipe.loaded_from = model  # what the PNGs' Model and Model hash name
    pipe.set_progress_bar_config(disable=args.quiet or args.json)
    pipe.to(device)
    if args.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        pipe.enable_channels_last()  # the CPU fast path (benchmarks/RESULTS.md: float32 gains less, costs memory)
    return pipe


def set_scheduler(pipe, args: argparse.Namespace) -> None:
    """--scheduler by name; else the sampler of a --from-png file, unless the model's own already is it."""
    from stablepipe.schedulers.names import a1111_names_of, scheduler_from_a1111, scheduler_from_name

    if getattr(args, "scheduler", None):
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    elif getattr(args, "png_sampler", None) and tuple(args.png_sampler) != a1111_names_of(pipe.scheduler):
        pipe.scheduler = scheduler_from_a1111(*args.png_sampler, pipe.scheduler.config)


def check_clip_skip(pipe, clip_skip: int | None) -> None:
    """--clip-skip within the text encoder's layers (0 .. layers - 1)."""
    encoder = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
    if clip_skip is None or encoder is None:
        return
    layers = encoder.config.num_hidden_layers
    if not 0 <= clip_skip < layers:
        raise UsageError(f"--clip-skip {clip_skip}: this text encoder has {layers} layers, so skip 0 to "
                         f"{layers - 1} of them (AUTOMATIC1111's 'Clip skip 2' is --clip-skip 1)")


MAX_SIDE = 8192  # pixels: far beyond what the models were trained at; larger sides only exhaust memory


def check_size_flags(args: argparse.Namespace) -> None:
    """--width / --height positive and at most MAX_SIDE, before any model is loaded."""
    for flag in ("width", "height"):
        value = getattr(args, flag, None)
        if value is not None and not 8 <= value <= MAX_SIDE:
            raise UsageError(f"--{flag} {value}: give 8 to {MAX_SIDE} pixels, a multiple of 8 (the model's own "
                             "size, e.g. 512, draws best)")


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


def output_paths(out: str, seeds: list[int], suffix: str = "", *, overwrite: bool = False,
                 companions: tuple[str, ...] = ()) -> list[Path]:
    """Where each image goes. `--out x.png`: x.png for one image (refused if it exists, unless `overwrite`),
    x-N.png for several, N counting from the first number free. A folder: NNNNN-SEED.png, numbered from one past
    the highest number there (A1111's scheme), so a name is never reused. `companions`: the suffixes of the
    files written beside each image (e.g. "-depth"), which must be free too."""
    from stablepipe.cli.files import free_numbered_names, refuse_existing

    target = Path(out)
    if target.suffix.lower() == ".png":
        if len(seeds) == 1:
            paths = [target.with_name(target.stem + suffix + end + ".png") for end in ("", *companions)]
            for path in paths:
                refuse_existing(path, overwrite=overwrite)
            return paths[:1]
        if overwrite:
            return [target.with_name(f"{target.stem}-{i}{suffix}.png") for i in range(len(seeds))]
        return free_indexed_names(target, suffix, len(seeds), companions)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {target}: that is a file, not a folder; give a folder or a .png name")

    def names(number: int) -> list[str]:
        return [f"{number:05d}-{seeds[0]}{suffix}{end}.png" for end in ("", *companions)]

    first = free_numbered_names(target, names, 1)[0]
    number = int(first.name.split("-")[0])
    return [target / f"{number + i:05d}-{seed}{suffix}.png" for i, seed in enumerate(seeds)]


def free_indexed_names(target: Path, suffix: str, count: int, companions: tuple[str, ...]) -> list[Path]:
    """`count` names STEM-N.png from the lowest N at which all of them (and their companions) are free."""
    start = 0
    while True:
        paths = [target.with_name(f"{target.stem}-{start + i}{suffix}.png") for i in range(count)]
        if not any(p.with_name(p.stem + end + ".png").exists() for p in paths for end in ("", *companions)):
            return paths
        start += 1


def png_info(settings: dict[str, Any]):
    """The PNG text chunks of one image: `parameters` (A1111's infotext) and `stablepipe` (the settings as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext_of(settings))
    info.add_text("stablepipe", json.dumps(settings))
    return info


def infotext_of(settings: dict[str, Any]) -> str:
    """A1111's infotext of one image from stablepipe's settings (as `write_images` and the web app record them)."""
    from stablepipe.infotext import a1111_params, format_infotext, model_name

    loras, model = settings.get("lora_hashes"), settings.get("model")
    params = a1111_params(
        steps=settings["steps"], sampler=settings["sampler"], schedule_type=settings.get("schedule_type"),
        cfg_scale=settings["guidance"], seed=settings["seed"], width=settings["width"], height=settings["height"],
        model_hash=settings.get("model_hash"), model=model_name(model) if model else None,
        denoising_strength=settings.get("strength"), clip_skip=settings.get("clip_skip"), lora_hashes=loras,
    )
    return format_infotext(settings.get("prompt") or "", settings.get("negative_prompt"), params)


def save_png(image, path: Path, settings: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write a PNG with its settings as text chunks (see `png_info`), atomically; an existing `path` is refused
    unless `overwrite`."""
    from stablepipe.cli.files import write_atomically

    info = png_info(settings)
    write_atomically(Path(path), lambda staging: image.save(staging, format="PNG", pnginfo=info), overwrite=overwrite)


def call_default(pipe, name: str) -> Any:
    """The default of the pipeline's `__call__` argument `name` (e.g. its steps and guidance), or None."""
    import inspect

    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def model_settings(pipe, source: str | None) -> dict[str, Any]:
    """Model (as given), Model hash (see `local_model_hash`) and the A1111 sampler names of the scheduler."""
    from stablepipe.infotext import local_model_hash
    from stablepipe.schedulers.names import a1111_names_of

    sampler, schedule = a1111_names_of(pipe.scheduler)
    loaded = getattr(pipe, "loaded_from", None) or source
    return {"model": str(source or "builtin"), "model_hash": local_model_hash(loaded) if loaded else None,
            "sampler": sampler, "schedule_type": schedule}


def lora_hashes(loras: list[str]) -> dict[str, str]:
    """{name: A1111's short hash} of the local --lora files (as A1111 names a LoRA: its file name)."""
    from stablepipe.infotext import lora_hash

    found = {}
    for value in loras:
        path = Path(split_option(value, "--lora")[0])
        if path.is_file():
            found[path.stem] = lora_hash(path)
    return found


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
