"""Every pipeline's call arguments checked before any work is done, written once for all thirteen pipelines.

`@checked_call` on a pipeline's `__call__` binds the arguments and checks each one it knows by name:
numbers are finite and in range (a NaN guidance scale must not quietly mean "guidance off"), step and image
counts are positive and bounded (10**9 steps must not allocate 7 GiB first), sizes fit, tensors hold no NaN
or inf, images are in the value range they are read in, and a generator is a generator. Each error says what
was wrong and how to fix it; where diffusers accepts what we refuse, it says why.

What can only go wrong while running (float16 overflowing in the UNet or the VAE) is caught after the loop and
after decoding: `check_finite_result` raises `NonFiniteResultError` instead of returning a black picture.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

MAX_SIDE = 16384  # pixels; 16 times SDXL's training size per side: beyond what one pass of any SD model can draw
MAX_PIXELS = 2**30  # images x height x width in one call (64 images of 4096 x 4096)


class NonFiniteResultError(FloatingPointError):
    """The denoising loop or the VAE produced NaN or infinite values: the picture would come out black."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """A real argument's closed range (None: open on that side) and what to try instead."""

    low: float | None = None
    high: float | None = None
    hint: str = ""


REAL_ARGUMENTS = {
    "guidance_scale": Bound(hint="e.g. 7.5; 1 or less turns classifier-free guidance off"),
    "guidance_rescale": Bound(0, 1, "a fraction: 0 is off, 0.7 is Lin et al.'s choice; above 1 it extrapolates"),
    "eta": Bound(0, 1, "0 is deterministic DDIM, 1 is DDPM's noise; above 1 the step takes a root of a negative"),
    "aesthetic_score": Bound(hint="e.g. 6.0"),
    "negative_aesthetic_score": Bound(hint="e.g. 2.5"),
    "noise_level": Bound(hint="e.g. 20"),
    "sld_guidance_scale": Bound(hint="e.g. 1000"),
    "sld_threshold": Bound(hint="e.g. 0.01"),
    "sld_momentum_scale": Bound(hint="e.g. 0.3"),
    "sld_mom_beta": Bound(hint="e.g. 0.4"),
}
TENSOR_ARGUMENTS = ("latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                    "negative_pooled_prompt_embeds", "masked_image_latents")
PICTURE_ARGUMENTS = ("image", "rgb")  # colour pictures: [0, 1] (or [-1, 1]) floats, or 8/16-bit integers
DEPTH_ARGUMENTS = ("depth", "depth_map")  # any finite scale


def checked_call(call: Callable) -> Callable:
    """Decorate a pipeline's `__call__`: its arguments (defaults included) pass `check_arguments` first."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        named = {k: v for k, v in bound.arguments.items()
                 if signature.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD}
        check_arguments(self, named)
        return call(self, *args, **kwargs)

    return wrapper


def check_arguments(pipe, arguments: Mapping[str, Any]) -> None:
    """Check every argument this module knows by name (the others are the pipeline's own business)."""
    for name, bound in REAL_ARGUMENTS.items():
        if name in arguments:
            check_real(name, arguments[name], bound)
    check_counts(pipe, arguments)
    check_sizes(arguments)
    if arguments.get("clip_skip") is not None:
        check_clip_skip(pipe, arguments["clip_skip"])
    check_generator(arguments.get("generator"))
    for name in TENSOR_ARGUMENTS:
        if arguments.get(name) is not None:
            check_tensor(name, arguments[name])
    for name in (*PICTURE_ARGUMENTS, *DEPTH_ARGUMENTS, "mask_image"):
        if arguments.get(name) is not None:
            check_image(name, arguments[name], latent_channels=latent_channels(pipe),
                        tensor_range=not getattr(pipe, "image_tensors_are_clip_pixels", False))
    check_cross_attention_kwargs(arguments.get("cross_attention_kwargs"))


# ---- numbers ---------------------------------------------------------------------------------------------


def check_real(name: str, value: Any, bound: Bound) -> None:
    """A finite real number (not a bool) within `bound`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}; {bound.hint}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}; {bound.hint}")
    too_low = bound.low is not None and value < bound.low
    too_high = bound.high is not None and value > bound.high
    if too_low or too_high:
        span = f"[{bound.low}, {bound.high}]" if bound.high is not None else f">= {bound.low}"
        raise ValueError(f"{name} must be in {span}, got {value!r}; {bound.hint}")


def check_count(name: str, value: Any, *, hint: str) -> None:
    """A positive integer (not a bool, not a float such as 2.5)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; {hint}")


def check_counts(pipe, arguments: Mapping[str, Any]) -> None:
    """num_inference_steps (unless custom timesteps or sigmas are given) and num_images_per_prompt."""
    custom = arguments.get("timesteps") is not None or arguments.get("sigmas") is not None
    if "num_inference_steps" in arguments and not custom:
        steps = arguments["num_inference_steps"]
        check_count("num_inference_steps", steps, hint="e.g. 30")
        check_steps_fit_schedule(pipe, steps)
    if "num_images_per_prompt" in arguments:
        check_count("num_images_per_prompt", arguments["num_images_per_prompt"], hint="e.g. 1 or 4")


def check_steps_fit_schedule(pipe, steps: int) -> None:
    """No more steps than the schedule's training timesteps (diffusers lets the σ samplers try: they allocate
    the whole schedule first and repeat timesteps, so more steps cost time and memory and draw nothing new)."""
    scheduler = getattr(pipe, "scheduler", None)
    total = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if isinstance(total, int) and steps > total:
        raise ValueError(
            f"num_inference_steps={steps} exceeds the {total} timesteps {type(scheduler).__name__} was trained on; "
            f"use at most {total} (20 to 50 is usual). diffusers lets some samplers try, but the steps beyond "
            f"{total} only repeat timesteps"
        )


# ---- sizes ----------------------------------------------------------------------------------------------


def check_sizes(arguments: Mapping[str, Any]) -> None:
    """height and width: None (the model's default) or a positive integer up to MAX_SIDE; and not more than
    MAX_PIXELS in all the images of one call."""
    for name in ("height", "width"):
        value = arguments.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(
                f"{name} must be a positive integer number of pixels (a multiple of 8), got {value!r}; "
                "leave it unset (None) for the model's default size"
            )
        if value > MAX_SIDE:
            raise ValueError(
                f"{name}={value} is larger than {MAX_SIDE} pixels, more than one pass of any Stable Diffusion model "
                "can draw (its latents and attention would not fit in memory); draw smaller and upscale"
            )
    height, width = arguments.get("height"), arguments.get("width")
    if height is None or width is None:
        return
    images = prompt_count(arguments) * arguments.get("num_images_per_prompt", 1)
    if images * height * width > MAX_PIXELS:
        raise ValueError(
            f"{images} images of {width}x{height} pixels are {images * height * width:,} pixels in one call, more "
            f"than {MAX_PIXELS:,}; make fewer images per call or smaller ones"
        )


def prompt_count(arguments: Mapping[str, Any]) -> int:
    """How many prompts the call holds (1 where that is not known yet; prompt checks come later)."""
    prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
    if isinstance(prompt, list):
        return max(len(prompt), 1)
    if isinstance(embeds, torch.Tensor) and embeds.ndim >= 1:
        return max(embeds.shape[0], 1)
    return 1


# ---- text encoders ----------------------------------------------------------------------------------------


def check_clip_skip(pipe, clip_skip: Any) -> None:
    """0 <= clip_skip and at least one text-encoder layer left (diffusers counts from the last layer:
    clip_skip=1 is the penultimate, AUTOMATIC1111's "Clip skip: 2")."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral) or clip_skip < 0:
        raise ValueError(
            f"clip_skip must be an integer >= 0 (layers skipped from the end; 1 is the penultimate layer), "
            f"got {clip_skip!r}"
        )
    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e]
    layers = [getattr(e.config, "num_hidden_layers", None) for e in encoders]
    layers = [n for n in layers if isinstance(n, int)]
    if not layers:
        return
    most = min(layers) - (2 if hasattr(pipe, "text_encoder_2") else 1)  # SDXL already starts at the penultimate
    if clip_skip > most:
        raise ValueError(
            f"clip_skip={clip_skip} skips every layer of the text encoder ({min(layers)} layers); use 0 to {most}"
        )


# ---- generators and tensors ---------------------------------------------------------------------------------


def check_generator(generator: Any) -> None:
    """None, a torch.Generator, or a list of them (one per image)."""
    items = generator if isinstance(generator, list | tuple) else [generator]
    if generator is None or (items and all(isinstance(g, torch.Generator) for g in items)):
        return
    raise TypeError(
        f"generator must be a torch.Generator or a list of them, got {type(generator).__name__} {generator!r:.60}; "
        "for a seed pass generator=torch.Generator().manual_seed(seed)"
    )


def check_tensor(name: str, value: Any) -> None:
    """A tensor without NaN or infinite values."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"{name} holds NaN or infinite values ({count_not_finite(value)} of {value.numel()}); "
            "they would make the whole picture NaN (black). Check how it was made"
        )


def count_not_finite(value: torch.Tensor | np.ndarray) -> int:
    finite = torch.isfinite(value) if isinstance(value, torch.Tensor) else np.isfinite(value)
    return int((~finite).sum())


def latent_channels(pipe) -> int | None:
    vae = getattr(pipe, "vae", None)
    return getattr(getattr(vae, "config", None), "latent_channels", None)


# ---- images ------------------------------------------------------------------------------------------------


def check_image(name: str, image: Any, *, latent_channels: int | None, tensor_range: bool = True) -> None:
    """Arrays and tensors in an image argument: finite; a colour picture is not a bare 2-D tensor and its float
    values are in [0, 1] (or [-1, 1]), not 0..255 (for tensors unless `tensor_range` is off: the image-variation
    pipeline reads tensors as CLIP-normalized pixel values); a float mask is in [0, 1]. PIL images pass."""
    for item in image if isinstance(image, list | tuple) else [image]:
        if not isinstance(item, np.ndarray | torch.Tensor):
            continue
        floating = item.dtype.kind == "f" if isinstance(item, np.ndarray) else item.is_floating_point()
        if floating and count_not_finite(item):
            raise ValueError(f"{name} holds {count_not_finite(item)} NaN or infinite values; give finite pixel values")
        if name in PICTURE_ARGUMENTS and (tensor_range or isinstance(item, np.ndarray)):
            check_picture(name, item, floating, latent_channels=latent_channels)
        elif name == "mask_image" and floating:
            check_mask_range(item)


def check_picture(name: str, item: np.ndarray | torch.Tensor, floating: bool, *, latent_channels: int | None) -> None:
    if isinstance(item, torch.Tensor) and item.ndim == 2:
        raise ValueError(
            f"{name} is a 2-D tensor {tuple(item.shape)}: a tensor picture is (C, H, W) or (B, C, H, W); "
            "for a gray picture use image[None] (1, H, W)"
        )
    if isinstance(item, torch.Tensor) and item.ndim >= 3 and item.shape[-3] == latent_channels:
        return  # latents (the refiner continuing the base's): any finite values
    if floating and item.size and float(item.max()) > 1.5:
        raise ValueError(
            f"{name} is a float {type(item).__name__} with values up to {float(item.max()):g}: float pixels are read "
            "in [0, 1] (or [-1, 1]); divide by 255, or pass uint8 pixels"
        )


def check_mask_range(mask: np.ndarray | torch.Tensor) -> None:
    low, high = float(mask.min()), float(mask.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"mask_image has float values in [{low:g}, {high:g}]; a float mask is in [0, 1] (1 repaints, 0 keeps): "
            "divide 0..255 masks by 255, or pass uint8 pixels"
        )


def check_cross_attention_kwargs(kwargs: Any) -> None:
    """cross_attention_kwargs is a dict; its LoRA `scale`, if any, is a finite number."""
    if kwargs is None:
        return
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"cross_attention_kwargs must be a dict, e.g. {{'scale': 0.8}}, got {type(kwargs).__name__}")
    if "scale" in kwargs:
        check_real("cross_attention_kwargs['scale']", kwargs["scale"], Bound(hint="the LoRA scale, e.g. 0.8"))


# ---- results -------------------------------------------------------------------------------------------------


def check_finite_result(values: torch.Tensor, *, stage: str, advice: str) -> None:
    """Raise NonFiniteResultError naming the images (along dim 0) that came out of `stage` with NaN or inf."""
    finite = torch.isfinite(values).flatten(1).all(dim=1)  # (B,)
    if bool(finite.all()):
        return
    bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
    raise NonFiniteResultError(
        f"{stage} produced NaN or infinite values for image(s) {bad}: the picture would be black. {advice}"
    )


def precision_advice(dtype: torch.dtype, where: str, otherwise: str) -> str:
    """What to do about a non-finite result: a wider dtype when float16 ran `where`, else `otherwise`."""
    if dtype == torch.float16:
        return f"float16 overflowed in {where}: use torch_dtype=torch.bfloat16 or torch.float32"
    return otherwise
