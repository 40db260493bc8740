"""What each tab runs: the form's values -> a pipeline built by the ModelManager -> images.

One function per task, `run_<task>(manager, values, generators) -> Output`. The values are a dict of the
form's fields (see `ui/controls.py` for the shared names: prompt, negative_prompt, scheduler, steps,
guidance, width, height, seed, batch). No gradio here: these are plain functions, testable on their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import PIL.Image

import stablepipe
from stablepipe.ui.session import ModelManager

SAFE_LEVELS = ("WEAK", "MEDIUM", "STRONG", "MAX")


@dataclasses.dataclass
class Output:
    """The images of one run, and the settings worth saving with them besides the shared ones."""

    images: list[PIL.Image.Image]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str | None = None  # what was loaded in the slot the task used
    depth: list[PIL.Image.Image] | None = None  # LDM3D: one depth map per image
    extras: dict[str, PIL.Image.Image] = dataclasses.field(default_factory=dict)  # saved once: e.g. the mask
    flags: list[bool] | None = None  # the safety checker's verdict per image (flagged ones come back black)
    slot: str | None = None  # the slot of the model (its files give the PNGs' Model hash)
    pipe: Any = None  # the pipeline that ran: its scheduler's A1111 name goes in the PNGs


def from_result(result, pipe, manager: ModelManager, slot: str, settings: dict[str, Any] | None = None,
                **fields: Any) -> Output:
    """An Output from a pipeline's output: its images (LDM3D's `rgb` and `depth`) and safety flags."""
    images = result.rgb if hasattr(result, "rgb") else result.images
    flags = getattr(result, "nsfw_content_detected", None)
    return Output(images, settings or {}, model=manager.sources[slot], flags=flags, slot=slot, pipe=pipe, **fields)


# ---- the form's values -> pipeline arguments ---------------------------------------------------------------


def text_kwargs(values: dict[str, Any], generators: list) -> dict[str, Any]:
    """Prompt, negative prompt, steps, guidance, one image per generator."""
    kwargs = {
        "prompt": values.get("prompt") or "", "negative_prompt": values.get("negative_prompt") or None,
        "num_inference_steps": whole_number(values["steps"], "Steps"), "guidance_scale": float(values["guidance"]),
        "generator": generators, "num_images_per_prompt": len(generators),
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def whole_number(value: Any, label: str) -> int:
    """A slider's value as an int; a ValueError for 2.5 or text rather than a silent rounding."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{label} must be a whole number, got {value!r}")
    return int(value)


def sampling(values: dict[str, Any]) -> dict[str, Any]:
    """How the tab's pipeline is built: the sampler by name, and AUTOMATIC1111's prompt syntax when ticked."""
    return {"scheduler": values.get("scheduler"), "prompt_weighting": bool(values.get("prompt_weighting"))}


def size_kwargs(values: dict[str, Any]) -> dict[str, int]:
    return {"width": whole_number(values["width"], "Width"), "height": whole_number(values["height"], "Height")}


def need_image(image: PIL.Image.Image | None, what: str = "a picture") -> PIL.Image.Image:
    """The input picture as RGB, resized down to multiples of 8 (what the VAE takes); an error if missing."""
    if image is None:
        raise ValueError(f"Upload {what} first.")
    image = image.convert("RGB")
    width, height = image.width - image.width % 8, image.height - image.height % 8
    if min(width, height) < 8:
        raise ValueError(f"the picture is {image.width}x{image.height}; it must be at least 8x8 pixels")
    if (width, height) == image.size:
        return image
    return image.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)


def mask_from_editor(editor: dict[str, Any] | None) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The picture and the painted mask (white = repaint) from an image editor's value
    (`background`, `layers`): every stroke on any layer is part of the mask."""
    image = need_image((editor or {}).get("background"), "a picture to inpaint")
    painted = np.zeros((image.height, image.width), dtype=bool)  # (H, W)
    for layer in (editor or {}).get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA").resize(image.size, PIL.Image.Resampling.NEAREST))[..., 3]
        painted |= alpha > 0
    if not painted.any():
        raise ValueError("Paint over the area to repaint first (the brush draws the mask).")
    return image, PIL.Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


# ---- one function per task ---------------------------------------------------------------------------------


def run_txt2img(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    """Text-to-image; with `safe` on, Safe Latent Diffusion at the chosen level."""
    kwargs = {**text_kwargs(values, generators), **size_kwargs(values)}
    if not values.get("safe"):
        pipe = manager.pipeline(stablepipe.StableDiffusionPipeline, "sd", **sampling(values))
        return from_result(pipe(**kwargs), pipe, manager, "sd")
    level = str(values.get("safe_level") or "MEDIUM").upper()
    pipe = manager.pipeline(stablepipe.StableDiffusionPipelineSafe, "sd", **sampling(values))
    result = pipe(**kwargs, **stablepipe.SafetyConfig.preset(level))
    return from_result(result, pipe, manager, "sd", {"safe": level})


def run_img2img(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    image = need_image(values.get("image"))
    pipe = manager.pipeline(stablepipe.StableDiffusionImg2ImgPipeline, "sd", **sampling(values))
    strength = float(values["strength"])
    result = pipe(image=image, strength=strength, **text_kwargs(values, generators))
    return from_result(result, pipe, manager, "sd", {"strength": strength})


def run_inpaint(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    """Inpainting with the inpainting model when one is loaded, else with the text model."""
    image, mask = mask_from_editor(values.get("editor"))
    slot = "inpaint" if manager.loaded("inpaint") is not None else "sd"
    pipe = manager.pipeline(stablepipe.StableDiffusionInpaintPipeline, slot, **sampling(values))
    strength = float(values["strength"])
    result = pipe(image=image, mask_image=mask, width=image.width, height=image.height, strength=strength,
                  **text_kwargs(values, generators))
    coverage = f"{np.asarray(mask).mean() / 2.55:.1f}% of the picture"
    settings = {"strength": strength, "mask": coverage}
    return from_result(result, pipe, manager, slot, settings, extras={"mask": mask})


def run_depth2img(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    image = need_image(values.get("image"))
    pipe = manager.pipeline(stablepipe.StableDiffusionDepth2ImgPipeline, "depth", **sampling(values))
    depth = values.get("depth_map")
    strength = float(values["strength"])
    result = pipe(image=image, depth_map=depth, strength=strength, **text_kwargs(values, generators))
    return from_result(result, pipe, manager, "depth", {"strength": strength, "depth_map": depth is not None})


def run_variation(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    image = need_image(values.get("image"))
    cls = stablepipe.StableDiffusionImageVariationPipeline
    pipe = manager.pipeline(cls, "variation", **sampling(values))
    kwargs = {k: v for k, v in text_kwargs(values, generators).items() if k not in ("prompt", "negative_prompt")}
    return from_result(pipe(image, **kwargs, **size_kwargs(values)), pipe, manager, "variation")


def run_upscale(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    """x4 (noise-level conditioned) or x2 latent upscaling of the input picture, one result per seed."""
    image = need_image(values.get("image"))
    kwargs = text_kwargs(values, generators)
    if values.get("upscaler") == "x2":
        cls = stablepipe.StableDiffusionLatentUpscalePipeline
        pipe = manager.pipeline(cls, "x2", **sampling(values))
        kwargs.pop("num_images_per_prompt")
        images = [pipe(image=image, **{**kwargs, "generator": g}).images[0] for g in generators]
        return Output(images, {"upscaler": "x2 latent"}, model=manager.sources["x2"], slot="x2", pipe=pipe)
    pipe = manager.pipeline(stablepipe.StableDiffusionUpscalePipeline, "x4", **sampling(values))
    noise_level = int(values["noise_level"])
    result = pipe(image=image, noise_level=noise_level, **kwargs)
    return from_result(result, pipe, manager, "x4", {"upscaler": "x4", "noise_level": noise_level})


def run_sdxl(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    """SDXL base; with the refiner on, the base denoises the first `high_noise_frac` of the steps and the
    refiner the rest (diffusers' "ensemble of expert denoisers")."""
    kwargs = {**text_kwargs(values, generators), **size_kwargs(values)}
    base = manager.pipeline(stablepipe.StableDiffusionXLPipeline, "sdxl", **sampling(values))
    if not values.get("refiner"):
        return Output(base(**kwargs).images, model=manager.sources["sdxl"], slot="sdxl", pipe=base)
    refiner = manager.pipeline(stablepipe.StableDiffusionXLImg2ImgPipeline, "refiner",
                               **sampling(values))
    split = float(values["high_noise_frac"])
    latents = base(**kwargs, denoising_end=split, output_type="latent").images
    kwargs = {k: v for k, v in kwargs.items() if k not in ("width", "height")}
    images = refiner(**kwargs, image=latents, denoising_start=split).images  # latents (B, 4, h, w)
    settings = {"refiner": manager.sources["refiner"], "high_noise_frac": split}
    return Output(images, settings, model=manager.sources["sdxl"], slot="sdxl", pipe=base)


def run_ldm3d(manager: ModelManager, values: dict[str, Any], generators: list) -> Output:
    """An RGB image and its depth map from one prompt."""
    pipe = manager.pipeline(stablepipe.StableDiffusionLDM3DPipeline, "ldm3d", **sampling(values))
    result = pipe(**text_kwargs(values, generators), **size_kwargs(values))
    return from_result(result, pipe, manager, "ldm3d", depth=result.depth)


TASKS = {
    "txt2img": run_txt2img, "img2img": run_img2img, "inpaint": run_inpaint, "depth2img": run_depth2img,
    "variation": run_variation, "upscale": run_upscale, "sdxl": run_sdxl, "ldm3d": run_ldm3d,
}
