"""Stable Diffusion XL in `stablepipe generate`: recognising an SDXL checkpoint, and base -> refiner.

    stablepipe generate "a lion" --model stabilityai/stable-diffusion-xl-base-1.0 \
        --refiner stabilityai/stable-diffusion-xl-refiner-1.0 --refiner-start 0.8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stablepipe.cli.common import UsageError, generation_kwargs, write_images
from stablepipe.model_flags import is_single_file, load_pipeline_from_flags, pick_device_and_dtype


def add_refiner_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Stable Diffusion XL")
    group.add_argument("--refiner", metavar="ID_OR_PATH",
                       help="an SDXL refiner (Hub id or folder) to finish the SDXL --model's images; it shares "
                            "the base model's VAE and second text encoder, as the SDXL release does")
    group.add_argument("--refiner-start", type=float, default=0.8, metavar="FRACTION",
                       help="the share of the denoising the base model does before the refiner takes over "
                            "(default 0.8)")


def model_index(model: str | Path, *, revision: str | None = None) -> dict[str, Any]:
    """The model_index.json of a folder or Hub repo (from the cache when offline)."""
    from stablepipe.loading.files import fetch_file

    return json.loads(Path(fetch_file(model, "model_index.json", revision=revision)).read_text())


def is_sdxl(index: dict[str, Any]) -> bool:
    """An SDXL checkpoint names an SDXL pipeline class, or has a second text encoder."""
    second = index.get("text_encoder_2")
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL") or (
        isinstance(second, list) and len(second) == 2 and second[1] is not None
    )


def model_is_sdxl(args: argparse.Namespace) -> bool:
    """Whether --model is SDXL: by its model_index.json, or for a single file by --config's or by its weights
    (SDXL files keep their text encoders under `conditioner.embedders.`)."""
    if args.model is None:
        return False
    if not is_single_file(args.model):
        return is_sdxl(model_index(args.model, revision=args.revision))
    if getattr(args, "config", None):
        return is_sdxl(model_index(args.config))
    from stablepipe.loading.checkpoint import checkpoint_keys

    if not Path(args.model).is_file():
        return False  # a Hub file URL or a missing file: the loader says what is wrong
    return any(key.startswith("conditioner.embedders.") for key in checkpoint_keys(args.model))


def wants_sdxl(args: argparse.Namespace) -> bool:
    """Whether `generate` should run SDXL: --model is an SDXL checkpoint. --refiner needs one."""
    sdxl = model_is_sdxl(args)
    if args.refiner and not sdxl:
        raise UsageError("--refiner needs an SDXL --model (e.g. stabilityai/stable-diffusion-xl-base-1.0)")
    if not 0 < args.refiner_start < 1:
        raise UsageError(f"--refiner-start must be between 0 and 1 (e.g. 0.8), got {args.refiner_start}")
    return sdxl


def load_refiner(args: argparse.Namespace, base) -> Any:
    """The --refiner as StableDiffusionXLImg2ImgPipeline, sharing the base's VAE and second text encoder."""
    from stablepipe.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline

    if not is_sdxl(model_index(args.refiner)):
        raise UsageError(f"--refiner {args.refiner} is not an SDXL checkpoint (no text_encoder_2 in model_index.json)")
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        args.refiner, torch_dtype=dtype, variant=args.variant, vae=base.vae, text_encoder_2=base.text_encoder_2,
    )
    if args.scheduler:
        from stablepipe.schedulers.names import scheduler_from_name

        refiner.scheduler = scheduler_from_name(args.scheduler, refiner.scheduler.config)
    refiner.set_progress_bar_config(disable=args.quiet or args.json)
    return refiner.to(device)


def run_sdxl(args: argparse.Namespace, say, seeds: list[int]) -> dict[str, Any]:
    """Text-to-image with SDXL; with --refiner, the base denoises until --refiner-start and the refiner
    finishes from its latents."""
    from stablepipe.pipelines.sdxl import StableDiffusionXLPipeline

    base = load_pipeline_from_flags(StableDiffusionXLPipeline, args, say)
    kwargs = generation_kwargs(args, seeds)
    if not args.refiner:
        result = base(args.prompt, **kwargs)
        return write_images(result.images, args, seeds, base)
    refiner = load_refiner(args, base)
    say(f"Base model until {args.refiner_start:.0%} of the steps, then the refiner {args.refiner}.")
    latents = base(args.prompt, denoising_end=args.refiner_start, output_type="latent", **kwargs).images
    finish = {k: v for k, v in kwargs.items() if k not in ("width", "height")}  # the size comes from the latents
    result = refiner(args.prompt, image=latents, denoising_start=args.refiner_start, **finish)
    return write_images(result.images, args, seeds, base,
                        extra={"refiner": str(args.refiner), "refiner_start": args.refiner_start})
