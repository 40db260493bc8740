"""A1111 requests -> `ImageRequest`s (one per image), checked field by field; their `info` and infotexts.

A1111's rules kept here: `seed: -1` is a random seed; `batch_size * n_iter` images get seeds seed, seed+1, ...;
`sampler_name` falls back to `sampler_index`; `CLIP_stop_at_last_layers` (an option, or in
`override_settings`) is the clip skip; the hires fix draws the first pass, upscales it and repaints it at
`denoising_strength`. A field that would change the picture and that stablepipe cannot honour is a 422.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any

import PIL.Image
from pydantic import ValidationError

from stablepipe.batching import ImageRequest, infotext_params
from stablepipe.infotext import format_infotext
from stablepipe.schedulers.names import A1111_SCHEDULERS, join_a1111_name, lookup_scheduler_name
from stablepipe.serve import images as pictures
from stablepipe.serve.config import ServeConfig
from stablepipe.serve.errors import Unsupported
from stablepipe.serve.manager import LoadedModel, ModelManager
from stablepipe.serve.schemas import GenerationRequest, Img2ImgRequest, Options, Txt2ImgRequest

EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet|embedding):", re.IGNORECASE)
HIRES_UPSCALERS = {"Lanczos": PIL.Image.Resampling.LANCZOS, "Nearest": PIL.Image.Resampling.NEAREST}
SAME = (None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler")


@dataclasses.dataclass
class Context:
    """What a request is read against: the server's config, its models and its current options."""

    config: ServeConfig
    manager: ModelManager
    options: dict[str, Any]


@dataclasses.dataclass
class Plan:
    """The images one request draws, and what its response says about them."""

    requests: list[ImageRequest]  # the first (or only) pass, one per image
    model: LoadedModel
    sampler_name: str  # as the client named it
    extra_params: dict[str, Any]  # infotext settings beyond `infotext_params` (hires, mask blur, ...)
    hires: dict[str, Any] | None = None  # the second pass's settings (txt2img with enable_hr)
    overlay: tuple[list[PIL.Image.Image], list[PIL.Image.Image]] | None = None  # inpaint: originals, masks
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the server's, with override_settings

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.requests]


# ---- checks -------------------------------------------------------------------------------------------------


def refuse_unless(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise Unsupported(field, message)


def check_honoured(req: GenerationRequest) -> None:
    """422 for every field set to something that would change the picture and that stablepipe does not do."""
    refuse_unless(not req.styles, "styles", "prompt styles are not stored here; put their text in the prompt")
    refuse_unless(req.subseed_strength == 0, "subseed_strength", "variation seeds are not supported; use 0")
    for field in ("seed_resize_from_h", "seed_resize_from_w"):
        refuse_unless(getattr(req, field) <= 0, field, "seed resizing is not supported; use -1 or 0")
    refuse_unless(not req.restore_faces, "restore_faces", "face restoration is not supported; use false")
    refuse_unless(not req.tiling, "tiling", "tiling is not supported; use false")
    refuse_unless(req.s_churn in (None, 0), "s_churn", "churn is not supported; use 0")
    refuse_unless(req.s_noise in (None, 1), "s_noise", "only the default noise scale 1 is supported")
    refuse_unless(req.s_min_uncond in (None, 0), "s_min_uncond", "negative guidance minimum sigma is not supported")
    refuse_unless(req.refiner_checkpoint in (None, "", "None"), "refiner_checkpoint", "the refiner is not supported "
                  "in the API; leave it empty")
    refuse_unless(not req.script_name, "script_name", "scripts are not supported; leave it empty")
    refuse_unless(not req.alwayson_scripts, "alwayson_scripts", "extensions (ControlNet, ADetailer ...) are not "
                  "supported; send {}")
    refuse_unless(not req.infotext, "infotext", "reading settings from an infotext is not supported; send the "
                  "fields (POST /sdapi/v1/png-info parses one)")
    for field in ("prompt", "negative_prompt"):
        refuse_unless(not EXTRA_NETWORK.search(getattr(req, field) or ""), field,
                      "extra networks (<lora:...>, <hypernet:...>) are not supported; load LoRAs in Python")


def check_limits(config: ServeConfig, *, width: int, height: int, steps: int, images: int, prefix: str = "") -> None:
    """--max-pixels, --max-steps and --max-batch, as 422s naming the field."""
    if config.max_pixels is not None and width * height > config.max_pixels:
        raise Unsupported(prefix + "width", f"{width}x{height} is {width * height} pixels; this server draws at most "
                                            f"{config.max_pixels} (--max-pixels)")
    if config.max_steps is not None and steps > config.max_steps:
        raise Unsupported(prefix + "steps", f"{steps} steps; this server runs at most {config.max_steps} "
                                            "(--max-steps)")
    if images > config.max_batch:
        raise Unsupported("batch_size", f"batch_size x n_iter is {images} images; this server draws at most "
                                        f"{config.max_batch} per request (--max-batch)")


def read_overrides(req: GenerationRequest, ctx: Context) -> dict[str, Any]:
    """The options this request runs with: the server's, with `override_settings` on top (only the options
    stablepipe has; others are a 422 naming them)."""
    overrides = req.override_settings or {}
    try:
        Options(**overrides)
    except ValidationError as err:
        first = err.errors()[0]
        raise Unsupported("override_settings." + ".".join(str(p) for p in first["loc"]), first["msg"]) from None
    merged = {**ctx.options, **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("sd_checkpoint_hash") not in (None, ctx.options.get("sd_checkpoint_hash")):
        raise Unsupported("override_settings.sd_checkpoint_hash", "choose the model with sd_model_checkpoint")
    return merged


def find_model(name: str, ctx: Context, field: str) -> LoadedModel:
    try:
        return ctx.manager.find(name)
    except ValueError as err:
        raise Unsupported(field, str(err)) from None


# ---- samplers -----------------------------------------------------------------------------------------------


def resolve_sampler(sampler: str | None, schedule: str | None, *, field: str = "sampler_name",
                    schedule_field: str = "scheduler") -> str:
    """A1111's (sampler_name, scheduler) -> one name `scheduler_from_name` takes, or a 422 naming the field."""
    try:
        lookup_scheduler_name(sampler or "")
    except ValueError:
        known = ", ".join(A1111_SCHEDULERS)
        raise Unsupported(field, f"unknown sampler {sampler!r}; known: {known}") from None
    try:
        return join_a1111_name(sampler, schedule)
    except ValueError as err:
        raise Unsupported(schedule_field, str(err)) from None


def stochastic(name: str) -> bool:
    """Samplers that add fresh noise every step (ancestral, SDE, DDPM): A1111 runs them at eta 1."""
    cls, options = lookup_scheduler_name(name)
    noisy = ("Ancestral", "SDE", "DDPM", "LCM")
    return any(word in cls.__name__ for word in noisy) or "sde" in str(options.get("algorithm_type", ""))


def sampler_eta(name: str, req: GenerationRequest, options: dict[str, Any]) -> float:
    """DDIM's eta (the request's, else the eta_ddim option); other samplers take none (0)."""
    if lookup_scheduler_name(name)[0].__name__ == "DDIMScheduler":
        return float(req.eta if req.eta is not None else options.get("eta_ddim", 0.0))
    if stochastic(name):
        refuse_unless(req.eta in (None, 1), "eta", f"{name} draws its noise at eta 1 here; send 1 or null")
    return 0.0


# ---- seeds and prompts -------------------------------------------------------------------------------------


def resolve_seed(seed: int) -> int:
    """A1111's -1: a random seed below 2**32 - 2."""
    return random.randrange(4294967294) if seed == -1 else seed


def image_requests(req: GenerationRequest, ctx: Context, model: LoadedModel, task: str, *, sampler: str,
                   options: dict[str, Any], **fields: Any) -> list[ImageRequest]:
    """One ImageRequest per image, seeds seed, seed+1, ... as A1111 numbers them."""
    count = req.batch_size * req.n_iter
    first = resolve_seed(req.seed)
    clip = int(options.get("CLIP_stop_at_last_layers") or 1)
    shared = dict(
        negative_prompt=req.negative_prompt or "", width=req.width, height=req.height, steps=req.steps,
        sampler=sampler, guidance=float(req.cfg_scale), clip_skip=clip - 1 if clip > 1 else None,
        eta=sampler_eta(sampler, req, options), prompt_weighting=ctx.config.prompt_weighting, model=model.name,
    )
    try:
        return [ImageRequest(task, req.prompt, seed=first + i, **shared,
                             **{k: (v[i] if isinstance(v, list) else v) for k, v in fields.items()})
                for i in range(count)]
    except ValueError as err:  # every field was checked before: this is a rule batching.py adds
        raise Unsupported("request", str(err)) from None


# ---- txt2img ------------------------------------------------------------------------------------------------


def txt2img_plan(req: Txt2ImgRequest, ctx: Context) -> Plan:
    check_honoured(req)
    options = read_overrides(req, ctx)
    model = find_model(options["sd_model_checkpoint"], ctx, "override_settings.sd_model_checkpoint")
    refuse_unless("txt2img" in model.pipelines, "override_settings.sd_model_checkpoint",
                  f"model {model.name!r} is an inpainting model; it draws with img2img and a mask only")
    refuse_unless(not req.firstpass_image, "firstpass_image", "a given first pass is not supported")
    sampler_name = req.sampler_name or req.sampler_index
    sampler = resolve_sampler(sampler_name, req.scheduler)
    check_limits(ctx.config, width=req.width, height=req.height, steps=req.steps, images=req.batch_size * req.n_iter)
    requests = image_requests(req, ctx, model, "txt2img", sampler=sampler, options=options)
    plan = Plan(requests, model, sampler_name, {}, options=options)
    if req.enable_hr:
        plan.hires = hires_settings(req, ctx, sampler)
        plan.extra_params = hires_infotext(req, plan.hires)
    return plan


def hires_settings(req: Txt2ImgRequest, ctx: Context, sampler: str) -> dict[str, Any]:
    """The hires fix's second pass: its size, upscaler, steps, sampler and prompts."""
    refuse_unless(not (req.firstphase_width or req.firstphase_height), "firstphase_width",
                  "the old hires fix (firstphase_width / height) is not supported; use hr_scale or hr_resize_x/y")
    upscaler = req.hr_upscaler or "Lanczos"
    refuse_unless(upscaler in HIRES_UPSCALERS, "hr_upscaler", f"{upscaler!r} is not available here; use one of "
                  f"{', '.join(HIRES_UPSCALERS)} (latent upscaling is not supported)")
    refuse_unless(req.hr_checkpoint_name in SAME, "hr_checkpoint_name", "the second pass uses the same model here")
    width, height = hires_size(req)
    steps = req.hr_second_pass_steps or req.steps
    check_limits(ctx.config, width=width, height=height, steps=steps, images=req.batch_size * req.n_iter,
                 prefix="hr_")
    second = resolve_sampler(req.hr_sampler_name or (req.sampler_name or req.sampler_index),
                             None if req.hr_scheduler in SAME else req.hr_scheduler,
                             field="hr_sampler_name", schedule_field="hr_scheduler")
    if req.hr_sampler_name in SAME and req.hr_scheduler in SAME:
        second = sampler
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    return dict(width=width, height=height, steps=steps, sampler=second, upscaler=upscaler, strength=strength,
                prompt=req.hr_prompt or None, negative_prompt=req.hr_negative_prompt or None)


def hires_size(req: Txt2ImgRequest) -> tuple[int, int]:
    """The second pass's size (multiples of 8): hr_resize_x / y (one of them keeps the aspect), else hr_scale."""
    if req.hr_resize_x or req.hr_resize_y:
        width = req.hr_resize_x or req.hr_resize_y * req.width // req.height
        height = req.hr_resize_y or req.hr_resize_x * req.height // req.width
    else:
        width, height = int(req.width * req.hr_scale), int(req.height * req.hr_scale)
    width, height = width // 8 * 8, height // 8 * 8
    refuse_unless(width >= 8 and height >= 8, "hr_scale", f"the upscaled size {width}x{height} is too small")
    return width, height


def hires_infotext(req: Txt2ImgRequest, hires: dict[str, Any]) -> dict[str, Any]:
    scale = None if req.hr_resize_x or req.hr_resize_y else req.hr_scale
    return {"Denoising strength": hires["strength"], "Hires upscale": scale,
            "Hires resize": None if scale else f"{hires['width']}x{hires['height']}",
            "Hires steps": req.hr_second_pass_steps or None, "Hires upscaler": hires["upscaler"]}


def hires_requests(plan: Plan, first_pass: list[PIL.Image.Image]) -> list[ImageRequest]:
    """The second pass of the hires fix: each first-pass image upscaled, then repainted with its own seed."""
    hires = plan.hires
    resample = HIRES_UPSCALERS[hires["upscaler"]]
    requests = []
    for request, image in zip(plan.requests, first_pass):
        upscaled = image.resize((hires["width"], hires["height"]), resample)
        requests.append(dataclasses.replace(
            request, task="img2img", image=upscaled, width=hires["width"], height=hires["height"],
            steps=hires["steps"], sampler=hires["sampler"], strength=hires["strength"],
            prompt=hires["prompt"] or request.prompt,
            negative_prompt=hires["negative_prompt"] or request.negative_prompt,
        ))
    return requests


# ---- img2img and inpainting -----------------------------------------------------------------------------------


def img2img_plan(req: Img2ImgRequest, ctx: Context) -> Plan:
    check_honoured(req)
    options = read_overrides(req, ctx)
    model = find_model(options["sd_model_checkpoint"], ctx, "override_settings.sd_model_checkpoint")
    check_img2img_fields(req)
    sampler_name = req.sampler_name or req.sampler_index
    sampler = resolve_sampler(sampler_name, req.scheduler)
    count = req.batch_size * req.n_iter
    check_limits(ctx.config, width=req.width, height=req.height, steps=req.steps, images=count)
    limit = 16 * (ctx.config.max_pixels or 4096 * 4096)
    inits = [pictures.decode_image(text, f"init_images.{i}", max_pixels=limit)
             for i, text in enumerate(req.init_images)]
    inits = [pictures.resize_for(image.convert("RGB"), req.width, req.height, req.resize_mode) for image in inits]
    per_image = [inits[i % len(inits)] for i in range(count)]  # A1111 repeats the init images over the batch
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    if req.mask is None:
        requests = image_requests(req, ctx, model, "img2img", sampler=sampler, options=options, image=per_image,
                                  strength=strength)
        refuse_unless("img2img" in model.pipelines, "override_settings.sd_model_checkpoint",
                      f"model {model.name!r} is an inpainting model; send a mask")
        return Plan(requests, model, sampler_name, {"Resize mode": resize_mode_name(req)}, options=options)
    return inpaint_plan(req, ctx, model, sampler, options, per_image, limit)


def resize_mode_name(req: Img2ImgRequest) -> str | None:
    return None if req.resize_mode == 0 else pictures.RESIZE_MODES[req.resize_mode]


def check_img2img_fields(req: Img2ImgRequest) -> None:
    refuse_unless(bool(req.init_images), "init_images", "give at least one base64 image")
    refuse_unless(req.resize_mode in pictures.RESIZE_MODES, "resize_mode", "3 (latent upscale) is not supported; "
                  "use 0 just resize, 1 crop and resize or 2 resize and fill")
    refuse_unless(req.initial_noise_multiplier in (None, 1), "initial_noise_multiplier", "only 1 is supported")
    refuse_unless(req.latent_mask is None, "latent_mask", "a separate latent mask is not supported")
    refuse_unless(req.inpainting_fill in (0, 1), "inpainting_fill", "0 (fill) and 1 (original) are supported; "
                  "latent noise (2) and latent nothing (3) are not")


def inpaint_plan(req: Img2ImgRequest, ctx: Context, model: LoadedModel, sampler: str, options: dict[str, Any],
                 inits: list[PIL.Image.Image], limit: int) -> Plan:
    """img2img with a mask: blurred, inverted and "fill"ed as A1111 does, the masked area only (cropped and
    scaled up, `inpaint_full_res`) or the whole picture; the unmasked pixels are pasted back."""
    blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    mask_image = pictures.decode_image(req.mask, "mask", max_pixels=limit)
    mask = pictures.prepare_mask(mask_image, req.width, req.height, resize_mode=req.resize_mode,
                                 invert=bool(req.inpainting_mask_invert), blur=blur, binary=req.mask_round)
    refuse_unless(mask.getextrema()[1] > 0, "mask", "the mask is all black: nothing to repaint")
    starts = [pictures.fill_masked_area(image, mask) if req.inpainting_fill == 0 else image for image in inits]
    padding = req.inpaint_full_res_padding if req.inpaint_full_res else None
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    requests = image_requests(req, ctx, model, "inpaint", sampler=sampler, options=options, image=starts, mask=mask,
                              strength=strength, inpaint_padding=padding)
    extra = {"Resize mode": resize_mode_name(req), "Mask blur": blur[0] if blur[0] == blur[1] else None,
             "Mask blur x": None if blur[0] == blur[1] else blur[0], "Mask blur y": None if blur[0] == blur[1] else
             blur[1], "Mask mode": "Inpaint not masked" if req.inpainting_mask_invert else None,
             "Masked content": "original" if req.inpainting_fill == 1 else "fill"}
    overlay = None if padding is not None else (inits, [mask] * len(inits))  # the crop path pastes back itself
    return Plan(requests, model, req.sampler_name or req.sampler_index, extra, overlay=overlay, options=options)


def finish_images(plan: Plan, images: list[PIL.Image.Image]) -> list[PIL.Image.Image]:
    """Inpainting: the unmasked pixels from the original, blended by the (blurred) mask, as A1111 pastes them."""
    if plan.overlay is None:
        return images
    from stablepipe.pipelines.image_stages import paste_crop_back

    originals, masks = plan.overlay
    return [paste_crop_back([image], original, mask, None)[0]
            for image, original, mask in zip(images, originals, masks)]


# ---- the response ------------------------------------------------------------------------------------------


def infotext_for(plan: Plan, request: ImageRequest) -> str:
    params = infotext_params(request, model_name=plan.model.name, model_hash=plan.model.hash)
    params.update(plan.extra_params)
    ordered = {k: v for k, v in params.items() if k not in ("Inpaint area", "Masked area padding")}
    ordered.update({k: params.get(k) for k in ("Inpaint area", "Masked area padding")})
    return format_infotext(request.prompt, request.negative_prompt, ordered)


def info_json(plan: Plan, req: GenerationRequest, infotexts: list[str]) -> str:
    """A1111's `info`: a JSON string of what was drawn."""
    first = plan.requests[0]
    hires = plan.hires or {}
    clip = int(plan.options.get("CLIP_stop_at_last_layers") or 1)
    return json.dumps({
        "prompt": first.prompt, "all_prompts": [r.prompt for r in plan.requests],
        "negative_prompt": first.negative_prompt, "all_negative_prompts": [r.negative_prompt for r in plan.requests],
        "seed": first.seed, "all_seeds": plan.seeds, "subseed": -1, "all_subseeds": [-1] * len(plan.requests),
        "subseed_strength": 0, "width": first.width, "height": first.height, "sampler_name": plan.sampler_name,
        "scheduler": req.scheduler or "Automatic", "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "n_iter": req.n_iter, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": plan.model.name, "sd_model_hash": plan.model.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": hires.get("strength", first.strength if first.task != "txt2img" else None),
        "extra_generation_params": {k: v for k, v in plan.extra_params.items() if v is not None},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": None, "clip_skip": clip,
        "is_using_inpainting_conditioning": plan.model.family.endswith("inpaint"), "version": "stablepipe",
    })
